"""
The pure renderer of the bundled synthetic dataset: one image, its label map and its objects
from ``(split, seed, index)``, with no file I/O. The rules it enforces are stated in
:mod:`ion_d2.data.synthetic` and docs/DATASET.md; their parameters live in
:mod:`ion_d2.data.synthetic.meta`.

Every decision that affects labels or boxes uses only correctly rounded arithmetic and
comparisons (no exp/log/sin), so the json and the label maps are the same on every platform.
"""

import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from .glyphs import render_glyph
from .meta import (
    CLASS_GLYPHS,
    CONTEXT_MARGIN,
    CONTEXT_MIN_VISIBLE,
    GLYPHS,
    IMAGE_SIZE_RANGE,
    MAX_OCCLUDED_FRACTION,
    MOON_MIN_GAP,
    ROAD_ID,
    THING_CLASSES,
    WATER_ID,
)
from .scene import PLACEMENT_TRIES, Box, box_gap_squared, draw_distractor, draw_moon, draw_scene

__all__ = ["SyntheticObject", "SyntheticSample", "render_sample"]

# Sampling of object glyphs and sizes. Mask area over box area of each glyph ("fill") turns a
# target mask area into a box size.
_GLYPH_PROBS = (0.4, 0.26, 0.17, 0.17)
_GLYPH_FILL = {"vehicle": 1.0, "orb": 1.0, "sign": 0.83, "ring": 0.55}
_SIZE_CLASS_PROBS = (0.5, 0.32, 0.18)
# Ranges of sqrt(target mask area) of small / medium / large objects, sampled uniformly.
_SIZE_CLASS_SIDES = ((8.0, 30.0), (34.0, 89.0), (104.0, 140.0))
_LARGE = 2
_MIN_BOX_SIDE = 6


@dataclass
class SyntheticObject:
    """One object of a rendered image, in COCO's terms."""

    category_id: int  # 1..len(THING_CLASSES)
    bbox: List[int]  # [x, y, w, h]: the tight box of the whole object, occluded parts included
    mask: np.ndarray  # bool (H, W): the visible pixels


@dataclass
class SyntheticSample:
    """One rendered image with its label map and objects."""

    image: np.ndarray  # uint8 (H, W, 3) RGB
    label: np.ndarray  # uint8 (H, W) semantic labels (SEM_SEG_CLASSES)
    objects: List[SyntheticObject]
    moon: bool  # whether the moon is drawn (orbs are lamps) or not (orbs are balls)


@dataclass
class _Placed:
    """Book-keeping of a drawn object while later objects are placed over it."""

    index: int
    category_id: int
    box: Box
    bbox: List[int]
    full_area: int
    visible: int
    ring: Optional[Box]  # a vehicle's grown box, whose scene pixels must stay visible


@dataclass
class _Canvas:
    """The image being drawn and what placement rules read from it."""

    image: np.ndarray  # float (H, W, 3)
    label: np.ndarray  # uint8 (H, W)
    road_integral: np.ndarray
    moon_box: Box
    owner: np.ndarray  # int (H, W): index of the topmost object, -1 where none
    placed: List[_Placed]


def _box_sum(integral: np.ndarray, box: Box) -> int:
    x0, y0, x1, y1 = box
    return int(integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0])


def _integral(binary: np.ndarray) -> np.ndarray:
    out = np.zeros((binary.shape[0] + 1, binary.shape[1] + 1), dtype=np.int64)
    out[1:, 1:] = binary.astype(np.int64).cumsum(0).cumsum(1)
    return out


def _sample_box_size(
    rng: np.random.Generator, glyph: str, size_class: int, height: int, width: int
) -> Tuple[int, int]:
    # Only correctly rounded operations (no exp/log) decide box sizes, so the json does not
    # depend on the platform's maths library.
    lo, hi = _SIZE_CLASS_SIDES[size_class]
    side = rng.uniform(lo, hi) / np.sqrt(_GLYPH_FILL[glyph])
    aspect = rng.uniform(1.5, 2.1) if glyph == "vehicle" else 1.0
    w = int(round(side * np.sqrt(aspect)))
    h = int(round(side / np.sqrt(aspect)))
    scale = min(1.0, (width - 2) / w, (height - 2) / h)
    w, h = int(w * scale), int(h * scale)
    return max(w, _MIN_BOX_SIDE), max(h, _MIN_BOX_SIDE)


def _sample_objects(
    rng: np.random.Generator, has_moon: bool, height: int, width: int
) -> List[Tuple[str, int, int]]:
    """Draw the objects' categories and box sizes; returns ``(category, w, h)``, back to front."""
    specs = []
    for _ in range(int(rng.integers(3, 10))):
        glyph = GLYPHS[int(rng.choice(len(GLYPHS), p=_GLYPH_PROBS))]
        size_class = int(rng.choice(3, p=_SIZE_CLASS_PROBS))
        if size_class == _LARGE and any(spec[1] == _LARGE for spec in specs):
            size_class = 1  # at most one large object per image
        w, h = _sample_box_size(rng, glyph, size_class, height, width)
        if glyph == "vehicle":
            category = "car" if rng.random() < 0.5 else "boat"
        elif glyph == "orb":
            category = "lamp" if has_moon else "ball"
        else:
            category = glyph
        specs.append((category, size_class, w, h))
    # The large object goes first (furthest back): later, it would rarely find room.
    specs.sort(key=lambda spec: spec[1] != _LARGE)
    return [(category, w, h) for category, _, w, h in specs]


