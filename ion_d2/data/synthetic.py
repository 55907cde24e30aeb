"""
A small synthetic detection dataset on which ION's two ideas matter: context and scale.

ion_d2 ships no data. This module draws, deterministically from a seed, a COCO-format detection
dataset with semantic label maps, small enough that ``make demo`` trains ION on a 2-core CPU.

* Context (section 3.2 of the paper): two pairs of classes are *pixel-identical inside their
  box* and are told apart only by what lies outside it. The "vehicle" glyph is a ``car`` on a
  road band and a ``boat`` on a water band; the "orb" glyph is a ``lamp`` in an image that shows
  a moon anywhere (at least :data:`MOON_MIN_GAP` pixels away) and a ``ball`` in an image that
  shows none.
* Scale (section 3.1): more than half of the objects are COCO-"small" (mask area < 32 x 32),
  most others "medium", a few "large"; objects partially occlude each other and lie among
  clutter.
* ``sign`` and ``ring`` are told apart by their own shape and colour.

docs/DATASET.md states the rules in plain words, with measured statistics.

Layout on disk, for ``root`` and a split directory ``split``::

    <root>/ion_synth/<split>/images/000000.png        RGB image
    <root>/ion_synth/<split>/sem_seg/000000.png       uint8 label map (see SEM_SEG_CLASSES)
    <root>/ion_synth/<split>/COMPLETE.json            written last: generator version + params
    <root>/ion_synth/annotations/instances_<split>.json   COCO instances json

COCO conventions: ``bbox`` is ``[x, y, w, h]`` in absolute pixels, the tight box of the *whole*
object (occluded parts included, as occlusion never hides more than
:data:`MAX_OCCLUDED_FRACTION` of an object); ``area`` is the pixel count of the *visible* mask and
``segmentation`` is that mask as compressed RLE; ``iscrowd`` is 0; category ids are 1..K in the
order of :data:`THING_CLASSES`.
"""

import functools
import json
import logging
import os
import re
import zlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image
from tqdm import tqdm

__all__ = [
    "GENERATOR_VERSION",
    "THING_CLASSES",
    "THING_COLORS",
    "CONTEXT_CLASSES",
    "CLASS_GLYPHS",
    "GLYPHS",
    "SCENE_CLASSES",
    "SEM_SEG_CLASSES",
    "SEM_SEG_COLORS",
    "BACKGROUND_ID",
    "ROAD_ID",
    "WATER_ID",
    "MOON_ID",
    "IGNORE_LABEL",
    "TRAIN_DATASET_NAME",
    "VAL_DATASET_NAME",
    "DEFAULT_NUM_TRAIN",
    "DEFAULT_NUM_VAL",
    "DEFAULT_SEED",
    "IMAGE_SIZE_RANGE",
    "MAX_OCCLUDED_FRACTION",
    "CONTEXT_MARGIN",
    "CONTEXT_MIN_VISIBLE",
    "MOON_MIN_GAP",
    "render_glyph",
    "split_dir_name",
    "generate_synthetic_dataset",
    "register_ion_synthetic",
]

logger = logging.getLogger(__name__)

#: Bumped whenever a change alters the generated files; part of the completion marker, so a
#: dataset written by another version is generated again.
GENERATOR_VERSION = 1

#: Thing classes; COCO category id = index + 1, semantic label id = index + 1.
THING_CLASSES = ("car", "boat", "lamp", "ball", "sign", "ring")
#: Display colours of the thing classes (for detectron2's Visualizer).
THING_COLORS = (
    (220, 40, 40),
    (40, 90, 220),
    (250, 200, 40),
    (250, 120, 20),
    (200, 30, 120),
    (40, 170, 60),
)
#: Classes that look identical inside their box to their partner and need context.
CONTEXT_CLASSES = ("car", "boat", "lamp", "ball")
#: The glyph each class is drawn with: equal glyphs give pixel-identical boxes.
CLASS_GLYPHS = {
    "car": "vehicle",
    "boat": "vehicle",
    "lamp": "orb",
    "ball": "orb",
    "sign": "sign",
    "ring": "ring",
}
#: Glyphs that :func:`render_glyph` draws.
GLYPHS = ("vehicle", "orb", "sign", "ring")

