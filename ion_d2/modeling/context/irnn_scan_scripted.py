"""
The IRNN's step loop as TorchScript, which :func:`ion_d2.modeling.context.irnn_scan.irnn_scans`
runs while ``torch.jit.trace`` records a model (:mod:`ion_d2.export`); the comment at that call
says why.
"""

from typing import List, Optional

import torch
from torch import Tensor


def _step_scans_loop(
    x: Tensor, whh: Optional[Tensor], directions: List[int], outside: Optional[Tensor]
) -> Tensor:
    """
    :class:`.irnn_scan._StepScans`' forward without in-place writes, for ``torch.jit.script``:
    the step loop runs over the map's actual size, so a traced model that calls it scans maps of
    every size (:func:`_scripted_step_scans`). ``directions`` are indices into
    :data:`.irnn_scan.IRNN_DIRECTIONS` (0 right, 1 left, 2 down, 3 up).
    """
    n, height, width, k, c = x.shape
    x = x.expand(n, height, width, len(directions), c)
    outs: List[Tensor] = []
    for d, direction in enumerate(directions):
        v = x[:, :, :, d]
        vertical = direction >= 2
        reverse = direction == 1 or direction == 3
        if vertical:
            v = v.transpose(1, 2)  # scan along dim 2 in every direction
        if reverse:
            v = v.flip([2])
        prev = v[:, :, 0].clamp(min=0)
        states: List[Tensor] = [prev]
        for t in range(1, v.shape[2]):
            if whh is None:
                prev = (v[:, :, t] + prev).clamp(min=0)
            else:
                prev = (v[:, :, t] + torch.matmul(prev, whh[d].t())).clamp(min=0)
            states.append(prev)
        h = torch.stack(states, dim=2)
        if reverse:
            h = h.flip([2])
        if vertical:
            h = h.transpose(1, 2)
        outs.append(h)
    h = torch.stack(outs, dim=3)
    if outside is not None:
        h = h.masked_fill(outside, 0.0)
    return h


_SCRIPTED_STEP_SCANS = []


def _scripted_step_scans():
    """:func:`_step_scans_loop` compiled by ``torch.jit.script`` (once, on first use)."""
    if not _SCRIPTED_STEP_SCANS:
        _SCRIPTED_STEP_SCANS.append(torch.jit.script(_step_scans_loop))
    return _SCRIPTED_STEP_SCANS[0]
