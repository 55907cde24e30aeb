"""
ION's solver (section 4.1): the learning-rate schedule and global gradient-norm clipping, from a
YAML config (:func:`build_ion_optimizer`, :func:`build_ion_lr_scheduler`) or as a LazyConfig's
``optimizer._target_`` and ``lr_multiplier`` (:func:`clipped_optimizer`,
:func:`ion_exponential_lr`), with the same numbers.
"""

import logging
import math
from typing import Tuple, Type, Union

import torch
from detectron2.config import CfgNode
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler
from detectron2.utils.registry import locate
from fvcore.common.param_scheduler import ExponentialParamScheduler, ParamScheduler

__all__ = [
    "build_ion_lr_scheduler",
    "build_ion_optimizer",
    "clipped_optimizer",
    "ion_exponential_lr",
    "ion_exponential_param_scheduler",
    "CLIP_TYPES",
]

logger = logging.getLogger(__name__)

# Detectron2's own SOLVER.CLIP_GRADIENTS.CLIP_TYPEs ("value", "norm": each parameter tensor
# separately) and ours, "full_model" (one L2 norm over every parameter, as Caffe's solver).
CLIP_TYPES = ("value", "norm", "full_model")


def build_ion_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """
    Build Detectron2's optimizer (:func:`detectron2.solver.build_optimizer`: SGD with its param
    groups for ``SOLVER.BIAS_LR_FACTOR``, ``WEIGHT_DECAY_BIAS`` and ``WEIGHT_DECAY_NORM``).
    ``SOLVER.BASE_LR`` must be finite and > 0 (a ValueError names it otherwise).
    ``SOLVER.CLIP_GRADIENTS.CLIP_TYPE`` "full_model" adds section 4.1's clipping: before each
    step the gradients of ALL parameters of all param groups are rescaled together so that
    their joint L2 norm is at most ``CLIP_VALUE`` (:func:`torch.nn.utils.clip_grad_norm_`), as
    Caffe's ``SGDSolver::ClipGradients`` does. Other clip types are left to Detectron2.
    """
    base_lr = cfg.SOLVER.BASE_LR
    if not (math.isfinite(base_lr) and base_lr > 0):
        # torch's own message ("Invalid learning rate: -0.01") names no key.
        raise ValueError(f"SOLVER.BASE_LR must be a finite number > 0; got {base_lr}.")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE not in CLIP_TYPES:
        raise ValueError(
            f"Unknown SOLVER.CLIP_GRADIENTS.CLIP_TYPE {clip.CLIP_TYPE!r}; expected one of "
            f"{CLIP_TYPES}."
        )
    if not (clip.ENABLED and clip.CLIP_TYPE == "full_model"):
        return build_optimizer(cfg, model)
    if not clip.CLIP_VALUE > 0:
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0 for CLIP_TYPE 'full_model'; got "
            f"{clip.CLIP_VALUE}."
        )
    d2_cfg = cfg.clone()
    d2_cfg.defrost()
    d2_cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    optimizer = build_optimizer(d2_cfg, model)
    clipped_type = _with_full_model_clipping(type(optimizer), clip.CLIP_VALUE, clip.NORM_TYPE)
    num_params = sum(len(g["params"]) for g in optimizer.param_groups)
    logger.info(
        f"Clipping the L{clip.NORM_TYPE:g} norm of the gradients of all {num_params} parameter "
        f"tensors together at {clip.CLIP_VALUE:g} (SOLVER.CLIP_GRADIENTS.CLIP_TYPE 'full_model')."
    )
    return clipped_type(optimizer.param_groups, **optimizer.defaults)


def _with_full_model_clipping(
    optimizer_type: Type[torch.optim.Optimizer], max_norm: float, norm_type: float
) -> Type[torch.optim.Optimizer]:
    # As DETR's Detectron2 port does: a subclass whose step() first clips the gradients of
    # every param group together (Detectron2's "norm" clips each tensor on its own, which
    # changes the update's direction).
    class FullModelGradientClipping(optimizer_type):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
            return super().step(closure)

    FullModelGradientClipping.__name__ = optimizer_type.__name__ + "WithFullModelGradientClip"
    FullModelGradientClipping.__qualname__ = FullModelGradientClipping.__name__
    return FullModelGradientClipping


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
    sched = ion_exponential_param_scheduler(
        base_lr=cfg.SOLVER.BASE_LR,
        end_lr=cfg.SOLVER.ION_END_LR,
        max_iter=cfg.SOLVER.MAX_ITER,
        warmup_iters=cfg.SOLVER.WARMUP_ITERS,
        warmup_factor=cfg.SOLVER.WARMUP_FACTOR,
        warmup_method=cfg.SOLVER.WARMUP_METHOD,
    )
    return LRMultiplier(optimizer, multiplier=sched, max_iter=cfg.SOLVER.MAX_ITER)


