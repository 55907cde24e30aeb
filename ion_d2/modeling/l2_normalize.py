"""
Section 3.1's "L2-normalized": :func:`l2_normalize_rois`, Table 5's modes, which
:class:`~ion_d2.modeling.skip_pooling.IONSkipPooler` applies to each pooled feature before it
concatenates and re-scales them.
"""

from typing import Optional

import torch

__all__ = ["NORM_EPS", "NORM_MODES", "l2_norms", "l2_normalize_rois"]

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