#: Scene ("stuff") classes of the label maps, after background and the thing classes.
SCENE_CLASSES = ("road", "water", "moon")
#: Semantic classes of the label maps, index = pixel value: 0 = background (clutter),
#: 1..6 = thing classes, 7 = road, 8 = water, 9 = moon.
SEM_SEG_CLASSES = ("background",) + THING_CLASSES + SCENE_CLASSES
#: Display colours of the semantic classes.
SEM_SEG_COLORS = ((0, 0, 0),) + THING_COLORS + ((100, 100, 100), (30, 80, 160), (235, 235, 255))
BACKGROUND_ID = 0
ROAD_ID = SEM_SEG_CLASSES.index("road")
WATER_ID = SEM_SEG_CLASSES.index("water")
MOON_ID = SEM_SEG_CLASSES.index("moon")
#: Declared "ignore" value of the label maps (detectron2's convention); the generator labels
#: every pixel, so it never writes it.
IGNORE_LABEL = 255

#: Names :func:`register_ion_synthetic` registers by default.
TRAIN_DATASET_NAME = "ion_synth_train"
VAL_DATASET_NAME = "ion_synth_val"
DEFAULT_NUM_TRAIN = 600
DEFAULT_NUM_VAL = 150
DEFAULT_SEED = 0

#: Image height and width are each drawn uniformly from this closed range.
IMAGE_SIZE_RANGE = (128, 256)
#: No object ever has more than this fraction of its mask hidden by later objects.
MAX_OCCLUDED_FRACTION = 0.4
#: A car (boat) box grown by this many pixels on every side lies entirely on road (water).
CONTEXT_MARGIN = 4
#: At least this fraction of that margin shows the road (water): objects and clutter never
#: hide a vehicle's surroundings.
CONTEXT_MIN_VISIBLE = 0.5
#: Every orb (lamp or ball) box is at least this far (pixels, box to box) from the moon's place,
#: which every image has, with or without the moon drawn.
MOON_MIN_GAP = 40

# Colours of the glyphs: chosen once, never jittered, so a glyph depends on its size only.
_TILE_RGB = (205, 205, 198)
_TILE_EDGE_RGB = (150, 150, 145)
_VEHICLE_BODY_RGB = (170, 30, 35)
_VEHICLE_WINDOW_RGB = (150, 200, 230)
_VEHICLE_WHEEL_RGB = (25, 25, 25)
_ORB_RGB = (245, 185, 35)
_ORB_EDGE_RGB = (95, 55, 10)
_ORB_HIGHLIGHT_RGB = (255, 248, 215)
_SIGN_RGB = (200, 25, 30)
_SIGN_BAR_RGB = (250, 250, 250)
_RING_RGB = (40, 170, 60)
_MOON_RGB = (235, 235, 255)
_LANE_RGB = (230, 215, 120)

