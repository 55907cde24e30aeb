"""
The IRNN's directional scans (section 3.2): ION's own operators, used by :class:`IRNN`.

One direction of an IRNN layer moves along the rows ("right", "left") or columns ("down", "up")
of its input-to-hidden map ``x`` and computes, at step ``t`` of each line,

    ``h_t = ReLU(Whh @ h_{t-1} + x_t)``, with ``h_{-1} = 0``,

plus, with a first-step bias (section 3.2 item 3), ``b0`` added to ``x`` at ``t = 0``. The
output at each cell is the state after consuming that cell. :func:`irnn_scan` learns ``Whh``;
:func:`irnn_scan_identity` is the case ``Whh = I`` (the recurrent transition removed, section
3.2 item 1, Table 9).

Both take each image's valid cells (:mod:`ion_d2.padding`): a scan then ignores the batch's
padding, starts at each image's own edge (``b0`` at its own first cell, e.g. its last valid
column for "left") and returns 0 outside the image.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .padding import zero_outside_valid_cells

__all__ = ["IRNN_DIRECTIONS", "irnn_scan", "irnn_scan_identity"]

#: Scan directions of a 4-direction IRNN layer, in the order their hidden maps are concatenated.
IRNN_DIRECTIONS = ("right", "left", "down", "up")


def irnn_scan(
    x: Tensor,
    whh: Tensor,
    direction: str,
    first_step_bias: Optional[Tensor] = None,
    valid_cells: Optional[Tensor] = None,
) -> Tensor:
    """
    One direction of an IRNN with a learned recurrent transition (the recurrence of
    :mod:`ion_d2.irnn_scan`).

    All rows (for "right"/"left") or columns (for "down"/"up") of all images advance together:
    each step is a single ``(N*H, C) x (C, C)`` (or ``(N*W, C) x (C, C)``) matrix multiply, so
    the Python loop has W (or H) iterations, not N*H*W.

    Args:
        x (Tensor): (N, C, H, W) input-to-hidden activations.
        whh (Tensor): (C, C) recurrent transition; the new state is ``whh @ h`` for a column
            vector ``h``.
        direction (str): one of :data:`IRNN_DIRECTIONS`: "right" (along W, left to right),
            "left" (along W, right to left), "down" (along H, top to bottom) or "up" (along H,
            bottom to top).
        first_step_bias (Tensor or None): (C,) bias ``b0`` added to ``x`` at the first step of
            the scan, or None.
        valid_cells (Tensor or None): (N, 2) long, the rows and columns of each image's valid
            cells (:func:`ion_d2.padding.valid_cell_counts`); None: the whole map is valid.

    Returns:
        Tensor: (N, C, H, W) hidden states, 0 outside the valid cells.
    """
    # Zeroed outside the valid cells, the input keeps h = 0 in the padding before an image
    # (ReLU(Whh @ 0 + 0) = 0), so each image's scan starts at its own edge.
    x = zero_outside_valid_cells(x, valid_cells)
    x = _add_first_step_bias(x, direction, first_step_bias, valid_cells)
    return zero_outside_valid_cells(_learned_recurrence(x, whh, direction), valid_cells)


def irnn_scan_identity(
    x: Tensor,
    direction: str,
    first_step_bias: Optional[Tensor] = None,
    valid_cells: Optional[Tensor] = None,
) -> Tensor:
    """
    One direction of an IRNN with ``Whh = I``: ``h_t = max(0, h_{t-1} + x_t)``.

    This is Lindley's recursion, whose closed form is
    ``h_t = S_t - min(0, min_{k <= t} S_k)`` with ``S_t = x_0 + ... + x_t`` the prefix sum along
    the direction (``h_t`` restarts from 0 after the running minimum of ``S``). It is computed
    with ``torch.cumsum`` / ``torch.cummin`` over the whole map at once, without a step loop;
    "left" and "up" scan the flipped map. Gradients equal the step loop's (both are 1 for the
    inputs after the last reset and 0 before). Its rounding error is that of the prefix sums, so
    it grows with the scan length and the magnitude of ``S`` (``benchmarks/bench_irnn.py``
    measures it).

    Args:
        x (Tensor): (N, C, H, W) input-to-hidden activations.
        direction, first_step_bias, valid_cells: see :func:`irnn_scan`.

    Returns:
        Tensor: (N, C, H, W) hidden states, 0 outside the valid cells.
    """
    # A reversed scan of an image narrower than the map first crosses the padding: with its
    # input zeroed, S stays 0 there and the recursion enters the image from h = 0.
    x = zero_outside_valid_cells(x, valid_cells)
    x = _add_first_step_bias(x, direction, first_step_bias, valid_cells)
    return zero_outside_valid_cells(_identity_recurrence(x, direction), valid_cells)


def _scan_dim(direction: str) -> Tuple[int, bool]:
    """Return (the dim of an (N, C, H, W) tensor a scan moves along, whether it moves backwards)."""
    if direction == "right":
        return 3, False
    if direction == "left":
        return 3, True
    if direction == "down":
        return 2, False
    if direction == "up":
        return 2, True
    raise ValueError(f"Unknown IRNN direction {direction!r}; expected one of {IRNN_DIRECTIONS}.")


def _first_cells(direction: str, valid_cells: Tensor, height: int, width: int) -> Tensor:
    """(N, 1, H, W) bool: the first cell of every scan line inside each image's valid cells."""
    dim, reverse = _scan_dim(direction)
    rows = torch.arange(height, device=valid_cells.device)[None, :]
    cols = torch.arange(width, device=valid_cells.device)[None, :]
    valid_h, valid_w = valid_cells[:, :1], valid_cells[:, 1:]
    if dim == 3:
        start = cols == (valid_w - 1 if reverse else 0)
        first = (rows < valid_h)[:, :, None] & start[:, None, :]
    else:
        start = rows == (valid_h - 1 if reverse else 0)
        first = start[:, :, None] & (cols < valid_w)[:, None, :]
    return first[:, None]


