"""
The IRNN's directional scans (section 3.2): ION's own operators, used by :class:`IRNN`.

One direction of an IRNN layer moves along the rows ("right", "left") or columns ("down", "up")
of its input-to-hidden map ``x`` and computes, at step ``t`` of each line,

    ``h_t = ReLU(Whh @ h_{t-1} + x_t)``, with ``h_{-1} = 0``,

plus, with a first-step bias (section 3.2 item 3), ``b0`` added to ``x`` at ``t = 0``. The
output at each cell is the state after consuming that cell. A learned ``Whh`` is given per
direction; ``Whh = None`` is the case ``Whh = I`` (the recurrent transition removed, section
3.2 item 1, Table 9).

:func:`irnn_scans` runs all directions of a layer at once on a channels-last map and returns
their states side by side, in the layout that the hidden-to-output 1x1 conv reads as the
directions' concatenation; :func:`_irnn_scan` and :func:`_irnn_scan_identity` (for tests) are
one direction on an (N, C, H, W) map. While ``torch.jit.trace`` records, the step loop runs as
the scripted loop of :mod:`.irnn_scan_scripted`.

Every function takes each image's valid cells (:mod:`ion_d2.modeling.padding`): a scan then
ignores the batch's padding, starts at each image's own edge (``b0`` at its own first cell, e.g.
its last valid column for "left") and returns 0 outside the image.
"""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..padding import valid_cell_mask
from .irnn_scan_scripted import _scripted_step_scans

__all__ = [
    "IRNN_DIRECTIONS",
    "IDENTITY_SCAN_METHODS",
    "irnn_scans",
]

#: Scan directions of a 4-direction IRNN layer, in the order their hidden maps are concatenated.
IRNN_DIRECTIONS = ("right", "left", "down", "up")

#: How a scan with ``Whh = I`` is computed: "step" (a loop over the steps, as a learned ``Whh``),
#: "closed_form" (prefix sums, no loop) or "auto" (the faster of the two on the input's device).
IDENTITY_SCAN_METHODS = ("auto", "step", "closed_form")


