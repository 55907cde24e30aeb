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
from .local import draw_local_objects
from .meta import CLASS_GLYPHS, GLYPHS, IMAGE_SIZE_RANGE, ROAD_ID, variant_spec
from .placement import Canvas, draw_object, fits, integral
from .scene import PLACEMENT_TRIES, Box, draw_distractor, draw_moon, draw_scene

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

    category_id: int  # 1..len(thing classes of the variant)
    bbox: List[int]  # [x, y, w, h]: the tight box of the whole object, occluded parts included
    mask: np.ndarray  # bool (H, W): the visible pixels


@dataclass
class SyntheticSample:
    """One rendered image with its label map and objects."""

    image: np.ndarray  # uint8 (H, W, 3) RGB
    label: np.ndarray  # uint8 (H, W) semantic labels (SEM_SEG_CLASSES)
    objects: List[SyntheticObject]
    moon: bool  # whether the moon is drawn (orbs are lamps) or not (orbs are balls)


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


def _place(
    rng: np.random.Generator, canvas: Canvas, category: str, w: int, h: int
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
        if fits(box, mask, category, canvas):
            return box, rgb, mask
    return None


def render_sample(split: str, seed: int, index: int, *, variant: str = "base") -> SyntheticSample:
    """
    Draw image ``index`` of a split. Each image has its own random stream, seeded by
    ``(seed, crc32(split), index)``, so it does not depend on how many images are drawn.

    Args:
        split (str): the split's name (part of the seed).
        seed (int): the generator seed (>= 0).
        index (int): the image's index in the split.
        variant (str): one of :data:`VARIANTS`; "local" draws the base image's objects, then
            kites, birds and strings (:mod:`ion_d2.data.synthetic.local`).

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
    canvas = Canvas(
        image=image,
        label=label,
        road_integral=integral(region == ROAD_ID),
        moon_box=moon_box,
        owner=np.full((height, width), -1, dtype=np.int64),
        placed=[],
    )
    for _ in range(int(rng.integers(2, 9))):
        draw_distractor(rng, canvas.image, canvas.label, canvas.moon_box)
    for category, w, h in _sample_objects(rng, has_moon, height, width):
        placement = _place(rng, canvas, category, w, h)
        if placement is not None:
            draw_object(canvas, category, *placement)
    if variant_spec(variant).name == "local":
        draw_local_objects(rng, canvas)
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
