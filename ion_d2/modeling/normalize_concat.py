"""
Section 3.1's "L2-normalized, concatenated, re-scaled": :func:`l2_normalize_rois` (Table 5's
modes) and, for training, :func:`normalize_scale_concat`, the "roi" mode with the scale and the
concatenation as one autograd function.

The plain computation, per pooled feature ``p`` (R, C, H, W) with per-ROI norm ``n = ||p||``
(over C x H x W, clamped at ``eps``), is ``concat_i(p_i / n_i) * scale``: autograd then keeps
the quotients, the concatenation and the product, and its backward makes about ten passes over
the R x sum(C) x H x W descriptors (the product's two gradients, the quotient's two, the norm's).
:class:`NormalizeScaleConcat` writes ``p_i * (scale_i / n_i)`` straight into its channels of
one channels-last concatenation (the layout the 1x1 reduction reads fastest) and computes the
gradients in closed form, with ``u = p / n`` and ``a = g * scale``:

    dL/dscale[c] = sum over ROIs and cells of g[c] * u[c]
    dL/dp        = (a - u * <a, u>) / n        (<., .> per ROI; just a / n where n < eps)

equal to autograd's up to float rounding (tests/test_skip_pooling.py checks both against it).
"""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["NORM_EPS", "NORM_MODES", "l2_normalize_rois", "normalize_scale_concat"]

NORM_MODES = ("roi", "location", "none")
# Smallest norm an L2 normalisation divides by (every path uses it).
NORM_EPS = 1e-12


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
    if mode == "none":
        return x
    if mode == "roi":
        norm = x.flatten(1).norm(dim=1).clamp(min=eps)
        return x / norm[:, None, None, None]
    if mode == "location":
        return F.normalize(x, p=2.0, dim=1, eps=eps)
    raise ValueError(f"Unknown L2 normalisation mode {mode!r}; expected one of {NORM_MODES}.")


def normalize_scale_concat(pooled: List[Tensor], scale: Tensor, eps: float) -> Tensor:
    """
    Args:
        pooled (list[Tensor]): per feature, (R, C_i, H, W) pooled ROI features.
        scale (Tensor): (sum C_i,) per-channel scale (a parameter or a buffer).
        eps (float): the smallest norm divided by.

    Returns:
        Tensor: (R, sum C_i, H, W) in channels-last memory, ``cat(p_i / ||p_i||) * scale``.
    """
    return NormalizeScaleConcat.apply(scale, eps, *pooled)


def _norms(p: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """Per ROI: 1 / max(||p||, eps), and whether ||p|| >= eps (where the norm has a gradient)."""
    norm = torch.linalg.vector_norm(p.flatten(1), dim=1)
    return norm.clamp(min=eps).reciprocal(), norm >= eps


class NormalizeScaleConcat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale: Tensor, eps: float, *pooled: Tensor) -> Tensor:
        num, _, height, width = pooled[0].shape
        widths = [p.shape[1] for p in pooled]
        out = pooled[0].new_empty(num, height, width, sum(widths))
        invs, live = [], []
        start = 0
        for p, c in zip(pooled, widths):
            inv, has_grad = _norms(p, eps)
            factor = inv[:, None] * scale[None, start : start + c]  # (R, C_i)
            torch.mul(
                p.permute(0, 2, 3, 1), factor[:, None, None, :], out=out[..., start : start + c]
            )
            invs.append(inv)
            live.append(has_grad)
            start += c
        ctx.widths = widths
        ctx.save_for_backward(scale, *invs, *live, *pooled)
        return out.permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        k = len(ctx.widths)
        scale, invs, live, pooled = ctx.saved_tensors[0], *_split(ctx.saved_tensors[1:], k)
        grad_scale = torch.empty_like(scale) if ctx.needs_input_grad[0] else None
        grads = []
        start = 0
        for i, (p, inv, has_grad, c) in enumerate(zip(pooled, invs, live, ctx.widths)):
            g = grad[:, start : start + c]
            s = scale[start : start + c][None, :, None, None]
            if grad_scale is not None:
                # sum over ROIs and cells of g * p / n, per channel
                gp = (g * p).sum(dim=(2, 3))  # (R, C_i)
                grad_scale[start : start + c] = inv @ gp
            if ctx.needs_input_grad[2 + i]:
                a = g * s
                flat_a, flat_p = a.flatten(1), p.flatten(1)
                # <a, u> = <a, p> / n, per ROI; 0 where the norm was clamped
                dot = torch.bmm(flat_a[:, None, :], flat_p[:, :, None]).view(-1) * inv
                dot = torch.where(has_grad, dot, torch.zeros_like(dot))
                grads.append(
                    torch.addcmul(
                        a * inv[:, None, None, None],
                        p,
                        (-(inv * inv) * dot)[:, None, None, None],
                    )
                )
            else:
                grads.append(None)
            start += c
        return (grad_scale, None, *grads)


def _split(tensors, k: int):
    return list(tensors[:k]), list(tensors[k : 2 * k]), list(tensors[2 * k :])
