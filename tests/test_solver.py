"""Section 4.1's learning-rate schedule: exponential decay from BASE_LR to ION_END_LR."""

import math

import pytest
import torch
from model_utils import ion_cfg

from ion_d2.engine.solver import build_ion_lr_scheduler


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
    return ion_cfg(
        {
            "SOLVER.LR_SCHEDULER_NAME": "IONExponentialLR",
            "SOLVER.BASE_LR": base,
            "SOLVER.ION_END_LR": end,
            "SOLVER.MAX_ITER": max_iter,
            "SOLVER.WARMUP_ITERS": warmup,
        }
    )


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
    with pytest.raises(ValueError, match="SOLVER.ION_END_LR must be a finite number > 0; got -1"):
        _lrs(_cfg(end=-1.0), 1)


# --- Section 4.1's gradient clipping: one L2 norm over every parameter (Caffe's solver) -------


class _TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.fc2 = torch.nn.Linear(4, 2)


def _clip_cfg(clip_type="full_model", value=20.0):
    cfg = _cfg()
    cfg.SOLVER.BASE_LR = 0.1
    cfg.SOLVER.MOMENTUM = 0.0
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    cfg.SOLVER.BIAS_LR_FACTOR = 2.0
    cfg.SOLVER.WEIGHT_DECAY_BIAS = 0.0
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = value
    return cfg


def _step_with_grads(cfg, scale):
    """One optimizer step with hand-set gradients; returns the model, the gradients set, the
    parameters before the step and the optimizer."""
    from ion_d2.engine import IONTrainer

    model = _TwoLayers()
    optimizer = IONTrainer.build_optimizer(cfg, model)
    g = torch.Generator().manual_seed(0)
    grads, before = {}, {}
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=g) * scale
        grads[name] = p.grad.clone()
        before[name] = p.detach().clone()
    optimizer.step()
    return model, grads, before, optimizer


def _global_norm(tensors):
    return torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).item()


def test_full_model_clipping_rescales_all_groups_together():
    cfg = _clip_cfg(value=20.0)
    model, grads, before, optimizer = _step_with_grads(cfg, scale=100.0)
    # Detectron2's param groups are kept: biases at 2x the LR without decay, norm layers
    # without decay.
    lrs = {id(p): grp["lr"] for grp in optimizer.param_groups for p in grp["params"]}
    decays = {id(p): grp["weight_decay"] for grp in optimizer.param_groups for p in grp["params"]}
    assert len({lr for lr in lrs.values()}) == 2
    assert lrs[id(model.fc1.bias)] == pytest.approx(0.2)
    assert lrs[id(model.fc1.weight)] == pytest.approx(0.1)
    assert decays[id(model.fc1.bias)] == 0.0 and decays[id(model.norm.weight)] == 0.0

    total = _global_norm(grads.values())
    assert total > 20.0
    factor = 20.0 / total
    used = {}
    for name, p in model.named_parameters():
        # The gradient the optimizer used: (before - after) / lr of the parameter's group.
        used[name] = (before[name] - p.detach()) / lrs[id(p)]
        # Same direction: every tensor scaled by ONE factor.
        assert torch.allclose(used[name], grads[name] * factor, rtol=1e-4, atol=1e-5)
    assert _global_norm(used.values()) == pytest.approx(20.0, rel=1e-4)


def test_full_model_clipping_leaves_small_gradients_untouched():
    model, grads, before, optimizer = _step_with_grads(_clip_cfg(value=20.0), scale=0.01)
    assert _global_norm(grads.values()) < 20.0
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name])
        lr = 0.2 if name.endswith("bias") else 0.1
        assert torch.allclose(p.detach(), before[name] - lr * grads[name], atol=1e-7)


def test_per_tensor_norm_clipping_is_detectron2s_and_changes_the_direction():
    # Detectron2's "norm" clips each tensor on its own: every tensor ends at norm <= 20, the
    # whole update is far above 20 and no longer parallel to the gradient.
    model, grads, before, optimizer = _step_with_grads(_clip_cfg("norm", 20.0), scale=100.0)
    assert "WithFullModelGradientClip" not in type(optimizer).__name__
    clipped = [p.grad for p in model.parameters()]
    assert _global_norm(clipped) > 21.0
    ratios = [
        (c.norm() / grads[n].norm()).item() for (n, _), c in zip(model.named_parameters(), clipped)
    ]
    assert max(ratios) / min(ratios) > 1.5


@pytest.mark.parametrize(
    "clip_type,value,match",
    [("global", 20.0, "'global'.*full_model"), ("full_model", 0.0, "CLIP_VALUE.*0.0")],
)
def test_bad_clipping_settings_raise(clip_type, value, match):
    from ion_d2.engine import IONTrainer

    with pytest.raises(ValueError, match=match):
        IONTrainer.build_optimizer(_clip_cfg(clip_type, value), _TwoLayers())
