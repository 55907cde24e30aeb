"""Section 4.1's two training stages from one config (``SOLVER.ION_STAGE2``)."""

import os
from typing import List

from detectron2.config import CfgNode

__all__ = ["training_stages"]

# The schedule that reads SOLVER.ION_END_LR (ion_d2/engine/solver.py).
_EXPONENTIAL_LR = "IONExponentialLR"


def training_stages(cfg: CfgNode) -> List[CfgNode]:
    """
    The configs that training ``cfg`` runs, one after the other.

    With ``SOLVER.ION_STAGE2.ENABLED`` False: ``[cfg]``. With it True, section 4.1's two stages:

    1. ``cfg`` in ``OUTPUT_DIR/stage1``;
    2. ``cfg`` with ``SOLVER.MAX_ITER``, ``SOLVER.BASE_LR``, ``SOLVER.ION_END_LR`` and
       ``MODEL.BACKBONE.FREEZE_AT`` taken from ``SOLVER.ION_STAGE2``, starting from stage 1's
       ``model_final.pth``, in ``OUTPUT_DIR/stage2``.

    Each stage's ``SOLVER.ION_STAGE2.ENABLED`` is False, so the config stored in its folder
    trains that stage alone when run again.

    Raises:
        ValueError: stage 2 is enabled with a schedule other than "IONExponentialLR" (stage 2's
            END_LR would not act) or a ``MAX_ITER`` < 1.
    """
    stage2 = cfg.SOLVER.ION_STAGE2
    if not stage2.ENABLED:
        return [cfg]
    if cfg.SOLVER.LR_SCHEDULER_NAME != _EXPONENTIAL_LR:
        raise ValueError(
            f"SOLVER.ION_STAGE2 sets stage 2's LR from BASE_LR to END_LR along SOLVER."
            f"LR_SCHEDULER_NAME {_EXPONENTIAL_LR!r}, the schedule that reads it; this config "
            f"has {cfg.SOLVER.LR_SCHEDULER_NAME!r}. Set SOLVER.LR_SCHEDULER_NAME "
            f"{_EXPONENTIAL_LR!r}, or SOLVER.ION_STAGE2.ENABLED False and train stage 2 with "
            "a config of its own."
        )
    if stage2.MAX_ITER < 1:
        raise ValueError(
            f"SOLVER.ION_STAGE2.MAX_ITER must be >= 1 (stage 2's iterations); got "
            f"{stage2.MAX_ITER}."
        )
    first, second = cfg.clone(), cfg.clone()
    for stage in (first, second):
        stage.defrost()
        stage.SOLVER.ION_STAGE2.ENABLED = False
    first.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, "stage1")
    second.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, "stage2")
    second.MODEL.WEIGHTS = os.path.join(first.OUTPUT_DIR, "model_final.pth")
    second.MODEL.BACKBONE.FREEZE_AT = stage2.FREEZE_AT
    second.SOLVER.MAX_ITER = stage2.MAX_ITER
    second.SOLVER.BASE_LR = stage2.BASE_LR
    second.SOLVER.ION_END_LR = stage2.END_LR
    for stage in (first, second):
        stage.freeze()
    return [first, second]
