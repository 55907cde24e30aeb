"""
Where an object of the bundled synthetic dataset may be drawn (the rules of
:mod:`ion_d2.data.synthetic`, parameters in :mod:`ion_d2.data.synthetic.meta`) and the canvas
that records what is drawn: shared by the base objects (:mod:`.render`) and the local variant's
kites and birds (:mod:`.local`).
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from .meta import (
    CLASS_GLYPHS,
    CONTEXT_MARGIN,
    CONTEXT_MIN_VISIBLE,
    LOCAL_CLASSES,
    MAX_OCCLUDED_FRACTION,
    MOON_MIN_GAP,
    ROAD_ID,
    SEM_SEG_CLASSES,
    THING_CLASSES,
    WATER_ID,
)
from .scene import Box, box_gap_squared

__all__ = ["Canvas", "Placed", "box_sum", "draw_object", "fits", "grow", "integral"]

# COCO category id and label-map id of every class: the local variant's pair comes after the
# base classes in both (ion_d2.data.synthetic.meta.variant_spec), so base ids are unchanged.
_CATEGORY_IDS = {name: i + 1 for i, name in enumerate(THING_CLASSES + LOCAL_CLASSES)}
_LABEL_IDS = {name: i for i, name in enumerate(SEM_SEG_CLASSES + LOCAL_CLASSES)}


@dataclass
class Placed:
    """Book-keeping of a drawn object while later objects are placed over it."""

    index: int
    category_id: int
    box: Box
    bbox: List[int]
    full_area: int
    visible: int
    ring: Optional[Box]  # a vehicle's grown box, whose scene pixels must stay visible


@dataclass
class Canvas:
    """The image being drawn and what placement rules read from it."""

    image: np.ndarray  # float (H, W, 3)
    label: np.ndarray  # uint8 (H, W)
    road_integral: np.ndarray
    moon_box: Box
    owner: np.ndarray  # int (H, W): index of the topmost object, -1 where none
    placed: List[Placed]


def box_sum(integral: np.ndarray, box: Box) -> int:
    x0, y0, x1, y1 = box
    return int(integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0])


def integral(binary: np.ndarray) -> np.ndarray:
    out = np.zeros((binary.shape[0] + 1, binary.shape[1] + 1), dtype=np.int64)
    out[1:, 1:] = binary.astype(np.int64).cumsum(0).cumsum(1)
    return out


def grow(box: Box, margin: int, height: int, width: int) -> Box:
    x0, y0, x1, y1 = box
    return (
        max(0, x0 - margin),
        max(0, y0 - margin),
        min(width, x1 + margin),
        min(height, y1 + margin),
    )


def _ring_scene_pixels(
    label: np.ndarray, ring: Box, box: Box, cover: Optional[Tuple[Box, np.ndarray]] = None
) -> int:
    """
    Count the pixels of ``ring`` outside ``box`` that show the scene (road or water); with
    ``cover = (cover_box, cover_mask)``, only those a new object there would hide.
    """
    x0, y0, x1, y1 = ring
    if cover is not None:
        (cx0, cy0, cx1, cy1), cover_mask = cover
        x0, y0, x1, y1 = max(x0, cx0), max(y0, cy0), min(x1, cx1), min(y1, cy1)
        if x0 >= x1 or y0 >= y1:
            return 0
    window = label[y0:y1, x0:x1]
    scene = (window == ROAD_ID) | (window == WATER_ID)
    bx0, by0 = max(box[0], x0) - x0, max(box[1], y0) - y0
    bx1, by1 = min(box[2], x1) - x0, min(box[3], y1) - y0
    if bx0 < bx1 and by0 < by1:
        scene[by0:by1, bx0:bx1] = False
    if cover is not None:
        scene &= cover_mask[y0 - cy0 : y1 - cy0, x0 - cx0 : x1 - cx0]
    return int(scene.sum())


def _vehicle_context_ok(box: Box, category: str, canvas: Canvas) -> bool:
    """A car (boat) box grown by CONTEXT_MARGIN lies on road (water) only, and enough shows."""
    height, width = canvas.label.shape
    ring = grow(box, CONTEXT_MARGIN, height, width)
    on_road = box_sum(canvas.road_integral, ring)
    ring_area = (ring[2] - ring[0]) * (ring[3] - ring[1])
    if on_road != (ring_area if category == "car" else 0):
        return False
    ring_pixels = ring_area - (box[2] - box[0]) * (box[3] - box[1])
    return _ring_scene_pixels(canvas.label, ring, box) >= CONTEXT_MIN_VISIBLE * ring_pixels


def _earlier_objects_ok(box: Box, mask: np.ndarray, canvas: Canvas) -> bool:
    """Earlier objects keep most of their pixels, and vehicles most of their surroundings."""
    x0, y0, x1, y1 = box
    hidden = canvas.owner[y0:y1, x0:x1][mask]
    lost = np.bincount(hidden[hidden >= 0], minlength=len(canvas.placed))
    for obj in canvas.placed:
        if lost[obj.index] and obj.visible - lost[obj.index] < (
            (1.0 - MAX_OCCLUDED_FRACTION) * obj.full_area
        ):
            return False
        ring = obj.ring
        if ring is not None and box_gap_squared(box, ring) == 0:
            ring_pixels = (ring[2] - ring[0]) * (ring[3] - ring[1]) - obj.full_area
            left = _ring_scene_pixels(canvas.label, ring, obj.box) - _ring_scene_pixels(
                canvas.label, ring, obj.box, cover=(box, mask)
            )
            if left < CONTEXT_MIN_VISIBLE * ring_pixels:
                return False
    return True


def fits(box: Box, mask: np.ndarray, category: str, canvas: Canvas) -> bool:
    """Whether an object of ``category`` may be drawn with ``mask`` at ``box`` (the rules)."""
    height, width = canvas.label.shape
    x0, y0, x1, y1 = box
    if not (0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height):
        return False
    gap = box_gap_squared(box, canvas.moon_box)
    if gap <= 4:
        return False
    glyph = CLASS_GLYPHS[category]
    if glyph == "orb" and gap < MOON_MIN_GAP**2:
        return False
    if glyph == "vehicle" and not _vehicle_context_ok(box, category, canvas):
        return False
    return _earlier_objects_ok(box, mask, canvas)


def draw_object(canvas: Canvas, category: str, box: Box, rgb: np.ndarray, mask: np.ndarray) -> None:
    """Draw an accepted object and charge the pixels it hides to the objects below."""
    x0, y0, x1, y1 = box
    hidden = canvas.owner[y0:y1, x0:x1][mask]
    for obj, count in zip(
        canvas.placed, np.bincount(hidden[hidden >= 0], minlength=len(canvas.placed))
    ):
        obj.visible -= int(count)
    index = len(canvas.placed)
    canvas.owner[y0:y1, x0:x1][mask] = index
    canvas.image[y0:y1, x0:x1][mask] = rgb[mask]
    category_id = _CATEGORY_IDS[category]
    canvas.label[y0:y1, x0:x1][mask] = _LABEL_IDS[category]
    ys, xs = np.nonzero(mask)
    full_area = int(mask.sum())
    height, width = canvas.label.shape
    canvas.placed.append(
        Placed(
            index=index,
            category_id=category_id,
            box=box,
            bbox=[
                x0 + int(xs.min()),
                y0 + int(ys.min()),
                int(xs.max() - xs.min()) + 1,
                int(ys.max() - ys.min()) + 1,
            ],
            full_area=full_area,
            visible=full_area,
            ring=(
                grow(box, CONTEXT_MARGIN, height, width)
                if CLASS_GLYPHS[category] == "vehicle"
                else None
            ),
        )
    )