# Sampling of object glyphs and sizes. Mask area over box area of each glyph ("fill") turns a
# target mask area into a box size.
_GLYPH_PROBS = (0.4, 0.26, 0.17, 0.17)
_GLYPH_FILL = {"vehicle": 1.0, "orb": 1.0, "sign": 0.83, "ring": 0.55}
_SIZE_CLASS_PROBS = (0.5, 0.32, 0.18)
# Ranges of sqrt(target mask area) of small / medium / large objects, sampled uniformly.
_SIZE_CLASS_SIDES = ((8.0, 30.0), (34.0, 89.0), (104.0, 140.0))
_MIN_BOX_SIDE = 6
_PLACEMENT_TRIES = 30
# (x0, y0, x1, y1) in pixels, end-exclusive.
_Box = Tuple[int, int, int, int]
_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def render_glyph(glyph: str, width: int, height: int) -> Tuple[np.ndarray, np.ndarray]:
    """
    Draw one object glyph filling a ``height x width`` box.

    The result depends on ``(glyph, width, height)`` only, which is what makes the two classes
    that share a glyph (see :data:`CLASS_GLYPHS`) pixel-identical inside their boxes. "vehicle"
    and "orb" are drawn on an opaque tile that fills the whole box, so no scene pixel shows
    inside their box; "sign" (an octagon) and "ring" (an annulus) let the scene show through.

    Args:
        glyph (str): one of :data:`GLYPHS`.
        width (int): box width in pixels (>= 1).
        height (int): box height in pixels (>= 1).

    Returns:
        tuple[np.ndarray, np.ndarray]: ``rgb`` (uint8, ``(height, width, 3)``; zero outside the
        mask) and ``mask`` (bool, ``(height, width)``): the object's pixels.
    """
    if glyph not in GLYPHS:
        raise ValueError(f"glyph={glyph!r} is not one of {GLYPHS}.")
    if width < 1 or height < 1:
        raise ValueError(f"width={width}, height={height}: both must be >= 1.")
    # Pixel centres in box-normalised coordinates (u right, v down) and in pixels from the box
    # centre; only arithmetic and comparisons decide the masks, so they are bit-exact anywhere.
    u = ((np.arange(width, dtype=np.float64) + 0.5) / width)[None, :]
    v = ((np.arange(height, dtype=np.float64) + 0.5) / height)[:, None]
    px = (u - 0.5) * width
    py = (v - 0.5) * height
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    full = np.ones((height, width), dtype=bool)

    def paint(region: np.ndarray, color: Tuple[int, int, int]) -> None:
        rgb[np.broadcast_to(region, (height, width))] = color

    if glyph in ("vehicle", "orb"):
        paint(full, _TILE_RGB)
        if min(width, height) >= 12:
            edge = np.zeros((height, width), dtype=bool)
            edge[[0, -1], :] = True
            edge[:, [0, -1]] = True
            paint(edge, _TILE_EDGE_RGB)
        mask = full
    if glyph == "vehicle":
        body = (u >= 0.06) & (u <= 0.94) & (v >= 0.42) & (v <= 0.76)
        # Cabin: a trapezoid, wider at its base.
        cabin = (v >= 0.14) & (v < 0.42) & (np.abs(u - 0.5) <= 0.17 + 0.12 * (v - 0.14) / 0.28)
        window = (
            (v >= 0.22)
            & (v < 0.40)
            & (np.abs(u - 0.5) <= 0.12 + 0.10 * (v - 0.22) / 0.18)
            & (np.abs(u - 0.5) >= 0.025)
        )
        radius = 0.15 * height
        wheels = ((px + 0.23 * width) ** 2 + (py - 0.26 * height) ** 2 <= radius**2) | (
            (px - 0.23 * width) ** 2 + (py - 0.26 * height) ** 2 <= radius**2
        )
        paint(body | cabin, _VEHICLE_BODY_RGB)
        paint(window, _VEHICLE_WINDOW_RGB)
        paint(wheels, _VEHICLE_WHEEL_RGB)
    elif glyph == "orb":
        side = min(width, height)
        r2 = px**2 + py**2
        paint(r2 <= (0.44 * side) ** 2, _ORB_EDGE_RGB)
        paint(r2 <= (0.36 * side) ** 2, _ORB_RGB)
        highlight = (px + 0.12 * side) ** 2 + (py + 0.13 * side) ** 2 <= (0.11 * side) ** 2
        paint(highlight, _ORB_HIGHLIGHT_RGB)
    elif glyph == "sign":
        # Regular octagon touching the box sides, with a white bar.
        au, av = np.abs(u - 0.5), np.abs(v - 0.5)
        mask = np.broadcast_to(au + av <= 0.5 * 2**0.5, full.shape).copy()
        paint(mask, _SIGN_RGB)
        paint((av <= 0.09) & (au <= 0.3), _SIGN_BAR_RGB)
    elif glyph == "ring":
        r2 = (u - 0.5) ** 2 + (v - 0.5) ** 2
        mask = np.broadcast_to((r2 <= 0.25) & (r2 >= 0.27**2), full.shape).copy()
        paint(mask, _RING_RGB)
    rgb[~mask] = 0
    return rgb, mask


def split_dir_name(split: str, num_images: int, seed: int) -> str:
    """
    The directory :func:`register_ion_synthetic` generates a split in: ``split`` itself for the
    default size and seed, else ``"<split>_n<num_images>_seed<seed>"``, so slices of another
    size or seed never overwrite the default dataset under the same root.

    Args:
        split (str): "train" or "val".
        num_images (int): number of images.
        seed (int): generator seed.

    Returns:
        str: the split directory name.
    """
    default = {"train": DEFAULT_NUM_TRAIN, "val": DEFAULT_NUM_VAL}.get(split)
    if num_images == default and seed == DEFAULT_SEED:
        return split
    return f"{split}_n{num_images}_seed{seed}"


def _paths(root: str, split: str) -> Dict[str, str]:
    base = os.path.join(root, "ion_synth")
    return {
        "image_root": os.path.join(base, split, "images"),
        "sem_seg_root": os.path.join(base, split, "sem_seg"),
        "marker": os.path.join(base, split, "COMPLETE.json"),
        "json_file": os.path.join(base, "annotations", f"instances_{split}.json"),
    }


