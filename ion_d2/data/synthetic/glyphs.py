"""
Object glyphs of the bundled synthetic dataset. A glyph depends on its box size only, which makes
the two classes drawn with one glyph pixel-identical inside their boxes.
"""

from typing import Tuple

import numpy as np

from .meta import GLYPHS, LOCAL_GLYPH, PALETTE

__all__ = ["render_glyph"]


def _paint(rgb: np.ndarray, region: np.ndarray, color: Tuple[int, int, int]) -> None:
    rgb[np.broadcast_to(region, rgb.shape[:2])] = color


def _paint_tile(rgb: np.ndarray) -> np.ndarray:
    """The opaque tile of "vehicle" and "orb", filling the box; returns the (full) mask."""
    height, width = rgb.shape[:2]
    full = np.ones((height, width), dtype=bool)
    _paint(rgb, full, PALETTE["tile"])
    if min(width, height) >= 12:
        edge = np.zeros((height, width), dtype=bool)
        edge[[0, -1], :] = True
        edge[:, [0, -1]] = True
        _paint(rgb, edge, PALETTE["tile_edge"])
    return full


def _paint_vehicle(rgb: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    mask = _paint_tile(rgb)
    px, py = (u - 0.5) * width, (v - 0.5) * height
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
    _paint(rgb, body | cabin, PALETTE["vehicle_body"])
    _paint(rgb, window, PALETTE["vehicle_window"])
    _paint(rgb, wheels, PALETTE["vehicle_wheel"])
    return mask


def _paint_orb(rgb: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    mask = _paint_tile(rgb)
    px, py = (u - 0.5) * width, (v - 0.5) * height
    side = min(width, height)
    r2 = px**2 + py**2
    _paint(rgb, r2 <= (0.44 * side) ** 2, PALETTE["orb_edge"])
    _paint(rgb, r2 <= (0.36 * side) ** 2, PALETTE["orb"])
    highlight = (px + 0.12 * side) ** 2 + (py + 0.13 * side) ** 2 <= (0.11 * side) ** 2
    _paint(rgb, highlight, PALETTE["orb_highlight"])
    return mask


def _paint_sign(rgb: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Regular octagon touching the box sides, with a white bar.
    au, av = np.abs(u - 0.5), np.abs(v - 0.5)
    mask = np.broadcast_to(au + av <= 0.5 * 2**0.5, rgb.shape[:2]).copy()
    _paint(rgb, mask, PALETTE["sign"])
    _paint(rgb, (av <= 0.09) & (au <= 0.3), PALETTE["sign_bar"])
    return mask


def _paint_ring(rgb: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = (u - 0.5) ** 2 + (v - 0.5) ** 2
    mask = np.broadcast_to((r2 <= 0.25) & (r2 >= 0.27**2), rgb.shape[:2]).copy()
    _paint(rgb, mask, PALETTE["ring"])
    return mask


def _paint_flyer(rgb: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # The tile with a chevron ("V"): the kite/bird pair's glyph (the local variant).
    mask = _paint_tile(rgb)
    chevron = (np.abs(v - 0.3 - 0.8 * np.abs(u - 0.5)) <= 0.13) & (np.abs(u - 0.5) <= 0.4)
    _paint(rgb, chevron, PALETTE["flyer"])
    return mask


_GLYPH_PAINTERS = {
    "vehicle": _paint_vehicle,
    "orb": _paint_orb,
    "sign": _paint_sign,
    "ring": _paint_ring,
    LOCAL_GLYPH: _paint_flyer,
}


def render_glyph(glyph: str, width: int, height: int) -> Tuple[np.ndarray, np.ndarray]:
    """
    Draw one object glyph filling a ``height x width`` box.

    The result depends on ``(glyph, width, height)`` only, which is what makes the two classes
    that share a glyph (see :data:`CLASS_GLYPHS`) pixel-identical inside their boxes. "vehicle",
    "orb" and "flyer" are drawn on an opaque tile that fills the whole box, so no scene pixel
    shows inside their box; "sign" (an octagon) and "ring" (an annulus) let the scene show through.

    Args:
        glyph (str): one of :data:`GLYPHS` or :data:`LOCAL_GLYPH`.
        width (int): box width in pixels (>= 1).
        height (int): box height in pixels (>= 1).

    Returns:
        tuple[np.ndarray, np.ndarray]: ``rgb`` (uint8, ``(height, width, 3)``; zero outside the
        mask) and ``mask`` (bool, ``(height, width)``): the object's pixels.
    """
    if glyph not in _GLYPH_PAINTERS:
        raise ValueError(f"glyph={glyph!r} is not one of {GLYPHS + (LOCAL_GLYPH,)}.")
    if width < 1 or height < 1:
        raise ValueError(f"width={width}, height={height}: both must be >= 1.")
    # Pixel centres in box-normalised coordinates (u right, v down).
    u = ((np.arange(width, dtype=np.float64) + 0.5) / width)[None, :]
    v = ((np.arange(height, dtype=np.float64) + 0.5) / height)[:, None]
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    mask = _GLYPH_PAINTERS[glyph](rgb, u, v)
    rgb[~mask] = 0
    return rgb, mask
