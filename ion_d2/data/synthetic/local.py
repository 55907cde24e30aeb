"""
The local variant's objects (issue 26: context just outside the box): kites and birds, drawn
with one glyph, told apart only by a thin string next to the box, among free strings drawn
elsewhere. Drawn after the base objects of :mod:`.render`, by the same placement rules
(:mod:`.placement`) plus these:

* a kite's string runs from the middle of its box's bottom edge, outside the box, and ends
  within one box side of it; a bird has none;
* no other string comes within one box side of a kite's or a bird's box, and flyers are drawn
  last, so nothing hides a flyer or a string;
* strings lie on road or water only: they never touch an object, its box, a vehicle's
  surroundings, the moon or clutter.

Every decision uses correctly rounded arithmetic only, as in :mod:`.render`.
"""

from typing import List, Optional, Tuple

import numpy as np

from .glyphs import render_glyph
from .meta import (
    BACKGROUND_ID,
    DISTRACTOR_STRINGS_PER_IMAGE,
    FLYER_SIDE_RANGE,
    FLYERS_PER_IMAGE,
    LOCAL_CLASSES,
    LOCAL_GLYPH,
    PALETTE,
    ROAD_ID,
    STRING_HALF_WIDTH,
    STRING_LENGTH_RANGE,
    WATER_ID,
)
from .placement import Canvas, draw_object, fits, grow
from .scene import PLACEMENT_TRIES, Box

__all__ = ["draw_local_objects", "string_pixels"]

# Length (pixels) of a free string (closed range).
_FREE_STRING_LENGTH = (8, 36)


