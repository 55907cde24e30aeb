"""
ion_d2's dropout: the same distribution as ``torch.nn.Dropout``, with masks drawn from random
bits (issue 27).

``torch.nn.Dropout`` draws one Bernoulli value per element, about 9 ns each on the project's
CPUs: at the paper's scale ION's concatenation dropouts (section 3.2 item 2) draw 21 million
per training step, 0.19 s, more than the Fast R-CNN baseline's whole backward pass
(docs/BENCHMARKS.md, "A training step at the paper's scale"). Here each element's keep/drop
draw is 16 bits of one 64-bit random integer (four elements per integer), compared with a
threshold: the generator's ``random_`` fills 64 bits in about the time ``bernoulli_`` takes
for one value, and the comparison writes the scaled float mask in one pass.

An element is dropped with probability ``q = round(p * 2**16) / 2**16`` (``p`` itself for
0.25 and 0.5, within 2**-17 of it otherwise) and a kept element is scaled by ``1 / (1 - q)``,
so that, as with ``torch.nn.Dropout``, the output's expectation is the input. The masks come
from torch's default generator of the input's device, so ``torch.manual_seed`` fixes them; they
are other masks than ``torch.nn.Dropout`` draws for the same seed.
"""

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["IONDropout", "ion_dropout", "dropout_keep_mask", "drop_probability", "memory_order"]

_LEVELS = 1 << 16  # keep/drop draws of 16 bits


def _check_probability(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"Dropout probability must be in [0, 1); got {p}.")


def _dropped_levels(p: float) -> int:
    """Of the 2**16 values of a draw, how many drop the element."""
    return round(p * _LEVELS)


def drop_probability(p: float) -> float:
    """The probability ``q`` with which :func:`ion_dropout` drops an element for ``p``."""
    return _dropped_levels(p) / _LEVELS


def dropout_keep_mask(
    shape: Sequence[int], p: float, *, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """
    The dropout mask of a tensor of ``shape`` (in its contiguous element order):
    ``1 / (1 - q)`` where the element is kept, 0 where it is dropped (``q``:
    :func:`drop_probability`).

    Element ``i``'s draw is the signed 16-bit integer in bits ``16 * (i % 4)`` to
    ``16 * (i % 4) + 15`` of the ``i // 4``-th 64-bit integer the generator draws uniformly over
    all 2**64 values (little-endian: ``torch.Tensor.view(torch.int16)``); the element is kept
    when that draw is at least ``-2**15 + q * 2**16``.
    """
    _check_probability(p)
    numel = 1
    for s in shape:
        numel *= int(s)
    dropped = _dropped_levels(p)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None)  # every 64-bit value equally likely
    draws = words.view(torch.int16)[:numel].view(tuple(shape))
    mask = torch.empty(tuple(shape), dtype=dtype, device=device)
    torch.ge(draws, dropped - (_LEVELS // 2), out=mask)
    return mask.mul_(_LEVELS / (_LEVELS - dropped))


def memory_order(x: Tensor) -> Optional[List[int]]:
    """
    ``x``'s dims from the outermost to the innermost in memory: the permutation for which
    ``x.permute(order)`` is contiguous (``[0, 2, 3, 1]`` for a channels_last map); None when no
    permutation is (a view with gaps or overlaps).
    """
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))  # stable: ties keep dim order
    return order if x.permute(order).is_contiguous() else None


def ion_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """
    ``torch.nn.functional.dropout(x, p, training)`` with the mask of
    :func:`dropout_keep_mask` (a new tensor; ``x`` itself when not training or ``p`` is 0).

    The mask is drawn in ``x``'s memory order (:func:`memory_order`; the contiguous order for
    a view with gaps), so that it lies in memory as ``x`` does: the product, forward and
    backward, is then one pass over memory in order. On a channels_last map (the IRNN's
    concatenation) a contiguous mask made it a strided pass, 5-6x slower (issue 27).
    """
    _check_probability(p)
    if not training or p == 0.0:
        return x
    order = memory_order(x)
    if order is None:
        return x * dropout_keep_mask(x.shape, p, dtype=x.dtype, device=x.device)
    shape = [x.shape[d] for d in order]
    mask = dropout_keep_mask(shape, p, dtype=x.dtype, device=x.device)
    inverse = sorted(range(x.dim()), key=lambda d: order[d])
    return x * mask.permute(inverse)


class IONDropout(nn.Module):
    """:func:`ion_dropout` as a module, in place of ``torch.nn.Dropout(p)``."""

    def __init__(self, p: float):
        super().__init__()
        _check_probability(p)
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return ion_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