def _add_first_step_bias(
    x: Tensor, direction: str, first_step_bias: Optional[Tensor], valid_cells: Optional[Tensor]
) -> Tensor:
    """``x`` plus ``b0`` at each image's own first cell of the scan (None: the map's edge)."""
    if first_step_bias is None:
        return x
    n, _, height, width = x.shape
    if valid_cells is None:
        valid_cells = torch.tensor([[height, width]], device=x.device).expand(n, 2)
    first = _first_cells(direction, valid_cells, height, width)
    return torch.where(first, x + first_step_bias.view(1, -1, 1, 1), x)


def _learned_recurrence(x: Tensor, whh: Tensor, direction: str) -> Tensor:
    """:func:`irnn_scan` over the whole map, ``b0`` already in ``x``."""
    dim, reverse = _scan_dim(direction)
    n, c, height, width = x.shape
    # Sequence-first, channels-last layout: seq[t] is a contiguous (batch, C) slab, where the
    # batch holds every row (or column) of every image.
    if dim == 3:
        seq = x.permute(3, 0, 2, 1).reshape(width, n * height, c)
    else:
        seq = x.permute(2, 0, 3, 1).reshape(height, n * width, c)
    length = seq.shape[0]
    whh_t = whh.t()
    steps = range(length - 1, -1, -1) if reverse else range(length)
    states: List[Optional[Tensor]] = [None] * length
    h: Optional[Tensor] = None
    for t in steps:
        # The first step has h_{-1} = 0, so Whh @ h_{-1} vanishes.
        h = torch.relu(seq[t] if h is None else torch.addmm(seq[t], h, whh_t))
        states[t] = h
    out = torch.stack(states, dim=0)  # (L, batch, C)
    if dim == 3:
        return out.view(width, n, height, c).permute(1, 3, 2, 0)
    return out.view(height, n, width, c).permute(1, 3, 0, 2)


def _identity_recurrence(x: Tensor, direction: str) -> Tensor:
    """:func:`irnn_scan_identity` over the whole map, ``b0`` already in ``x``."""
    dim, reverse = _scan_dim(direction)
    if reverse:
        x = x.flip(dim)
    prefix = torch.cumsum(x, dim=dim)
    running_min = torch.cummin(prefix, dim=dim).values.clamp(max=0)
    h = prefix - running_min
    return h.flip(dim) if reverse else h
