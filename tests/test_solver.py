"""Section 4.1's learning-rate schedule: exponential decay from BASE_LR to ION_END_LR."""

import math

import pytest
import torch
from detectron2.config import get_cfg

from ion_d2.config import add_ion_config
from ion_d2.solver import build_ion_lr_scheduler


def _lrs(cfg, steps):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=cfg.SOLVER.BASE_LR)
    scheduler = build_ion_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _cfg(base=5e-3, end=1e-4, max_iter=100, warmup=0):
    cfg = get_cfg()
    add_ion_config(cfg)
    cfg.SOLVER.LR_SCHEDULER_NAME = "IONExponentialLR"
    cfg.SOLVER.BASE_LR = base
    cfg.SOLVER.ION_END_LR = end
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.WARMUP_ITERS = warmup
    return cfg


def test_exponential_decay_between_the_two_values():
    lrs = _lrs(_cfg(), 101)
    for it in (0, 25, 50, 99, 100):
        expected = 5e-3 * (1e-4 / 5e-3) ** (it / 100)
        assert lrs[it] == pytest.approx(expected, rel=1e-6)
    assert lrs[100] == pytest.approx(1e-4, rel=1e-6)
    # Geometric: a constant ratio between consecutive iterations.
    ratios = [b / a for a, b in zip(lrs[:-1], lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-6)
    assert math.isclose(ratios[0], (1e-4 / 5e-3) ** 0.01, rel_tol=1e-6)


def test_warmup_then_decay():
    lrs = _lrs(_cfg(warmup=10), 20)
    assert lrs[0] == pytest.approx(5e-3 * 0.001, rel=1e-3)
    assert lrs[0] < lrs[5] < lrs[10]
    assert lrs[12] == pytest.approx(5e-3 * (1e-4 / 5e-3) ** 0.12, rel=1e-6)


def test_other_schedulers_fall_through_and_bad_values_raise():
    cfg = _cfg()
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    cfg.SOLVER.STEPS = (50,)
    cfg.SOLVER.WARMUP_ITERS = 0
    lrs = _lrs(cfg, 60)
    assert lrs[10] == pytest.approx(5e-3) and lrs[55] == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="ION_END_LR > 0.*-1"):
        _lrs(_cfg(end=-1.0), 1)