def string_pixels(
    start: Tuple[float, float], offset: Tuple[int, int], height: int, width: int
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """
    The pixels of a string: those whose centre lies within :data:`STRING_HALF_WIDTH` of the
    segment from ``start`` (x, y) to ``start + offset``.

    Returns:
        tuple[np.ndarray, np.ndarray] or None: rows and columns, or None when a pixel would lie
        outside the image.
    """
    (sx, sy), (dx, dy) = start, offset
    reach = STRING_HALF_WIDTH + 1
    x0, x1 = int(np.floor(min(sx, sx + dx) - reach)), int(np.ceil(max(sx, sx + dx) + reach))
    y0, y1 = int(np.floor(min(sy, sy + dy) - reach)), int(np.ceil(max(sy, sy + dy) + reach))
    px = (np.arange(x0, x1, dtype=np.float64) + 0.5)[None, :] - sx
    py = (np.arange(y0, y1, dtype=np.float64) + 0.5)[:, None] - sy
    t = np.clip((px * dx + py * dy) / float(dx * dx + dy * dy), 0.0, 1.0)
    ex, ey = px - t * dx, py - t * dy
    rows, cols = np.nonzero(ex * ex + ey * ey <= STRING_HALF_WIDTH**2)
    rows, cols = rows + y0, cols + x0
    if rows.size == 0 or rows.min() < 0 or cols.min() < 0:
        return None
    if rows.max() >= height or cols.max() >= width:
        return None
    return rows, cols


def _on_free_scene(pixels, canvas: Canvas, keep_out: List[Box]) -> bool:
    """Whether every pixel shows road or water, and none lies in a box of ``keep_out``."""
    rows, cols = pixels
    labels = canvas.label[rows, cols]
    if not np.all((labels == ROAD_ID) | (labels == WATER_ID)):
        return False
    for x0, y0, x1, y1 in keep_out:
        if np.any((cols >= x0) & (cols < x1) & (rows >= y0) & (rows < y1)):
            return False
    return True


def _draw_string(pixels, canvas: Canvas, strings: np.ndarray) -> None:
    rows, cols = pixels
    canvas.image[rows, cols] = PALETTE["string"]
    canvas.label[rows, cols] = BACKGROUND_ID
    strings[rows, cols] = True


def _object_zones(canvas: Canvas) -> List[Box]:
    """Boxes strings keep out of: every object's box and a vehicle's surroundings."""
    return [p.ring if p.ring is not None else p.box for p in canvas.placed]


def _draw_free_strings(rng: np.random.Generator, canvas: Canvas, strings: np.ndarray) -> None:
    height, width = canvas.label.shape
    lo, hi = DISTRACTOR_STRINGS_PER_IMAGE
    zones = _object_zones(canvas)  # no object is drawn meanwhile
    for _ in range(int(rng.integers(lo, hi + 1))):
        for _ in range(PLACEMENT_TRIES):
            length = int(rng.integers(_FREE_STRING_LENGTH[0], _FREE_STRING_LENGTH[1] + 1))
            dy = int(rng.integers(length // 2, length + 1))
            dx = int(rng.integers(-dy, dy + 1))
            start = (float(rng.integers(0, width)), float(rng.integers(0, height)))
            pixels = string_pixels(start, (dx, dy), height, width)
            if pixels is not None and _on_free_scene(pixels, canvas, zones):
                _draw_string(pixels, canvas, strings)
                break


def _flyer_size(rng: np.random.Generator) -> Tuple[int, int]:
    side = int(rng.integers(FLYER_SIDE_RANGE[0], FLYER_SIDE_RANGE[1] + 1))
    return int(round(side * rng.uniform(1.0, 1.4))), side


def _kite_string(rng: np.random.Generator, box: Box, height: int, width: int):
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    length = rng.uniform(*STRING_LENGTH_RANGE) * side
    dy = max(2, int(length))
    dx = int(rng.integers(-(dy // 2), dy // 2 + 1))
    # From the bottom edge's middle; pixel rows from y1 on: none inside the box.
    return string_pixels((0.5 * (x0 + x1), float(y1) + STRING_HALF_WIDTH), (dx, dy), height, width)


def _place_flyer(
    rng: np.random.Generator,
    canvas: Canvas,
    category: str,
    strings: np.ndarray,
    flyers: List[Tuple[Box, Box]],
):
    height, width = canvas.label.shape
    w, h = _flyer_size(rng)
    if w > width - 2 or h > height - 2:
        return None
    rgb, mask = render_glyph(LOCAL_GLYPH, w, h)
    for _ in range(PLACEMENT_TRIES):
        x0 = int(rng.integers(0, width - w + 1))
        y0 = int(rng.integers(0, height - h + 1))
        box = (x0, y0, x0 + w, y0 + h)
        zone = grow(box, max(w, h), height, width)
        zx0, zy0, zx1, zy1 = zone
        if strings[zy0:zy1, zx0:zx1].any() or not fits(box, mask, category, canvas):
            continue
        # No flyer within one box side of another's box, either way.
        if any(_overlap(zone, b) or _overlap(z, box) for b, z in flyers):
            continue
        pixels = None
        if category == "kite":
            pixels = _kite_string(rng, box, height, width)
            if pixels is None:
                continue
            keep_out = _object_zones(canvas) + [z for _, z in flyers]
            if not _on_free_scene(pixels, canvas, keep_out):
                continue
        return box, rgb, mask, zone, pixels
    return None


def _overlap(a: Box, b: Box) -> bool:
    return max(a[0], b[0]) < min(a[2], b[2]) and max(a[1], b[1]) < min(a[3], b[3])


def draw_local_objects(rng: np.random.Generator, canvas: Canvas) -> None:
    """Draw the free strings, then the kites (with their strings) and birds, on ``canvas``."""
    strings = np.zeros(canvas.label.shape, dtype=bool)
    _draw_free_strings(rng, canvas, strings)
    flyers: List[Tuple[Box, Box]] = []
    lo, hi = FLYERS_PER_IMAGE
    for _ in range(int(rng.integers(lo, hi + 1))):
        category = LOCAL_CLASSES[int(rng.integers(2))]
        placement = _place_flyer(rng, canvas, category, strings, flyers)
        if placement is None:
            continue
        box, rgb, mask, zone, pixels = placement
        draw_object(canvas, category, box, rgb, mask)
        if pixels is not None:
            _draw_string(pixels, canvas, strings)
        flyers.append((box, zone))
