"""
Section 3.1's "L2-normalized": :func:`l2_normalize_rois`, Table 5's modes, which
:class:`~ion_d2.modeling.skip_pooling.IONSkipPooler` applies to each pooled feature before it
concatenates and re-scales them.
"""

import torch
import torch.nn.functional as F

__all__ = ["NORM_EPS", "NORM_MODES", "l2_normalize_rois"]

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