def ion_exponential_param_scheduler(
    *,
    base_lr: float,
    end_lr: float,
    max_iter: int,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    warmup_method: str = "linear",
    keys: Tuple[str, str] = ("SOLVER.BASE_LR", "SOLVER.ION_END_LR"),
) -> WarmupParamScheduler:
    """
    The multiplier of "IONExponentialLR" (:func:`build_ion_lr_scheduler`) as an fvcore
    ``ParamScheduler``: ``(end_lr / base_lr) ** (iter / max_iter)`` after Detectron2's warmup
    of ``warmup_iters`` iterations. ``keys`` name ``base_lr`` and ``end_lr`` in error messages
    (the YAML keys by default; :func:`ion_exponential_lr` passes its own).
    """
    for key, value in zip(keys, (base_lr, end_lr)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"IONExponentialLR decays the learning rate exponentially, so {key} must be a "
                f"finite number > 0; got {value}."
            )
    if end_lr > base_lr:
        # A "decay" factor above 1 would raise the learning rate over training, silently.
        raise ValueError(
            f"IONExponentialLR decays the learning rate from {keys[0]} to "
            f"{keys[1]}, so it needs {keys[1].split('.')[-1]} <= {keys[0].split('.')[-1]}; got "
            f"{keys[0].split('.')[-1]}={base_lr} and {keys[1].split('.')[-1]}={end_lr}, which "
            f"would raise it {end_lr / base_lr:.3g}x over {max_iter} iterations."
        )
    sched = ExponentialParamScheduler(start_value=1.0, decay=end_lr / base_lr)
    return WarmupParamScheduler(
        sched, warmup_factor, min(warmup_iters / max_iter, 1.0), warmup_method
    )


def clipped_optimizer(
    optimizer: Union[str, Type[torch.optim.Optimizer]] = "torch.optim.SGD",
    *,
    clip_type: str,
    clip_value: float,
    norm_type: float = 2.0,
) -> Type[torch.optim.Optimizer]:
    """
    ``optimizer`` (a class or its dotted name) with gradient clipping, as
    ``SOLVER.CLIP_GRADIENTS`` gives it to :func:`build_ion_optimizer`: "full_model" clips the L2
    norm of all parameters' gradients together (section 4.1), "norm" and "value" each parameter
    tensor on its own (Detectron2's ``maybe_add_gradient_clipping``). For a LazyConfig's
    ``optimizer._target_``::

        optimizer._target_ = L(clipped_optimizer)(clip_type="full_model", clip_value=20.0)
    """
    cls = locate(optimizer) if isinstance(optimizer, str) else optimizer
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            f"clipped_optimizer needs a torch.optim.Optimizer class; got {optimizer!r}."
        )
    if clip_type not in CLIP_TYPES:
        raise ValueError(f"Unknown clip_type {clip_type!r}; expected one of {CLIP_TYPES}.")
    if not clip_value > 0:
        raise ValueError(f"clip_value must be > 0; got {clip_value}.")
    if clip_type == "full_model":
        return _with_full_model_clipping(cls, clip_value, norm_type)
    cfg = CfgNode(
        {
            "SOLVER": {
                "CLIP_GRADIENTS": {
                    "ENABLED": True,
                    "CLIP_TYPE": clip_type,
                    "CLIP_VALUE": clip_value,
                    "NORM_TYPE": norm_type,
                }
            }
        }
    )
    return maybe_add_gradient_clipping(cfg, cls)


def ion_exponential_lr(
    *,
    base_lr: float,
    end_lr: float,
    max_iter: int,
    warmup_iters: int = 0,
    warmup_factor: float = 0.001,
    warmup_method: str = "linear",
) -> ParamScheduler:
    """
    Section 4.1's exponential decay from ``base_lr`` to ``end_lr`` over ``max_iter``
    iterations, after Detectron2's warmup: the multiplier "IONExponentialLR" gives
    :func:`build_ion_lr_scheduler` (:func:`ion_exponential_param_scheduler`), for a
    LazyConfig's ``lr_multiplier``. The configs set ``base_lr="${..optimizer.lr}"`` and
    ``max_iter="${..train.max_iter}"``.
    """
    return ion_exponential_param_scheduler(
        base_lr=base_lr,
        end_lr=end_lr,
        max_iter=max_iter,
        warmup_iters=warmup_iters,
        warmup_factor=warmup_factor,
        warmup_method=warmup_method,
        keys=("lr_multiplier.base_lr", "lr_multiplier.end_lr"),
    )
