"""
The scene behind the objects of the bundled synthetic dataset: road and water bands, the moon's
place (and the moon where drawn) and clutter.
"""

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from .meta import BACKGROUND_ID, MOON_ID, PALETTE, ROAD_ID, WATER_ID

__all__ = [
    "Box",
    "PLACEMENT_TRIES",
    "box_gap_squared",
    "draw_distractor",
    "draw_moon",
    "draw_scene",
]

# (x0, y0, x1, y1) in pixels, end-exclusive.
Box = Tuple[int, int, int, int]
# Random positions tried for a shape before it is given up (or shrunk, for objects).
PLACEMENT_TRIES = 30


def _triangle_wave(x: np.ndarray) -> np.ndarray:
    # Period 1, range [-1, 1]. Used instead of a sine where labels depend on it: arithmetic and
    # floor are exactly rounded, so label maps are the same on every platform.
    return 4.0 * np.abs(x - np.floor(x) - 0.5) - 1.0


@dataclass
class _Bands:
    """Parallel road/water bands: ``t`` runs across them, ``s`` along them."""

    t: np.ndarray
    s: np.ndarray
    length: float  # extent of the image across the bands
    first_type: int  # 0: the first band is road, 1: water
    boundaries: List[np.ndarray]  # wavy boundary positions along t, as functions of s


def _draw_bands(rng: np.random.Generator, height: int, width: int) -> _Bands:
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
    t, s = (xs, ys) if vertical else (ys, xs)
    boundaries = [
        cuts[k] + amplitude[k] * _triangle_wave(s / period[k] + phase[k])
        for k in range(num_bands - 1)
    ]
    return _Bands(t=t, s=s, length=length, first_type=first_type, boundaries=boundaries)


def _paint_road(rng: np.random.Generator, bands: _Bands, height: int, width: int) -> np.ndarray:
    """Grey asphalt with noise and a dashed lane marking along the middle of each road band."""
    grey = rng.uniform(70.0, 100.0)
    tint = rng.uniform(-6.0, 6.0, size=3)
    road = grey + tint + rng.normal(0.0, 7.0, size=(height, width, 1))
    lane_offset = rng.uniform(0.0, 16.0)
    s, t = bands.s, bands.t
    lane_edges = [np.zeros_like(s)] + bands.boundaries + [np.full_like(s, float(bands.length))]
    for k in range(len(bands.boundaries) + 1):
        if (bands.first_type + k) % 2 != 0:
            continue
        middle = 0.5 * (lane_edges[k] + lane_edges[k + 1])
        dashes = np.floor(s + lane_offset) % 16 < 9
        road[(np.abs(t - middle) < 1.0) & dashes] = PALETTE["lane"]
    return road


def _paint_water(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Blue with wavy ripples and noise."""
    blue = np.array([35.0, 85.0, 160.0]) + rng.uniform(-12.0, 12.0, size=3)
    wavelength = rng.uniform(6.0, 12.0)
    wobble = rng.uniform(30.0, 60.0)
    phase = rng.uniform(0.0, 2 * np.pi)
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    wobbled = ys / wavelength + 0.25 * np.sin(2 * np.pi * xs / wobble + phase)
    ripple = np.sin(2 * np.pi * wobbled)
    water = blue + 16.0 * ripple[..., None] * np.array([0.6, 0.8, 1.0])
    return water + rng.normal(0.0, 5.0, size=(height, width, 1))


def draw_scene(rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Return the road/water background (float RGB) and its region map (ROAD_ID / WATER_ID)."""
    bands = _draw_bands(rng, height, width)
    band = np.zeros((height, width), dtype=np.int64)
    for boundary in bands.boundaries:
        band += bands.t > boundary
    types = (bands.first_type + band) % 2
    region = np.where(types == 0, ROAD_ID, WATER_ID).astype(np.uint8)
    road = _paint_road(rng, bands, height, width)
    water = _paint_water(rng, height, width)
    image = np.where((region == ROAD_ID)[..., None], road, water)
    return image, region


def box_gap_squared(a: Box, b: Box) -> int:
    """Squared Euclidean distance between two boxes; 0 when they overlap. Integer: exact."""
    dx = max(0, max(a[0], b[0]) - min(a[2], b[2]))
    dy = max(0, max(a[1], b[1]) - min(a[3], b[3]))
    return dx * dx + dy * dy


def _distractor_shape(
    rng: np.random.Generator, height: int, width: int
) -> Tuple[str, int, int, Tuple[int, ...], bool]:
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
    return kind, w, h, color, flip


def draw_distractor(
    rng: np.random.Generator, image: np.ndarray, label: np.ndarray, moon_box: Box
) -> None:
    """Draw one clutter shape, labelled background, that is none of the classes."""
    height, width = label.shape
    kind, w, h, color, flip = _distractor_shape(rng, height, width)
    for _ in range(PLACEMENT_TRIES):
        x0 = int(rng.integers(0, width - w + 1))
        y0 = int(rng.integers(0, height - h + 1))
        if box_gap_squared((x0, y0, x0 + w, y0 + h), moon_box) > 4:
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
        patch[...] = PALETTE["tile"]
        mask = np.abs((1.0 - u if flip else u) - v) < 0.18
    patch[mask] = color
    label[y0 : y0 + h, x0 : x0 + w][True if kind == "decoy" else mask] = BACKGROUND_ID


def draw_moon(rng: np.random.Generator, image: np.ndarray, label: np.ndarray, visible: bool) -> Box:
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
    if visible:
        image[y0 : y0 + d, x0 : x0 + d][crescent] = PALETTE["moon"]
        label[y0 : y0 + d, x0 : x0 + d][crescent] = MOON_ID
    return (x0, y0, x0 + d, y0 + d)
