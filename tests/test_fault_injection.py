"""
Fault injection: each test feeds ion_d2 one of the faults of issue 11 ("nothing lost, nothing
silently wrong") and checks that it is either handled exactly or refused with a clear error.
"""

import pytest
import torch
from detectron2.config import get_cfg

from ion_d2 import add_ion_config
from ion_d2.solver import build_ion_lr_scheduler


def _ion_cfg():
    cfg = get_cfg()
    add_ion_config(cfg)
    return cfg


# --- 5. An "exponential decay" that would raise the learning rate ------------------------------


def test_ion_lr_schedule_refuses_an_end_lr_above_the_base_lr():
    cfg = _ion_cfg()
    cfg.SOLVER.LR_SCHEDULER_NAME = "IONExponentialLR"
    cfg.SOLVER.BASE_LR, cfg.SOLVER.ION_END_LR, cfg.SOLVER.MAX_ITER = 1e-8, 4.8e-4, 100
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    with pytest.raises(
        ValueError, match=r"ION_END_LR <= BASE_LR.*BASE_LR=1e-08.*ION_END_LR=0.00048"
    ):
        build_ion_lr_scheduler(cfg, optimizer)
    # A constant schedule (equal values) is still allowed.
    cfg.SOLVER.ION_END_LR = 1e-8
    build_ion_lr_scheduler(cfg, optimizer)
