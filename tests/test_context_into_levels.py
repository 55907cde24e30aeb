"""MODEL.ION.CONTEXT.ADD_TO_FEATURES: the context added into a feature pyramid's levels."""

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from model_utils import ion_cfg

from ion_d2.modeling.context import build_ion_context
from ion_d2.modeling.context.into_levels import IONContextIntoLevels

SHAPES = {
    "p2": ShapeSpec(channels=6, stride=4),
    "p3": ShapeSpec(channels=6, stride=8),
    "p5": ShapeSpec(channels=6, stride=32),
    "p6": ShapeSpec(channels=6, stride=64),
    "res4": ShapeSpec(channels=5, stride=16),
}
LEVELS = ["p2", "p3", "p5"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _context(targets=LEVELS, **overrides):
    cfg = ion_cfg(
        {
            "MODEL.ION.CONTEXT.IN_FEATURE": "p5",
            "MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM": 3,
            "MODEL.ION.CONTEXT.IRNN.CONCAT_DROPOUT": 0.0,
            "MODEL.ION.CONTEXT.ADD_TO_FEATURES": list(targets),
            **overrides,
        }
    )
    return build_ion_context(cfg, SHAPES)


def _features(n=2, height=64, width=96):
    return {
        name: torch.randn(n, s.channels, height // s.stride, width // s.stride)
        for name, s in SHAPES.items()
        if s.stride <= 32
    }


def _randomize_proj(module):
    with torch.no_grad():
        for p in (module.proj.weight, module.proj.bias, module.norm.weight, module.norm.bias):
            p.normal_()


def _added(module, context):
    projected = F.conv2d(context, module.proj.weight, module.proj.bias)
    mean = projected.mean(dim=1, keepdim=True)
    var = projected.var(dim=1, unbiased=False, keepdim=True)
    normalised = (projected - mean) / torch.sqrt(var + module.norm.eps)
    return normalised * module.norm.weight[:, None, None] + module.norm.bias[:, None, None]


def test_built_from_config_and_starts_as_the_plain_levels():
    module = _context()
    assert isinstance(module, IONContextIntoLevels)
    features = _features()
    out = module(features)
    for name in LEVELS:
        assert torch.equal(out[name], features[name])
    assert torch.equal(out["context"], module.context(features)["context"])
    assert set(module.output_shape()) == {"context", *LEVELS}
    assert module.output_shape()["p2"] == SHAPES["p2"]


def test_adds_the_projected_context_upsampled_by_repeating_cells():
    module = _context()
    _randomize_proj(module)
    features = _features()
    out = module(features)
    projected = _added(module, module.context(features)["context"])
    for name in LEVELS:
        size = features[name].shape[-2:]
        expected = features[name] + F.interpolate(projected, size=size, mode="nearest")
        torch.testing.assert_close(out[name], expected)


def test_padding_of_the_batch_changes_nothing_of_an_image():
    module = _context()
    _randomize_proj(module)
    # Image 0 is 64 x 64 px; image 1 pads the batch to 96 x 128.
    sizes = [(64, 64), (96, 128)]
    batch = _features(2, 96, 128)
    for name, x in batch.items():
        s = SHAPES[name].stride
        x[0, :, 64 // s :, :] = 0
        x[0, :, :, 64 // s :] = 0
    alone = {
        k: v[:1, :, : 64 // SHAPES[k].stride, : 64 // SHAPES[k].stride] for k, v in batch.items()
    }
    out_batch = module(batch, sizes)
    out_alone = module(alone, sizes[:1])
    for name in LEVELS:
        s = SHAPES[name].stride
        added = out_batch[name] - batch[name]
        torch.testing.assert_close(
            added[:1, :, : 64 // s, : 64 // s], out_alone[name] - alone[name]
        )
        assert added[0, :, 64 // s :, :].abs().max() == 0
        assert added[0, :, :, 64 // s :].abs().max() == 0


def test_gradients_reach_the_context_module_once_the_projection_moves():
    module = _context()
    features = _features()
    (module(features)["p2"] * torch.randn_like(features["p2"])).sum().backward()
    assert module.norm.weight.grad.abs().sum() > 0
    assert module.proj.weight.grad.abs().sum() == 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.context.parameters())
    module.zero_grad()
    _randomize_proj(module)
    (module(features)["p2"] * torch.randn_like(features["p2"])).sum().backward()
    assert module.proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.context.parameters())


@pytest.mark.parametrize(
    "targets, message",
    [
        (["p2", "p7"], r"\['p7'\].*available"),
        (["p2", "res4"], r"different channel counts \[5, 6\]"),
        (["p2", "p6"], r"\['p6'\], whose strides \[64\] do not divide the context's \(32"),
    ],
)
def test_bad_targets_are_refused(targets, message):
    with pytest.raises(ValueError, match=message):
        _context(targets)


def test_off_by_default_is_the_plain_context_module():
    cfg = ion_cfg({"MODEL.ION.CONTEXT.IN_FEATURE": "p5", "MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM": 3})
    assert cfg.MODEL.ION.CONTEXT.ADD_TO_FEATURES == []
    assert not isinstance(build_ion_context(cfg, SHAPES), IONContextIntoLevels)


def _p5_out_and_grad(detach, features, upstream):
    torch.manual_seed(0)
    module = _context(**{"MODEL.ION.CONTEXT.DETACH_INPUT": detach})
    _randomize_proj(module)
    p5 = features["p5"].clone().requires_grad_(True)
    out = module({**features, "p5": p5})["p5"]
    (out * upstream).sum().backward()
    trained = any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in module.context.parameters()
    )
    return out.detach(), p5.grad, trained


def test_detach_input_stops_the_contexts_gradient_into_the_backbone():
    features = _features()
    upstream = torch.randn_like(features["p5"])
    out, grad, trained = _p5_out_and_grad(False, features, upstream)
    out_detached, grad_detached, trained_detached = _p5_out_and_grad(True, features, upstream)
    torch.testing.assert_close(out_detached, out)  # the same values
    # p5, a target, still gets the gradient of its own sum; only the context's path is cut.
    torch.testing.assert_close(grad_detached, upstream)
    assert (grad - upstream).abs().max() > 1e-4
    assert trained and trained_detached  # the context module trains either way


def test_detach_input_without_levels_is_refused():
    with pytest.raises(ValueError, match=r"DETACH_INPUT True.*ADD_TO_FEATURES is \[\]"):
        _context([], **{"MODEL.ION.CONTEXT.DETACH_INPUT": True})
