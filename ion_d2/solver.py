"""ION's learning-rate schedule (section 4.1)."""

import torch
from detectron2.solver import build_lr_scheduler
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from fvcore.common.param_scheduler import ExponentialParamScheduler

__all__ = ["build_ion_lr_scheduler"]


def build_ion_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """
    Build the scheduler named by ``SOLVER.LR_SCHEDULER_NAME``. "IONExponentialLR" decays the
    learning rate exponentially from ``SOLVER.BASE_LR`` to ``SOLVER.ION_END_LR`` over
    ``SOLVER.MAX_ITER`` iterations (section 4.1: 5e-3 -> 1e-4 in stage 1, 1e-3 -> 1e-5 in
    stage 2), after Detectron2's usual warmup (``SOLVER.WARMUP_*``; the paper uses none).
    Any other name is passed to Detectron2's :func:`build_lr_scheduler`.
    """
    if cfg.SOLVER.LR_SCHEDULER_NAME != "IONExponentialLR":
        return build_lr_scheduler(cfg, optimizer)
    base_lr, end_lr = cfg.SOLVER.BASE_LR, cfg.SOLVER.ION_END_LR
    if not (base_lr > 0 and end_lr > 0):
        raise ValueError(
            f"IONExponentialLR needs SOLVER.BASE_LR > 0 and SOLVER.ION_END_LR > 0; got "
            f"{base_lr} and {end_lr}."
        )
    if end_lr > base_lr:
        # A "decay" factor above 1 would raise the learning rate over training, silently.
        raise ValueError(
            f"IONExponentialLR decays the learning rate from SOLVER.BASE_LR to "
            f"SOLVER.ION_END_LR, so it needs ION_END_LR <= BASE_LR; got BASE_LR={base_lr} and "
            f"ION_END_LR={end_lr}, which would raise it {end_lr / base_lr:.3g}x over "
            f"{cfg.SOLVER.MAX_ITER} iterations."
        )
    sched = ExponentialParamScheduler(start_value=1.0, decay=end_lr / base_lr)
    sched = WarmupParamScheduler(
        sched,
        cfg.SOLVER.WARMUP_FACTOR,
        min(cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER, 1.0),
        cfg.SOLVER.WARMUP_METHOD,
    )
    return LRMultiplier(optimizer, multiplier=sched, max_iter=cfg.SOLVER.MAX_ITER)
