"""Checks on a whole model's config that no single component can make alone."""

import math
from typing import Optional

from torch import nn

__all__ = ["check_context_outputs_used", "check_pixel_std"]


def check_context_outputs_used(cfg, context: Optional[nn.Module]) -> None:
    """
    Refuse a context module whose outputs are not all read by a head: an output nobody pools
    is a switch that does nothing, and a branch nobody reads (Table 10c's "context_conv", or a
    whole context module with no pooling and no segmentation loss) never trains in one process
    and makes DistributedDataParallel fail at the second iteration ("Expected to have finished
    reduction ...").

    Readers: ``MODEL.ROI_HEADS.IN_FEATURES``, ``MODEL.SEM_SEG_HEAD.IN_FEATURES`` when
    ``MODEL.ION.SEG_LOSS_ON``, and ``MODEL.RPN.IN_FEATURES`` when the proposal generator is
    the RPN.

    Raises:
        ValueError: naming the unread outputs and the keys that could read them.
    """
    if context is None:
        return
    readers = {"MODEL.ROI_HEADS.IN_FEATURES": cfg.MODEL.ROI_HEADS.IN_FEATURES}
    if cfg.MODEL.ION.SEG_LOSS_ON:
        readers["MODEL.SEM_SEG_HEAD.IN_FEATURES"] = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES
    if cfg.MODEL.PROPOSAL_GENERATOR.NAME in ("RPN", "RRPN"):
        readers["MODEL.RPN.IN_FEATURES"] = cfg.MODEL.RPN.IN_FEATURES
    read = {name for names in readers.values() for name in names}
    unread = [name for name in context.output_shape() if name not in read]
    if unread:
        raise ValueError(
            f"MODEL.ION.CONTEXT.NAME {cfg.MODEL.ION.CONTEXT.NAME!r} outputs {unread}, which no "
            f"head reads ({', '.join(f'{k} = {list(v)}' for k, v in readers.items())}"
            + ("" if cfg.MODEL.ION.SEG_LOSS_ON else "; MODEL.ION.SEG_LOSS_ON is False")
            + "). Their weights would never train (and DistributedDataParallel would fail): add "
            "them to MODEL.ROI_HEADS.IN_FEATURES, or change the context module."
        )


def check_pixel_std(cfg) -> None:
    """
    Refuse a ``MODEL.PIXEL_STD`` with an entry that is zero, negative or not finite: the model
    divides its input by it, so the first loss would be NaN and reported as divergence.

    Raises:
        ValueError: naming the key and its value.
    """
    std = list(cfg.MODEL.PIXEL_STD)
    if not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(
            f"MODEL.PIXEL_STD must hold finite values > 0 (the input is divided by them); got "
            f"{std}. Use e.g. [58.395, 57.12, 57.375] (ImageNet, RGB 0-255) or [1.0, 1.0, 1.0] "
            "(no scaling)."
        )