def irnn_scans(
    x: Tensor,
    directions: Sequence[str],
    whh: Optional[Tensor] = None,
    first_step_bias: Optional[Tensor] = None,
    valid_counts: Optional[Tensor] = None,
    identity_method: str = "auto",
) -> Tensor:
    """
    The directional scans of one IRNN layer, all directions at once, in a channels-last layout.

    All rows (for "right"/"left") or columns (for "down"/"up") of all images advance together:
    with a learned ``Whh`` each step is a single ``(N*H, C) x (C, C)`` (or ``(N*W, C) x (C, C)``)
    matrix multiply, so the Python loop has W (or H) iterations per direction, not N*H*W. The
    output starts as a copy of the input and each step turns its cells into states in place,
    so the output needs no stacking nor layout change; a custom backward runs the same loop in
    reverse and computes ``Whh``'s gradient as one matrix multiply over the whole map.

    Args:
        x (Tensor): (N, H, W, K, C) input-to-hidden activations, channels last: K = 1, one input
            shared by every direction, or K = len(directions), ``x[..., d, :]`` the input of
            direction d.
        directions (list[str]): each one of :data:`IRNN_DIRECTIONS`: "right" (along W, left to
            right), "left" (along W, right to left), "down" (along H, top to bottom) or "up"
            (along H, bottom to top).
        whh (Tensor or None): (D, C, C) recurrent transition of each direction (D =
            len(directions)); the new state is ``whh[d] @ h`` for a column vector ``h``. None:
            ``Whh = I`` for every direction.
        first_step_bias (Tensor or None): (D, C) bias ``b0`` of each direction, added to ``x``
            at the first step of the scan, or None.
        valid_counts (Tensor or None): (N, 2) long, the rows and columns of each image's valid
            cells (:func:`ion_d2.modeling.padding.valid_cell_counts`); None: the whole map is valid.
        identity_method (str): with ``whh`` None, one of :data:`IDENTITY_SCAN_METHODS`.

    Returns:
        Tensor: (N, H, W, D, C) contiguous, ``[..., d, :]`` the hidden states of direction d; 0
        outside the valid cells. Viewed as (N, H, W, D*C) it is the directions' concatenation
        on channels, channels last.
    """
    directions = tuple(directions)
    for direction in directions:
        _check_direction(direction)
    if x.dim() != 5 or x.shape[3] not in (1, len(directions)):
        raise ValueError(
            f"irnn_scans got x of shape {tuple(x.shape)}; expected (N, H, W, K, C) with K = 1 "
            f"(shared input) or K = {len(directions)} (one input per direction)."
        )
    channels = x.shape[-1]
    if whh is not None and whh.shape != (len(directions), channels, channels):
        raise ValueError(
            f"irnn_scans got whh of shape {tuple(whh.shape)}; expected "
            f"{(len(directions), channels, channels)} (one C x C matrix per direction) or None."
        )
    if first_step_bias is not None and first_step_bias.shape != (len(directions), channels):
        raise ValueError(
            f"irnn_scans got first_step_bias of shape {tuple(first_step_bias.shape)}; expected "
            f"{(len(directions), channels)} or None."
        )
    if identity_method not in IDENTITY_SCAN_METHODS:
        raise ValueError(
            f"Unknown identity_method {identity_method!r}; expected one of "
            f"{IDENTITY_SCAN_METHODS}."
        )

    outside = None
    if valid_counts is not None:
        outside = ~valid_cell_mask(valid_counts, x.shape[1], x.shape[2])[:, 0, :, :, None, None]
        # Zeroed outside the valid cells, the input keeps h = 0 in the padding before an image
        # (ReLU(Whh @ 0 + 0) = 0), so each image's scan starts at its own edge. Masked once,
        # before the directions share it.
        x = x.masked_fill(outside, 0.0)
    if first_step_bias is not None:
        x = _add_first_step_bias(x, directions, first_step_bias, valid_counts)

    if whh is None and _identity_closed_form(identity_method, x.device):
        h = torch.stack(
            [
                _identity_closed_form_scan(x[..., d if x.shape[3] > 1 else 0, :], direction)
                for d, direction in enumerate(directions)
            ],
            dim=3,
        )
        return h if outside is None else h.masked_fill(outside, 0.0)
    if whh is not None and whh.dtype != x.dtype:
        # Under autocast the input-to-hidden conv gives a lower precision than Whh's; the
        # in-place steps are not autocast, so Whh is cast as autocast casts an addmm's inputs.
        whh = whh.to(x.dtype)
    if torch.jit.is_tracing():
        # A traced Python loop would keep the traced map's number of steps, and _StepScans
        # would be a Python call that torch.jit.save refuses: a scripted loop instead.
        codes = [IRNN_DIRECTIONS.index(d) for d in directions]
        return _scripted_step_scans()(x, whh, codes, outside)
    return _StepScans.apply(x, whh, directions, outside)


def _irnn_scan(
    x: Tensor,
    whh: Tensor,
    direction: str,
    first_step_bias: Optional[Tensor] = None,
    valid_counts: Optional[Tensor] = None,
) -> Tensor:
    """
    One direction of an IRNN with a learned recurrent transition (:func:`irnn_scans` on an
    (N, C, H, W) map).

    Args:
        x (Tensor): (N, C, H, W) input-to-hidden activations.
        whh (Tensor): (C, C) recurrent transition; the new state is ``whh @ h`` for a column
            vector ``h``.
        direction (str): one of :data:`IRNN_DIRECTIONS`.
        first_step_bias (Tensor or None): (C,) bias ``b0`` added to ``x`` at the first step of
            the scan, or None.
        valid_counts (Tensor or None): see :func:`irnn_scans`.

    Returns:
        Tensor: (N, C, H, W) hidden states, 0 outside the valid cells.
    """
    b0 = None if first_step_bias is None else first_step_bias[None]
    h = irnn_scans(_to_scan_layout(x), (direction,), whh[None], b0, valid_counts)
    return h[:, :, :, 0].permute(0, 3, 1, 2)


