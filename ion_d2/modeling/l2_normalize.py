"""
Section 3.1's "L2-normalized": :func:`l2_normalize_rois`, Table 5's modes, which
:class:`~ion_d2.modeling.skip_pooling.IONSkipPooler` applies to each pooled feature before it
concatenates and re-scales them.
"""

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

__all__ = ["NORM_EPS", "NORM_MODES", "inverse_l2_norms", "l2_norms", "l2_normalize_rois"]

NORM_MODES = ("roi", "location", "none")
# Smallest norm an L2 normalisation divides by (every path uses it).
NORM_EPS = 1e-12


def l2_norms(x: torch.Tensor, mode: str, eps: float = NORM_EPS) -> Optional[torch.Tensor]:
    """
    What :func:`l2_normalize_rois` divides ``x`` by (each norm at least ``eps``).

    Args:
        x (Tensor): pooled features of shape (R, C, H, W).
        mode (str): one of :data:`NORM_MODES`.

    Returns:
        Tensor or None: (R, 1, 1, 1) for "roi", (R, 1, H, W) for "location"; None for "none".
    """
    if mode == "none":
        return None
    if mode == "roi":
        return x.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None, None]
    if mode == "location":
        return x.norm(dim=1, keepdim=True).clamp(min=eps)
    raise ValueError(f"Unknown L2 normalisation mode {mode!r}; expected one of {NORM_MODES}.")


class _InverseNorms(torch.autograd.Function):
    """``1 / l2_norms(x, mode, eps)`` with its gradient in one pass over ``x``: the norm's
    ``n = max(|x|, eps)`` gives ``d(1/n)/dx = -x / n^3`` where ``|x| > eps`` and 0 elsewhere.
    Autograd's chain through the norm, the clamp and the reciprocal takes three passes."""

    @staticmethod
    def forward(ctx, x, mode, eps):
        norms = l2_norms(x, mode, eps)
        inv = norms.reciprocal()
        ctx.save_for_backward(x, inv, norms > eps)
        return inv

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, inv, unclamped = ctx.saved_tensors
        # Where the norm was clamped, no gradient (a norm of exactly eps, which torch.clamp
        # passes, is taken as clamped: the two cannot be told apart after the clamp).
        coef = (grad * inv.pow(3)).neg_().masked_fill_(~unclamped, 0.0)
        return x * coef, None, None


def inverse_l2_norms(x: torch.Tensor, mode: str, eps: float = NORM_EPS) -> Optional[torch.Tensor]:
    """
    ``1 / l2_norms(x, mode, eps)`` (None for "none"), equal in value; its gradient with
    respect to ``x`` in one pass instead of autograd's three (equal up to float rounding,
    tests/test_skip_pooling.py).
    """
    if mode == "none":
        return None
    # An unknown mode: l2_norms raises (on either path).
    if not (torch.is_grad_enabled() and x.requires_grad):
        return l2_norms(x, mode, eps).reciprocal()
    return _InverseNorms.apply(x, mode, eps)


def l2_normalize_rois(x: torch.Tensor, mode: str, eps: float = NORM_EPS) -> torch.Tensor:
    """
    L2-normalise pooled ROI features (Table 5).

    Args:
        x (Tensor): pooled features of shape (R, C, H, W).
        mode (str): "roi" divides each ROI by the norm of all its C x H x W entries (the
            paper's default, "sum over all entries"); "location" divides each spatial cell by
            the norm of its C channels (ParseNet, "sum across channels"); "none" returns x.

    Returns:
        Tensor: same shape as x.
    """
    norms = l2_norms(x, mode, eps)
    return x if norms is None else x / norms