def _marker_content(split: str, num_images: int, seed: int) -> Dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "split": split,
        "num_images": num_images,
        "seed": seed,
    }


def _read_json(path: str) -> Optional[Any]:
    try:
        with open(path, "r") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _atomic_write_bytes(path: str, data: bytes) -> None:
    # Write-then-rename: a concurrent reader (another rank generating the same, deterministic
    # split) never sees a half-written file.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _atomic_save_png(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(array).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def _validate(split: str, num_images: int, seed: int) -> None:
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(
            f"split={split!r} is not a valid split directory name; accepted: letters, digits, "
            "'_', '.', '-' (not starting with '_', '.' or '-'), e.g. 'train' or 'val'."
        )
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images={num_images!r} must be an int >= 1.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an int >= 0.")


def _triangle_wave(x: np.ndarray) -> np.ndarray:
    # Period 1, range [-1, 1]. Used instead of a sine where labels depend on it: arithmetic and
    # floor are exactly rounded, so label maps are the same on every platform.
    return 4.0 * np.abs(x - np.floor(x) - 0.5) - 1.0


def _draw_scene(rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Return the road/water background (float RGB) and its region map (ROAD_ID / WATER_ID)."""
    vertical = bool(rng.random() < 0.5)  # bands side by side (True) or stacked (False)
    num_bands = 2 if rng.random() < 0.6 else 3
    length = width if vertical else height
    while True:
        cuts = np.sort(rng.uniform(0.2, 0.8, size=num_bands - 1)) * length
        edges = np.concatenate([[0.0], cuts, [length]])
        if np.diff(edges).min() >= 0.22 * length:
            break
    first_type = int(rng.integers(2))
    amplitude = rng.uniform(0.0, 4.0, size=num_bands - 1)
    period = rng.uniform(24.0, 64.0, size=num_bands - 1)
    phase = rng.uniform(0.0, 1.0, size=num_bands - 1)

    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    t, s = (xs, ys) if vertical else (ys, xs)  # t: across the bands, s: along them
    boundaries = [
        cuts[k] + amplitude[k] * _triangle_wave(s / period[k] + phase[k])
        for k in range(num_bands - 1)
    ]
    band = np.zeros((height, width), dtype=np.int64)
    for boundary in boundaries:
        band += t > boundary
    types = (first_type + band) % 2
    region = np.where(types == 0, ROAD_ID, WATER_ID).astype(np.uint8)

    # Road: grey asphalt with noise and a dashed lane marking along the middle of each band.
    grey = rng.uniform(70.0, 100.0)
    tint = rng.uniform(-6.0, 6.0, size=3)
    road = grey + tint + rng.normal(0.0, 7.0, size=(height, width, 1))
    lane_offset = rng.uniform(0.0, 16.0)
    lane_edges = [np.zeros_like(s)] + boundaries + [np.full_like(s, float(length))]
    for k in range(num_bands):
        if (first_type + k) % 2 != 0:
            continue
        middle = 0.5 * (lane_edges[k] + lane_edges[k + 1])
        dashes = np.floor(s + lane_offset) % 16 < 9
        road[(np.abs(t - middle) < 1.0) & dashes] = _LANE_RGB

    # Water: blue with wavy ripples and noise.
    blue = np.array([35.0, 85.0, 160.0]) + rng.uniform(-12.0, 12.0, size=3)
    wavelength = rng.uniform(6.0, 12.0)
    wobble = rng.uniform(30.0, 60.0)
    phase_w = rng.uniform(0.0, 2 * np.pi)
    wobbled = ys / wavelength + 0.25 * np.sin(2 * np.pi * xs / wobble + phase_w)
    ripple = np.sin(2 * np.pi * wobbled)
    water = blue + 16.0 * ripple[..., None] * np.array([0.6, 0.8, 1.0])
    water = water + rng.normal(0.0, 5.0, size=(height, width, 1))

    image = np.where((region == ROAD_ID)[..., None], road, water)
    return image, region


def _box_sum(integral: np.ndarray, y0: int, x0: int, y1: int, x1: int) -> int:
    return int(integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0])


def _integral(binary: np.ndarray) -> np.ndarray:
    out = np.zeros((binary.shape[0] + 1, binary.shape[1] + 1), dtype=np.int64)
    out[1:, 1:] = binary.astype(np.int64).cumsum(0).cumsum(1)
    return out


def _box_gap_squared(a: _Box, b: _Box) -> int:
    """Squared Euclidean distance between two boxes; 0 when they overlap. Integer: exact."""
    dx = max(0, max(a[0], b[0]) - min(a[2], b[2]))
    dy = max(0, max(a[1], b[1]) - min(a[3], b[3]))
    return dx * dx + dy * dy


def _draw_distractor(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, moon_box: _Box
) -> None:
    """Draw one clutter shape, labelled background, that is none of the classes."""
    height, width = label.shape
    kind = ("rectangle", "triangle", "bar", "ellipse", "decoy")[int(rng.integers(5))]
    side = int(rng.integers(5, 33))
    if kind == "bar":
        thickness = int(rng.integers(2, 4))
        w, h = (side, thickness) if rng.random() < 0.5 else (thickness, side)
    else:
        w, h = side, max(3, int(round(side * rng.uniform(0.6, 1.6))))
    w, h = min(w, width - 2), min(h, height - 2)
    color = tuple(int(c) for c in rng.integers(30, 226, size=3))
    flip = bool(rng.random() < 0.5)
    for _ in range(_PLACEMENT_TRIES):
        x0 = int(rng.integers(0, width - w + 1))
        y0 = int(rng.integers(0, height - h + 1))
        if _box_gap_squared((x0, y0, x0 + w, y0 + h), moon_box) > 4:
            break
    else:
        return
    u = ((np.arange(w) + 0.5) / w)[None, :]
    v = ((np.arange(h) + 0.5) / h)[:, None]
    patch = image[y0 : y0 + h, x0 : x0 + w]
    mask = np.ones((h, w), dtype=bool)
    if kind == "triangle":
        mask = np.abs(u - 0.5) <= 0.5 * (v if flip else 1.0 - v)
    elif kind == "ellipse":
        mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif kind == "decoy":
        # The neutral tile of "vehicle" and "orb" with a diagonal stroke: a tile alone is no object.
        patch[...] = _TILE_RGB
        mask = np.abs((1.0 - u if flip else u) - v) < 0.18
    patch[mask] = color
    label[y0 : y0 + h, x0 : x0 + w][True if kind == "decoy" else mask] = BACKGROUND_ID


def _draw_moon(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, visible: bool
) -> _Box:
    """
    Pick the moon's place and draw the moon there if ``visible``. Every image gets a place, so
    clutter and objects are laid out alike whether or not the moon shows: only its pixels tell
    a lamp from a ball.
    """
    height, width = label.shape
    d = int(rng.integers(26, 41))
    x0 = int(rng.integers(0, width - d + 1))
    y0 = int(rng.integers(0, height - d + 1))
    c = (np.arange(d) + 0.5) - d / 2
    r2 = c[None, :] ** 2 + c[:, None] ** 2
    bite = (c[None, :] - 0.38 * d) ** 2 + (c[:, None] + 0.12 * d) ** 2
    crescent = (r2 <= (d / 2) ** 2) & (bite > (0.42 * d) ** 2)
    if rng.random() < 0.5:
        crescent = crescent[:, ::-1]
    if not visible:
        return (x0, y0, x0 + d, y0 + d)
    image[y0 : y0 + d, x0 : x0 + d][crescent] = _MOON_RGB
    label[y0 : y0 + d, x0 : x0 + d][crescent] = MOON_ID
    return (x0, y0, x0 + d, y0 + d)


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


def _grow(box: _Box, margin: int, height: int, width: int) -> _Box:
    x0, y0, x1, y1 = box
    return (
        max(0, x0 - margin),
        max(0, y0 - margin),
        min(width, x1 + margin),
        min(height, y1 + margin),
    )


def _ring_scene_pixels(
    label: np.ndarray, ring: _Box, box: _Box, cover: Optional[Tuple[_Box, np.ndarray]] = None
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


def _fits(
    box: _Box,
    mask: np.ndarray,
    category: str,
    label: np.ndarray,
    road_integral: np.ndarray,
    owner: np.ndarray,
    objects: List[Dict[str, Any]],
    moon_box: _Box,
) -> bool:
    """Whether an object of ``category`` may be drawn with ``mask`` at ``box`` (the rules)."""
    height, width = label.shape
    x0, y0, x1, y1 = box
    if not (0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height):
        return False
    if _box_gap_squared(box, moon_box) <= 4:
        return False
    glyph = CLASS_GLYPHS[category]
    if glyph == "orb" and _box_gap_squared(box, moon_box) < MOON_MIN_GAP**2:
        return False
    if glyph == "vehicle":
        # The grown box lies on one region only, and enough of that region shows around it.
        ring = _grow(box, CONTEXT_MARGIN, height, width)
        on_road = _box_sum(road_integral, ring[1], ring[0], ring[3], ring[2])
        ring_area = (ring[2] - ring[0]) * (ring[3] - ring[1])
        if on_road != (ring_area if category == "car" else 0):
            return False
        ring_pixels = ring_area - (x1 - x0) * (y1 - y0)
        if _ring_scene_pixels(label, ring, box) < CONTEXT_MIN_VISIBLE * ring_pixels:
            return False
    # Earlier objects keep most of their pixels, and vehicles most of their surroundings.
    hidden = owner[y0:y1, x0:x1][mask]
    lost = np.bincount(hidden[hidden >= 0], minlength=len(objects))
    for j, obj in enumerate(objects):
        if lost[j] and obj["visible"] - lost[j] < (1.0 - MAX_OCCLUDED_FRACTION) * obj["full_area"]:
            return False
        ring = obj["ring"]
        if ring is not None and _box_gap_squared(box, ring) == 0:
            ring_pixels = (ring[2] - ring[0]) * (ring[3] - ring[1]) - obj["full_area"]
            left = _ring_scene_pixels(label, ring, obj["box"]) - _ring_scene_pixels(
                label, ring, obj["box"], cover=(box, mask)
            )
            if left < CONTEXT_MIN_VISIBLE * ring_pixels:
                return False
    return True


def _render_sample(split: str, seed: int, index: int) -> Dict[str, Any]:
    """
    Draw image ``index`` of a split. Each image has its own random stream, seeded by
    ``(seed, crc32(split), index)``, so it does not depend on how many images are drawn.

    Returns:
        dict: "image" (uint8 HxWx3), "label" (uint8 HxW), "objects" (list of dicts with
        "category_id", "bbox" (x, y, w, h), "mask" (bool HxW, visible), "full_area"), "moon".
    """
    rng = np.random.default_rng([seed, zlib.crc32(split.encode("utf-8")), index])
    lo, hi = IMAGE_SIZE_RANGE
    height, width = (int(x) for x in rng.integers(lo, hi + 1, size=2))
    image, region = _draw_scene(rng, height, width)
    label = region.copy()
    road_integral = _integral(region == ROAD_ID)

    has_moon = bool(rng.random() < 0.5)
    moon_box = _draw_moon(rng, image, label, visible=has_moon)
    for _ in range(int(rng.integers(2, 9))):
        _draw_distractor(rng, image, label, moon_box)

    # Objects, back to front. `owner` holds, per pixel, the index of the topmost object.
    owner = np.full((height, width), -1, dtype=np.int64)
    objects: List[Dict[str, Any]] = []
    specs = []
    for _ in range(int(rng.integers(3, 10))):
        glyph = GLYPHS[int(rng.choice(len(GLYPHS), p=_GLYPH_PROBS))]
        size_class = int(rng.choice(3, p=_SIZE_CLASS_PROBS))
        if size_class == 2 and any(spec[1] == 2 for spec in specs):
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
    specs.sort(key=lambda spec: spec[1] != 2)
    for category, _, w, h in specs:
        glyph = CLASS_GLYPHS[category]
        rgb, mask = render_glyph(glyph, w, h)
        for attempt in range(3 * _PLACEMENT_TRIES):
            if attempt > 0 and attempt % _PLACEMENT_TRIES == 0:
                # Shrink what does not fit (e.g. a large vehicle in a thin band).
                w = max(_MIN_BOX_SIDE, int(w * 0.75))
                h = max(_MIN_BOX_SIDE, int(h * 0.75))
                rgb, mask = render_glyph(glyph, w, h)
            if objects and rng.random() < 0.3:
                # Next to an earlier object, to create partial occlusion.
                other = objects[int(rng.integers(len(objects)))]["bbox"]
                cx = other[0] + rng.uniform(-0.2, 1.2) * other[2]
                cy = other[1] + rng.uniform(-0.2, 1.2) * other[3]
                x0, y0 = int(round(cx - w / 2)), int(round(cy - h / 2))
            else:
                x0 = int(rng.integers(0, width - w + 1))
                y0 = int(rng.integers(0, height - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if _fits(box, mask, category, label, road_integral, owner, objects, moon_box):
                break
        else:
            continue
        # Accepted: draw it and charge the pixels it hides to the objects below.
        hidden = owner[y0 : y0 + h, x0 : x0 + w][mask]
        for j, count in enumerate(np.bincount(hidden[hidden >= 0], minlength=len(objects))):
            objects[j]["visible"] -= int(count)
        owner[y0 : y0 + h, x0 : x0 + w][mask] = len(objects)
        image[y0 : y0 + h, x0 : x0 + w][mask] = rgb[mask]
        label[y0 : y0 + h, x0 : x0 + w][mask] = THING_CLASSES.index(category) + 1
        ys, xs = np.nonzero(mask)
        full_area = int(mask.sum())
        objects.append(
            {
                "category_id": THING_CLASSES.index(category) + 1,
                "box": box,
                "bbox": [
                    x0 + int(xs.min()),
                    y0 + int(ys.min()),
                    int(xs.max() - xs.min()) + 1,
                    int(ys.max() - ys.min()) + 1,
                ],
                "full_area": full_area,
                "visible": full_area,
                "ring": _grow(box, CONTEXT_MARGIN, height, width) if glyph == "vehicle" else None,
            }
        )

    for j, obj in enumerate(objects):
        obj["mask"] = owner == j
        for key in ("visible", "box", "ring"):
            del obj[key]
    return {
        "image": np.clip(np.round(image), 0, 255).astype(np.uint8),
        "label": label,
        "objects": objects,
        "moon": has_moon,
    }


def generate_synthetic_dataset(root: str, *, split: str, num_images: int, seed: int) -> str:
    """
    Generate one split of the synthetic dataset (see the module docstring for the layout), or do
    nothing if ``<root>/ion_synth/<split>/COMPLETE.json`` records the same generator version,
    split, size and seed.

    The output is a function of ``(split, num_images, seed)`` and the generator version: the
    same arguments write a byte-identical json and identical label maps. Image ``i`` depends on
    ``(split, seed, i)`` only.

    Args:
        root (str): datasets root directory (e.g. ``$DETECTRON2_DATASETS``).
        split (str): split directory name, e.g. "train" or "val"; it also seeds the images.
        num_images (int): number of images (>= 1).
        seed (int): generator seed (>= 0).

    Returns:
        str: path of the COCO instances json.
    """
    _validate(split, num_images, seed)
    paths = _paths(root, split)
    expected = _marker_content(split, num_images, seed)
    previous = _read_json(paths["marker"])
    if previous == expected and os.path.isfile(paths["json_file"]):
        logger.debug(f"ion_synth split {split!r} under {root!r} is complete; skipping.")
        return paths["json_file"]

    if previous is not None:
        logger.warning(
            f"ion_synth split {split!r} under {root!r} was generated with {previous}; "
            f"generating it again with {expected}."
        )
        os.remove(paths["marker"])
    for key in ("image_root", "sem_seg_root"):
        os.makedirs(paths[key], exist_ok=True)
    os.makedirs(os.path.dirname(paths["json_file"]), exist_ok=True)
    logger.info(
        f"Generating ion_synth split {split!r}: {num_images} images, seed {seed}, under {root!r}."
    )

    images, annotations = [], []
    for index in tqdm(range(num_images), desc=f"ion_synth {split}", unit="img"):
        sample = _render_sample(split, seed, index)
        file_name = f"{index:06d}.png"
        _atomic_save_png(os.path.join(paths["image_root"], file_name), sample["image"])
        _atomic_save_png(os.path.join(paths["sem_seg_root"], file_name), sample["label"])
        height, width = sample["label"].shape
        images.append({"id": index + 1, "file_name": file_name, "height": height, "width": width})
        for obj in sample["objects"]:
            rle = mask_util.encode(np.asfortranarray(obj["mask"].astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": obj["category_id"],
                    "bbox": obj["bbox"],
                    "area": int(obj["mask"].sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                }
            )

    # Files of a previous, larger generation of this split.
    for key in ("image_root", "sem_seg_root"):
        for name in os.listdir(paths[key]):
            match = re.fullmatch(r"(\d{6})\.png", name)
            if match and int(match.group(1)) >= num_images:
                os.remove(os.path.join(paths[key], name))

    coco = {
        "info": {
            "description": "ion_d2 synthetic context/scale detection dataset",
            "version": str(GENERATOR_VERSION),
            "split": split,
            "seed": seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {
                "id": i + 1,
                "name": name,
                "supercategory": "context" if name in CONTEXT_CLASSES else "appearance",
            }
            for i, name in enumerate(THING_CLASSES)
        ],
    }
    _atomic_write_bytes(paths["json_file"], json.dumps(coco).encode("utf-8"))
    _atomic_write_bytes(paths["marker"], json.dumps(expected, sort_keys=True).encode("utf-8"))
    logger.info(f"Wrote {len(images)} images, {len(annotations)} objects: {paths['json_file']}")
    return paths["json_file"]


def _load_split(
    dataset_name: str, root: str, split: str, num_images: int, seed: int
) -> List[Dict[str, Any]]:
    """Generate the split if needed, then load it as detectron2 dataset dicts."""
    json_file = generate_synthetic_dataset(root, split=split, num_images=num_images, seed=seed)
    paths = _paths(root, split)
    dicts = load_coco_json(json_file, paths["image_root"], dataset_name=dataset_name)
    for d in dicts:
        d["sem_seg_file_name"] = os.path.join(
            paths["sem_seg_root"], os.path.basename(d["file_name"])
        )
    return dicts


def _default_root() -> str:
    # As detectron2's builtin datasets (detectron2/data/datasets/builtin.py).
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_ion_synthetic(
    root: Optional[str] = None,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = DEFAULT_SEED,
    name_prefix: str = "ion_synth",
) -> Tuple[str, str]:
    """
    Register the train and val splits as ``<name_prefix>_train`` and ``<name_prefix>_val``
    (by default :data:`TRAIN_DATASET_NAME` and :data:`VAL_DATASET_NAME`).

    Registration is lazy: the data is generated (:func:`generate_synthetic_dataset`, into
    :func:`split_dir_name`'s directory) the first time ``DatasetCatalog.get`` is called, then
    loaded with ``load_coco_json``; each dict also gets ``sem_seg_file_name``.

    Registering a name again with the same arguments does nothing; registering it with other
    arguments, or a name that something else registered, raises ``ValueError`` (remove it first
    with ``DatasetCatalog.remove`` and ``MetadataCatalog.remove``).

    Args:
        root (str or None): datasets root; None means ``$DETECTRON2_DATASETS`` or "datasets",
            like detectron2's builtin datasets.
        num_train (int): number of training images.
        num_val (int): number of validation images.
        seed (int): generator seed of both splits (their images differ: the split name is part
            of each image's seed).
        name_prefix (str): prefix of the registered names.

    Returns:
        tuple[str, str]: the registered train and val dataset names.
    """
    root = _default_root() if root is None else root
    # Check both names before registering either, so that an error leaves nothing half done.
    to_register = []
    for split, num_images in (("train", num_train), ("val", num_val)):
        name = f"{name_prefix}_{split}"
        directory = split_dir_name(split, num_images, seed)
        _validate(directory, num_images, seed)
        params = {"root": root, **_marker_content(directory, num_images, seed)}
        previous = (
            MetadataCatalog.get(name).get("ion_synth_params")
            if name in MetadataCatalog.list()
            else None
        )
        if name in DatasetCatalog.list():
            if previous == params:
                logger.debug(f"Dataset {name!r} is already registered with the same arguments.")
                continue
            raise ValueError(
                f"Dataset {name!r} is already registered "
                + (f"with {previous}" if previous else "by something other than ion_d2")
                + f", not {params}. Pick another name_prefix, or call "
                f"DatasetCatalog.remove({name!r}) and MetadataCatalog.remove({name!r}) first."
            )
        if previous is not None and previous != params:
            raise ValueError(
                f"MetadataCatalog still holds metadata of {name!r} for {previous}, not {params}; "
                f"call MetadataCatalog.remove({name!r}) first."
            )
        to_register.append((name, directory, num_images, params))

    for name, directory, num_images, params in to_register:
        paths = _paths(root, directory)
        DatasetCatalog.register(
            name, functools.partial(_load_split, name, root, directory, num_images, seed)
        )
        MetadataCatalog.get(name).set(
            thing_classes=list(THING_CLASSES),
            thing_colors=[list(c) for c in THING_COLORS],
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(THING_CLASSES))},
            stuff_classes=list(SEM_SEG_CLASSES),
            stuff_colors=[list(c) for c in SEM_SEG_COLORS],
            num_sem_seg_classes=len(SEM_SEG_CLASSES),
            context_classes=list(CONTEXT_CLASSES),
            json_file=paths["json_file"],
            image_root=paths["image_root"],
            sem_seg_root=paths["sem_seg_root"],
            evaluator_type="coco",
            ignore_label=IGNORE_LABEL,
            ion_synth_params=params,
        )
    return f"{name_prefix}_train", f"{name_prefix}_val"