def _irnn_scan_identity(
    x: Tensor,
    direction: str,
    first_step_bias: Optional[Tensor] = None,
    valid_counts: Optional[Tensor] = None,
    method: str = "auto",
) -> Tensor:
    """
    One direction of an IRNN with ``Whh = I``: ``h_t = max(0, h_{t-1} + x_t)``.

    "step" computes it as the learned scan does, one step at a time. "closed_form" uses the
    closed form of this recursion (Lindley's), ``h_t = S_t - min(0, min_{k <= t} S_k)`` with
    ``S_t = x_0 + ... + x_t`` the prefix sum along the direction (``h_t`` restarts from 0 after
    the running minimum of ``S``), with ``torch.cumsum`` / ``torch.cummin`` over the whole map
    at once; "left" and "up" scan the flipped map. Its gradients equal the step loop's (both
    are 1 for the inputs after the last reset and 0 before); its rounding error is that of the
    prefix sums, so it grows with the scan length and the magnitude of ``S``
    (``benchmarks/bench_irnn.py`` measures it). "auto" picks one per device (see
    :func:`_identity_closed_form`).

    Args:
        x (Tensor): (N, C, H, W) input-to-hidden activations.
        direction, first_step_bias, valid_counts: see :func:`_irnn_scan`.
        method (str): one of :data:`IDENTITY_SCAN_METHODS`.

    Returns:
        Tensor: (N, C, H, W) hidden states, 0 outside the valid cells.
    """
    b0 = None if first_step_bias is None else first_step_bias[None]
    h = irnn_scans(_to_scan_layout(x), (direction,), None, b0, valid_counts, method)
    return h[:, :, :, 0].permute(0, 3, 1, 2)


def _identity_closed_form(method: str, device: torch.device) -> bool:
    """Whether a ``Whh = I`` scan on ``device`` uses the closed form (else the step loop)."""
    if method != "auto":
        return method == "closed_form"
    # On a GPU every op is a kernel launch, so the closed form's few whole-map ops beat the step
    # loop's two small ops per step, while on a CPU the step loop wins (bench_irnn.py, 2 threads,
    # 1x512x38x63, 4 directions: forward 8.4 ms vs 120 ms, with backward 25 ms vs 168 ms).
    return device.type != "cpu"


def _check_direction(direction: str) -> None:
    if direction not in IRNN_DIRECTIONS:
        raise ValueError(
            f"Unknown IRNN direction {direction!r}; expected one of {IRNN_DIRECTIONS}."
        )


def _to_scan_layout(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, H, W, 1, C), the layout of :func:`irnn_scans`."""
    return x.permute(0, 2, 3, 1)[:, :, :, None]


def _first_cells(
    direction: str, valid_counts: Optional[Tensor], height: int, width: int, device: torch.device
) -> Tensor:
    """(N or 1, H, W) bool: the first cell of every scan line inside each image's valid cells."""
    if valid_counts is None:
        # torch.stack, not torch.tensor: a trace keeps the sizes' values dynamic then.
        valid_counts = torch.stack([torch.as_tensor(height), torch.as_tensor(width)])
        valid_counts = valid_counts.to(device).view(1, 2)
    rows = torch.arange(height, device=device)[None, :]
    cols = torch.arange(width, device=device)[None, :]
    valid_h, valid_w = valid_counts[:, :1], valid_counts[:, 1:]
    reverse = direction in ("left", "up")
    if direction in ("right", "left"):
        start = cols == (valid_w - 1 if reverse else 0)
        return (rows < valid_h)[:, :, None] & start[:, None, :]
    start = rows == (valid_h - 1 if reverse else 0)
    return start[:, :, None] & (cols < valid_w)[:, None, :]


def _add_first_step_bias(
    x: Tensor, directions: Sequence[str], first_step_bias: Tensor, valid_counts: Optional[Tensor]
) -> Tensor:
    """(N, H, W, D, C): ``x`` plus ``b0`` at each image's own first cell of each direction."""
    _, height, width, _, _ = x.shape
    first = torch.stack(
        [_first_cells(d, valid_counts, height, width, x.device) for d in directions], dim=3
    )
    return torch.where(first[..., None], x + first_step_bias, x)


def _steps(v: Tensor, direction: str) -> List[Tensor]:
    """
    The views of an (N, H, W, C) slice of a contiguous (N, H, W, K, C) tensor that a scan
    visits, in scan order: (N*H, C) columns for "right"/"left", (N*W, C) rows for "down"/"up"
    when N = 1, (N, W, C) rows otherwise (images then do not share one matrix).
    """
    n, height, width, c = v.shape
    if direction in ("right", "left"):
        steps = [v[:, :, t].view(n * height, c) for t in range(width)]
    elif n == 1:
        steps = [v[0, t] for t in range(height)]
    else:
        steps = [v[:, t] for t in range(height)]
    if direction in ("left", "up"):
        steps.reverse()
    return steps