def _grow(box: Box, margin: int, height: int, width: int) -> Box:
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


def _vehicle_context_ok(box: Box, category: str, canvas: _Canvas) -> bool:
    """A car (boat) box grown by CONTEXT_MARGIN lies on road (water) only, and enough shows."""
    height, width = canvas.label.shape
    ring = _grow(box, CONTEXT_MARGIN, height, width)
    on_road = _box_sum(canvas.road_integral, ring)
    ring_area = (ring[2] - ring[0]) * (ring[3] - ring[1])
    if on_road != (ring_area if category == "car" else 0):
        return False
    ring_pixels = ring_area - (box[2] - box[0]) * (box[3] - box[1])
    return _ring_scene_pixels(canvas.label, ring, box) >= CONTEXT_MIN_VISIBLE * ring_pixels


def _earlier_objects_ok(box: Box, mask: np.ndarray, canvas: _Canvas) -> bool:
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


def _fits(box: Box, mask: np.ndarray, category: str, canvas: _Canvas) -> bool:
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


def _place(
    rng: np.random.Generator, canvas: _Canvas, category: str, w: int, h: int
) -> Optional[Tuple[Box, np.ndarray, np.ndarray]]:
    """Find a place for an object by the rules; returns ``(box, rgb, mask)`` or None."""
    height, width = canvas.label.shape
    glyph = CLASS_GLYPHS[category]
    rgb, mask = render_glyph(glyph, w, h)
    for attempt in range(3 * PLACEMENT_TRIES):
        if attempt > 0 and attempt % PLACEMENT_TRIES == 0:
            # Shrink what does not fit (e.g. a large vehicle in a thin band).
            w = max(_MIN_BOX_SIDE, int(w * 0.75))
            h = max(_MIN_BOX_SIDE, int(h * 0.75))
            rgb, mask = render_glyph(glyph, w, h)
        if canvas.placed and rng.random() < 0.3:
            # Next to an earlier object, to create partial occlusion.
            other = canvas.placed[int(rng.integers(len(canvas.placed)))].bbox
            cx = other[0] + rng.uniform(-0.2, 1.2) * other[2]
            cy = other[1] + rng.uniform(-0.2, 1.2) * other[3]
            x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
        else:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
        box = (x0, y0, x0 + w, y0 + h)
        if _fits(box, mask, category, canvas):
            return box, rgb, mask
    return None


def _draw_object(
    canvas: _Canvas, category: str, box: Box, rgb: np.ndarray, mask: np.ndarray
) -> None:
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
    category_id = THING_CLASSES.index(category) + 1
    canvas.label[y0:y1, x0:x1][mask] = category_id
    ys, xs = np.nonzero(mask)
    full_area = int(mask.sum())
    height, width = canvas.label.shape
    canvas.placed.append(
        _Placed(
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
                _grow(box, CONTEXT_MARGIN, height, width)
                if CLASS_GLYPHS[category] == "vehicle"
                else None
            ),
        )
    )


def render_sample(split: str, seed: int, index: int) -> SyntheticSample:
    """
    Draw image ``index`` of a split. Each image has its own random stream, seeded by
    ``(seed, crc32(split), index)``, so it does not depend on how many images are drawn.

    Args:
        split (str): the split's name (part of the seed).
        seed (int): the generator seed (>= 0).
        index (int): the image's index in the split.

    Returns:
        SyntheticSample: the image, its label map and its objects.
    """
    rng = np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])
    lo, hi = IMAGE_SIZE_RANGE
    height, width = (int(x) for x in rng.integers(lo, hi + 1, size=2))
    image, region = draw_scene(rng, height, width)
    label = region.copy()
    has_moon = bool(rng.random() < 0.5)
    moon_box = draw_moon(rng, image, label, visible=has_moon)
    canvas = _Canvas(
        image=image,
        label=label,
        road_integral=_integral(region == ROAD_ID),
        moon_box=moon_box,
        owner=np.full((height, width), -1, dtype=np.int64),
        placed=[],
    )
    for _ in range(int(rng.integers(2, 9))):
        draw_distractor(rng, canvas.image, canvas.label, canvas.moon_box)
    for category, w, h in _sample_objects(rng, has_moon, height, width):
        placement = _place(rng, canvas, category, w, h)
        if placement is not None:
            _draw_object(canvas, category, *placement)
    objects = [
        SyntheticObject(category_id=p.category_id, bbox=p.bbox, mask=canvas.owner == p.index)
        for p in canvas.placed
    ]
    return SyntheticSample(
        image=np.clip(np.round(canvas.image), 0, 255).astype(np.uint8),
        label=canvas.label,
        objects=objects,
        moon=has_moon,
    )