def _with_predecessor(g: Tensor, h: Tensor, direction: str, dim: int) -> Tuple[Tensor, Tensor]:
    """
    ``g`` at the cells of an (N, H, W, C) map that have a predecessor in the scan along ``dim``,
    and ``h`` at their predecessors.
    """
    length = g.shape[dim]
    if direction in ("right", "down"):
        return g.narrow(dim, 1, length - 1), h.narrow(dim, 0, length - 1)
    return g.narrow(dim, 0, length - 1), h.narrow(dim, 1, length - 1)


class _StepScans(torch.autograd.Function):
    """
    :func:`irnn_scans` as a loop over the steps, in place: the forward turns a copy of the
    input into the states one step at a time; the backward runs the loop in reverse on a copy
    of the output's gradient. (Autograd cannot differentiate in-place writes into one buffer:
    every write bumps the version of the states saved for the previous steps.)
    """

    @staticmethod
    def forward(ctx, x, whh, directions, outside):
        n, height, width, k, c = x.shape
        # Every state starts as its input: each step then adds Whh @ h_{t-1} in place.
        h = x.expand(n, height, width, len(directions), c).clone(
            memory_format=torch.contiguous_format
        )
        for d, direction in enumerate(directions):
            hs = _steps(h[:, :, :, d], direction)
            hs[0].clamp_(min=0)
            w = None if whh is None else whh[d].t()
            for t in range(1, len(hs)):
                if w is None:
                    hs[t].add_(hs[t - 1])
                elif hs[t].dim() == 2:
                    hs[t].addmm_(hs[t - 1], w)
                else:
                    hs[t].baddbmm_(hs[t - 1], w.expand(hs[t].shape[0], -1, -1))
                hs[t].clamp_(min=0)
        if outside is not None:
            # After an image (in scan order) the padding's states are not 0; they feed no
            # valid cell, so zeroing them here leaves the valid cells' gradients unchanged.
            h.masked_fill_(outside, 0.0)
        ctx.directions = directions
        ctx.sum_input_grads = k == 1 and len(directions) > 1
        ctx.save_for_backward(h, whh)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h):
        h, whh = ctx.saved_tensors
        # g becomes the gradient of each cell's pre-activation Whh @ h_{t-1} + x_t.
        g = grad_h.clone(memory_format=torch.contiguous_format)
        # ReLU's gradient: 1 where its output is positive, 0 elsewhere (as a float, multiplying
        # is faster than masked_fill_ on a CPU).
        live = (h > 0).to(g.dtype)
        need_whh = whh is not None and ctx.needs_input_grad[1]
        grad_whh = torch.zeros_like(whh) if need_whh else None
        for d, direction in enumerate(ctx.directions):
            gs = _steps(g[:, :, :, d], direction)
            lives = _steps(live[:, :, :, d], direction)
            gs[-1].mul_(lives[-1])
            for t in range(len(gs) - 2, -1, -1):
                # h_t reaches the loss through its own output and through step t + 1.
                if whh is None:
                    gs[t].add_(gs[t + 1])
                elif gs[t].dim() == 2:
                    gs[t].addmm_(gs[t + 1], whh[d])
                else:
                    gs[t].baddbmm_(gs[t + 1], whh[d].expand(gs[t].shape[0], -1, -1))
                gs[t].mul_(lives[t])
            if need_whh:
                dim = 2 if direction in ("right", "left") else 1
                if h.shape[dim] > 1:
                    # sum over every step of g_t^T h_{t-1}, as one matrix multiply
                    g_cur, h_prev = _with_predecessor(g[:, :, :, d], h[:, :, :, d], direction, dim)
                    c = h.shape[-1]
                    grad_whh[d] = g_cur.reshape(-1, c).t() @ h_prev.reshape(-1, c)
        grad_x = g.sum(dim=3, keepdim=True) if ctx.sum_input_grads else g
        return grad_x, grad_whh, None, None


def _identity_closed_form_scan(x: Tensor, direction: str) -> Tensor:
    """The ``Whh = I`` scan of an (N, H, W, C) map in closed form (see _irnn_scan_identity)."""
    dim = 2 if direction in ("right", "left") else 1
    reverse = direction in ("left", "up")
    if reverse:
        x = x.flip(dim)
    prefix = torch.cumsum(x, dim=dim)
    running_min = torch.cummin(prefix, dim=dim).values.clamp(max=0)
    h = prefix - running_min
    return h.flip(dim) if reverse else h
