import itertools

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from model_utils import ion_cfg

from ion_d2.modeling.context import (
    ION_CONTEXT_REGISTRY,
    IRNN,
    GlobalAvgPool,
    StackedConv,
    build_ion_context,
)
from ion_d2.modeling.context.irnn_scan import _irnn_scan, _irnn_scan_identity
from ion_d2.modeling.dropout import IONDropout

C, HIDDEN, H, W = 4, 3, 5, 6
DIRECTIONS = ("right", "left", "down", "up")
INPUT_SHAPE = {
    "conv4": ShapeSpec(channels=7, stride=8),
    "conv5": ShapeSpec(channels=C, stride=16),
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cfg(name="IRNN", **irnn):
    overrides = {
        "MODEL.ION.CONTEXT.NAME": name,
        "MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM": HIDDEN,
        "MODEL.ION.CONTEXT.CONV.CHANNELS": 3,
        # The naive references have no dropout; the dropout tests set it explicitly.
        "MODEL.ION.CONTEXT.IRNN.CONCAT_DROPOUT": 0.0,
        # The naive references are of the per-layer wiring unless a test asks for "paper"
        # (add_ion_config's default since 0.2.0).
        "MODEL.ION.CONTEXT.IRNN.WIRING": "per_layer",
    }
    overrides.update({f"MODEL.ION.CONTEXT.IRNN.{k.upper()}": v for k, v in irnn.items()})
    return ion_cfg(overrides)


def _randomize(module, whh_noise=0.3):
    """Move every parameter away from its init (biases, b0 and Whh included)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("whh"):
                p.add_(whh_noise * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))


# ----------------------------------------------------------------------------------------------
# Naive references: explicit Python loops over every cell.
# ----------------------------------------------------------------------------------------------
def _cells(direction, height, width):
    """Yield the sequences of (i, j) cells, one sequence per row/column, in scan order."""
    if direction in ("right", "left"):
        cols = list(range(width)) if direction == "right" else list(range(width))[::-1]
        for i in range(height):
            yield [(i, j) for j in cols]
    else:
        rows = list(range(height)) if direction == "down" else list(range(height))[::-1]
        for j in range(width):
            yield [(i, j) for i in rows]


def naive_scan(x, whh, direction, b0=None):
    """h_t = relu(whh @ h_{t-1} + x_t) (whh=None means identity), one cell at a time."""
    n, c, height, width = x.shape
    out = torch.zeros_like(x)
    for b in range(n):
        for seq in _cells(direction, height, width):
            h = torch.zeros(c, dtype=x.dtype)
            for step, (i, j) in enumerate(seq):
                inp = x[b, :, i, j]
                if step == 0 and b0 is not None:
                    inp = inp + b0
                rec = h if whh is None else whh @ h
                h = torch.clamp(rec + inp, min=0)
                out[b, :, i, j] = h
    return out


def naive_conv1x1(x, weight, bias):
    n, _, height, width = x.shape
    w2 = weight[:, :, 0, 0]
    out = torch.zeros(n, w2.shape[0], height, width, dtype=x.dtype)
    for b in range(n):
        for i in range(height):
            for j in range(width):
                out[b, :, i, j] = w2 @ x[b, :, i, j] + bias
    return out


def naive_input_to_hidden(layer, d):
    """Direction d's input-to-hidden conv: the shared one, or its own (its block of channels)."""
    conv = layer.input_to_hidden
    if layer.shared_input_to_hidden:
        return conv.weight, conv.bias
    k = conv.out_channels // len(layer.directions)
    return conv.weight[d * k : (d + 1) * k], conv.bias[d * k : (d + 1) * k]


def naive_irnn(module, x, num_layers, directions, output_all_layers):
    outputs = {}
    for k in range(num_layers):
        layer = module.layers[k]
        if directions == "all":
            dirs = DIRECTIONS
        else:
            dirs = ("right", "left") if k % 2 == 0 else ("down", "up")
        states = []
        for d, direction in enumerate(dirs):
            weight, bias = naive_input_to_hidden(layer, d)
            hidden = naive_conv1x1(x, weight, bias)
            whh = None if layer.whh is None else layer.whh[d]
            b0 = None if layer.first_step_bias is None else layer.first_step_bias[d]
            states.append(naive_scan(hidden, whh, direction, b0))
        out_conv = layer.hidden_to_output
        x = naive_conv1x1(torch.cat(states, 1), out_conv.weight, out_conv.bias).clamp(min=0)
        if output_all_layers and k < num_layers - 1:
            outputs[f"context_{k + 1}"] = x
    outputs["context"] = x
    return outputs


# ----------------------------------------------------------------------------------------------
# Scan functions
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("with_b0", [False, True])
def test_scans_match_naive(direction, with_b0):
    x = torch.randn(2, HIDDEN, H, W, dtype=torch.float64)
    whh = torch.eye(HIDDEN, dtype=torch.float64) + 0.4 * torch.randn(HIDDEN, HIDDEN).double()
    b0 = torch.randn(HIDDEN, dtype=torch.float64) if with_b0 else None

    ref = naive_scan(x, whh, direction, b0)
    assert (ref == 0).any() and (ref > 0).any()  # resets happen: the ReLU matters
    torch.testing.assert_close(_irnn_scan(x, whh, direction, b0), ref, rtol=0, atol=1e-12)

    ref_id = naive_scan(x, None, direction, b0)
    torch.testing.assert_close(_irnn_scan_identity(x, direction, b0), ref_id, rtol=0, atol=1e-12)
    # the closed form equals the step loop with Whh = I
    eye = torch.eye(HIDDEN, dtype=torch.float64)
    torch.testing.assert_close(_irnn_scan(x, eye, direction, b0), ref_id, rtol=0, atol=1e-12)


def test_scan_rejects_unknown_direction():
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="diagonal.*right"):
        _irnn_scan_identity(x, "diagonal")
    with pytest.raises(ValueError, match="diagonal.*right"):
        _irnn_scan(x, torch.eye(2), "diagonal")


def _expected_dependence(direction, height, width):
    """dep[i, j, k, l]: output (i, j) may depend on input (k, l)."""
    dep = torch.zeros(height, width, height, width, dtype=torch.bool)
    for i, j, k, l in itertools.product(range(height), range(width), range(height), range(width)):
        dep[i, j, k, l] = {
            "right": k == i and l <= j,
            "left": k == i and l >= j,
            "down": l == j and k <= i,
            "up": l == j and k >= i,
        }[direction]
    return dep


def _cell_dependence(fn, x):
    """dep[i, j, k, l]: d out[:, :, i, j] / d x[:, :, k, l] is nonzero (N = 1)."""
    jac = torch.autograd.functional.jacobian(fn, x)  # (1, C, H, W, 1, C, H, W)
    return jac.abs().sum(dim=(0, 1, 4, 5)) > 0


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_scan_directional_dependence(direction):
    # Positive inputs and a positive Whh keep every state positive (no ReLU reset), so every
    # allowed dependency shows up as a nonzero gradient.
    x = torch.rand(1, HIDDEN, H, W, dtype=torch.float64) + 0.1
    whh = torch.eye(HIDDEN, dtype=torch.float64) + 0.2 * torch.rand(HIDDEN, HIDDEN).double()
    b0 = torch.rand(HIDDEN, dtype=torch.float64)
    expected = _expected_dependence(direction, H, W)

    dep = _cell_dependence(lambda t: _irnn_scan(t, whh, direction, b0), x)
    assert torch.equal(dep, expected)
    dep_id = _cell_dependence(lambda t: _irnn_scan_identity(t, direction, b0), x)
    assert torch.equal(dep_id, expected)


def _positive_irnn(num_layers, recurrent="removed", directions="all"):
    cfg = _cfg(NUM_LAYERS=num_layers, RECURRENT=recurrent, DIRECTIONS=directions)
    model = build_ion_context(cfg, INPUT_SHAPE).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.abs() + 0.05)
    return model


@pytest.mark.parametrize("directions", ["all", "lr_then_ud"])
def test_two_layers_see_every_cell(directions):
    x = torch.rand(1, C, H, W, dtype=torch.float64) + 0.1
    model = _positive_irnn(2, directions=directions)
    dep = _cell_dependence(lambda t: model({"conv5": t})["context"], x)
    assert dep.all()


def test_one_layer_sees_its_row_and_column_only():
    x = torch.rand(1, C, H, W, dtype=torch.float64) + 0.1
    model = _positive_irnn(1, recurrent="learned")
    dep = _cell_dependence(lambda t: model({"conv5": t})["context"], x)
    expected = _expected_dependence("right", H, W) | _expected_dependence("left", H, W)
    expected |= _expected_dependence("down", H, W) | _expected_dependence("up", H, W)
    assert torch.equal(dep, expected)
    assert not expected.all()


# ----------------------------------------------------------------------------------------------
# IRNN module
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recurrent", ["learned", "removed"])
@pytest.mark.parametrize("first_step_bias", [False, True])
@pytest.mark.parametrize("directions", ["all", "lr_then_ud"])
@pytest.mark.parametrize("num_layers,output_all", [(1, False), (2, False), (2, True), (3, True)])
def test_irnn_matches_naive(recurrent, first_step_bias, directions, num_layers, output_all):
    cfg = _cfg(
        NUM_LAYERS=num_layers,
        RECURRENT=recurrent,
        DIRECTIONS=directions,
        FIRST_STEP_BIAS=first_step_bias,
        OUTPUT_ALL_LAYERS=output_all,
    )
    model = build_ion_context(cfg, INPUT_SHAPE).double()
    assert isinstance(model, IRNN)
    _randomize(model)
    x = torch.randn(2, C, H, W, dtype=torch.float64)

    out = model({"conv5": x, "conv4": torch.randn(2, 7, 10, 12)})
    ref = naive_irnn(model, x, num_layers, directions, output_all)
    assert list(out) == list(ref)
    expected_keys = [f"context_{i}" for i in range(1, num_layers)] if output_all else []
    assert sorted(out) == sorted(expected_keys + ["context"])
    for key in ref:
        assert out[key].shape == (2, C, H, W)
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-10)
    assert (out["context"] > 0).any()


@pytest.mark.parametrize("recurrent", ["learned", "removed"])
def test_irnn_float32_matches_naive(recurrent):
    cfg = _cfg(RECURRENT=recurrent, FIRST_STEP_BIAS=True)
    model = build_ion_context(cfg, INPUT_SHAPE)
    _randomize(model)
    x = torch.randn(2, C, H, W)
    out = model({"conv5": x})["context"]
    with torch.no_grad():
        ref = naive_irnn(model, x, 2, "all", False)["context"]
    assert out.dtype == torch.float32
    # float32 against a float32 cell loop: rounding grows with the values (~40 here).
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)


def test_irnn_parameters():
    learned = build_ion_context(_cfg(FIRST_STEP_BIAS=True), INPUT_SHAPE)
    removed = build_ion_context(_cfg(RECURRENT="removed"), INPUT_SHAPE)
    for layer in learned.layers:
        assert layer.whh.shape == (4, HIDDEN, HIDDEN)
        assert torch.equal(layer.whh, torch.eye(HIDDEN).expand(4, HIDDEN, HIDDEN))
        assert torch.equal(layer.first_step_bias, torch.zeros(4, HIDDEN))
    assert not any("whh" in n or "first_step_bias" in n for n, _ in removed.named_parameters())
    # per layer: shared C->HIDDEN conv (with bias) and a 4*HIDDEN->C conv (with bias)
    convs = 2 * ((C * HIDDEN + HIDDEN) + (4 * HIDDEN * C + C))
    assert sum(p.numel() for p in removed.parameters()) == convs
    assert sum(p.numel() for p in learned.parameters()) == convs + 2 * 4 * (HIDDEN**2 + HIDDEN)


def test_identity_init_equals_removed():
    learned = build_ion_context(_cfg(RECURRENT="learned"), INPUT_SHAPE).double()
    removed = build_ion_context(_cfg(RECURRENT="removed"), INPUT_SHAPE).double()
    _randomize(removed)
    incompatible = learned.load_state_dict(removed.state_dict(), strict=False)
    assert sorted(incompatible.missing_keys) == ["layers.0.whh", "layers.1.whh"]
    assert not incompatible.unexpected_keys
    x = torch.randn(2, C, H, W, dtype=torch.float64)
    out_learned = learned({"conv5": x})["context"]
    out_removed = removed({"conv5": x})["context"]
    assert (out_removed > 0).any()
    torch.testing.assert_close(out_learned, out_removed, rtol=0, atol=1e-12)


@pytest.mark.parametrize("recurrent", ["learned", "removed"])
def test_irnn_gradcheck(recurrent):
    cfg = _cfg(RECURRENT=recurrent, FIRST_STEP_BIAS=True)
    cfg.MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM = 2
    model = build_ion_context(cfg, {"conv5": ShapeSpec(channels=2, stride=16)}).double()
    _randomize(model)
    params = dict(model.named_parameters())
    names = list(params)
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)

    def fn(inp, *values):
        p = {k: v for k, v in zip(names, values)}
        return torch.func.functional_call(model, p, ({"conv5": inp},))["context"]

    values = tuple(v.detach().clone().requires_grad_(True) for v in params.values())
    assert torch.autograd.gradcheck(fn, (x,) + values, eps=1e-6, atol=1e-5)


def test_irnn_rejects_missing_feature_at_forward():
    model = build_ion_context(_cfg(), INPUT_SHAPE)
    with pytest.raises(KeyError, match="conv5.*conv4"):
        model({"conv4": torch.randn(1, 7, 2, 2)})


# ----------------------------------------------------------------------------------------------
# Every context module
# ----------------------------------------------------------------------------------------------
ALL_MODULES = [
    ("IRNN", {}),
    ("IRNN", {"RECURRENT": "removed", "FIRST_STEP_BIAS": True}),
    ("IRNN", {"OUTPUT_ALL_LAYERS": True, "DIRECTIONS": "lr_then_ud"}),
    ("IRNN", {"WIRING": "paper"}),
    ("IRNN", {"WIRING": "paper", "OUTPUT_ALL_LAYERS": True, "DIRECTIONS": "lr_then_ud"}),
    ("StackedConv", {}),
    ("GlobalAvgPool", {}),
]


@pytest.mark.parametrize("name,irnn", ALL_MODULES)
@pytest.mark.parametrize("size", [(1, 1), (H, W)])
def test_output_shape_matches_output(name, irnn, size):
    cfg = _cfg(name, **irnn)
    cfg.MODEL.ION.CONTEXT.IN_FEATURE = "conv4"
    model = build_ion_context(cfg, INPUT_SHAPE)
    _randomize(model)
    x = torch.randn(2, 7, *size)
    out = model({"conv4": x, "conv5": torch.randn(2, C, 3, 3)})
    shapes = model.output_shape()
    assert sorted(out) == sorted(shapes)
    assert "context" in out
    for key, tensor in out.items():
        assert tensor.shape == (2, shapes[key].channels, *size)
        assert shapes[key].stride == 8
        assert torch.isfinite(tensor).all()


def test_irnn_one_by_one_matches_naive():
    model = build_ion_context(_cfg(FIRST_STEP_BIAS=True, OUTPUT_ALL_LAYERS=True), INPUT_SHAPE)
    model = model.double()
    _randomize(model)
    x = torch.randn(3, C, 1, 1, dtype=torch.float64)
    out = model({"conv5": x})
    ref = naive_irnn(model, x, 2, "all", True)
    for key in ("context_1", "context"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel_size,num_layers", [(3, 2), (5, 2), (1, 1), (3, 3)])
def test_stacked_conv_matches_reference(kernel_size, num_layers):
    cfg = _cfg("StackedConv")
    cfg.MODEL.ION.CONTEXT.CONV.KERNEL_SIZE = kernel_size
    cfg.MODEL.ION.CONTEXT.CONV.NUM_LAYERS = num_layers
    model = build_ion_context(cfg, INPUT_SHAPE)
    assert isinstance(model, StackedConv)
    _randomize(model)
    x = torch.randn(2, C, H, W)
    ref = x
    for conv in model.convs:
        assert conv.weight.shape[-2:] == (kernel_size, kernel_size)
        ref = F.relu(F.conv2d(ref, conv.weight, conv.bias, padding=kernel_size // 2))
    out = model({"conv5": x})["context"]
    assert out.shape == (2, 3, H, W)
    assert len(model.convs) == num_layers
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert model.output_shape() == {"context": ShapeSpec(channels=3, stride=16)}


def test_global_avg_pool_matches_reference():
    model = build_ion_context(_cfg("GlobalAvgPool"), INPUT_SHAPE)
    assert isinstance(model, GlobalAvgPool)
    assert not list(model.parameters())
    x = torch.randn(2, C, H, W)
    out = model({"conv5": x})["context"]
    ref = torch.zeros(2, C, H, W)
    for b, c in itertools.product(range(2), range(C)):
        ref[b, c] = x[b, c].sum() / (H * W)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert model.output_shape() == {"context": ShapeSpec(channels=C, stride=16)}


# ----------------------------------------------------------------------------------------------
# Building and config validation
# ----------------------------------------------------------------------------------------------
def test_registry_names():
    expected = {"IRNN": IRNN, "StackedConv": StackedConv, "GlobalAvgPool": GlobalAvgPool}
    for name, cls in expected.items():
        assert ION_CONTEXT_REGISTRY.get(name) is cls


def test_empty_name_gives_none():
    assert build_ion_context(_cfg(""), INPUT_SHAPE) is None


def test_unknown_name_raises():
    with pytest.raises(KeyError, match=r"NoSuchContext.*GlobalAvgPool.*IRNN.*StackedConv"):
        build_ion_context(_cfg("NoSuchContext"), INPUT_SHAPE)


@pytest.mark.parametrize("name", ["IRNN", "StackedConv", "GlobalAvgPool"])
def test_missing_in_feature_raises(name):
    cfg = _cfg(name)
    cfg.MODEL.ION.CONTEXT.IN_FEATURE = "res5"
    with pytest.raises(ValueError, match=r"res5.*conv4.*conv5"):
        build_ion_context(cfg, INPUT_SHAPE)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("RECURRENT", "frozen", r"frozen.*learned.*removed"),
        ("DIRECTIONS", "diagonal", r"diagonal.*all.*lr_then_ud"),
        ("NUM_LAYERS", 0, r"num_layers=0.*>= 1"),
        ("HIDDEN_DIM", 0, r"hidden_dim=0.*>= 1"),
    ],
)
def test_irnn_bad_config_raises(key, value, match):
    with pytest.raises(ValueError, match=match):
        build_ion_context(_cfg(**{key: value}), INPUT_SHAPE)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("KERNEL_SIZE", 4, r"kernel_size=4.*odd"),
        ("KERNEL_SIZE", 0, r"kernel_size=0.*odd"),
        ("NUM_LAYERS", 0, r"num_layers=0.*>= 1"),
        ("CHANNELS", 0, r"channels=0.*>= 1"),
    ],
)
def test_stacked_conv_bad_config_raises(key, value, match):
    cfg = _cfg("StackedConv")
    cfg.MODEL.ION.CONTEXT.CONV[key] = value
    with pytest.raises(ValueError, match=match):
        build_ion_context(cfg, INPUT_SHAPE)


def test_irnn_and_stacked_conv_table_10c():
    from ion_d2.modeling.context import IRNN, IRNNAndStackedConv, StackedConv

    cfg = _cfg("IRNNAndStackedConv")
    cfg.MODEL.ION.CONTEXT.CONV.CHANNELS = 5
    shapes = {"conv5": ShapeSpec(channels=4, stride=16)}
    module = build_ion_context(cfg, shapes)
    assert isinstance(module, IRNNAndStackedConv)
    x = torch.randn(2, 4, 5, 6)
    out = module({"conv5": x})
    assert set(out) == {"context", "context_conv"}
    assert torch.allclose(out["context"], module.irnn({"conv5": x})["context"])
    assert torch.allclose(out["context_conv"], module.stacked_conv({"conv5": x})["context"])
    assert out["context_conv"].shape == (2, 5, 5, 6)
    assert {k: (v.channels, v.stride) for k, v in module.output_shape().items()} == {
        "context": (4, 16),
        "context_conv": (5, 16),
    }
    assert isinstance(module.irnn, IRNN) and isinstance(module.stacked_conv, StackedConv)


# ----------------------------------------------------------------------------------------------
# Input-to-hidden per direction and concat dropout (section 3.2)
# ----------------------------------------------------------------------------------------------
def test_default_checkpoint_keys_unchanged():
    cfg = _cfg(FIRST_STEP_BIAS=True)
    cfg.MODEL.ION.CONTEXT.IRNN.CONCAT_DROPOUT = 0.25  # the default
    model = build_ion_context(cfg, INPUT_SHAPE)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {}
    for i in range(2):
        expected.update(
            {
                f"layers.{i}.input_to_hidden.weight": (HIDDEN, C, 1, 1),
                f"layers.{i}.input_to_hidden.bias": (HIDDEN,),
                f"layers.{i}.hidden_to_output.weight": (C, 4 * HIDDEN, 1, 1),
                f"layers.{i}.hidden_to_output.bias": (C,),
                f"layers.{i}.whh": (4, HIDDEN, HIDDEN),
                f"layers.{i}.first_step_bias": (4, HIDDEN),
            }
        )
    assert shapes == expected


@pytest.mark.parametrize("recurrent", ["learned", "removed"])
def test_input_to_hidden_per_direction_matches_naive(recurrent):
    cfg = _cfg(RECURRENT=recurrent, FIRST_STEP_BIAS=True, SHARED_INPUT_TO_HIDDEN=False)
    model = build_ion_context(cfg, INPUT_SHAPE).double()
    _randomize(model)
    layer = model.layers[0]
    # 4 directions' convs: 3 more weights and biases than the shared conv, per layer (the 6
    # convs of section 3.2 over 2 layers).
    assert layer.input_to_hidden.weight.shape == (4 * HIDDEN, C, 1, 1)
    assert layer.input_to_hidden.bias.shape == (4 * HIDDEN,)
    x = torch.randn(2, C, H, W, dtype=torch.float64)

    # One direction, cell by cell, with its own conv.
    d = DIRECTIONS.index("left")
    weight, bias = layer.input_to_hidden.weight, layer.input_to_hidden.bias
    hidden = torch.zeros(2, HIDDEN, H, W, dtype=torch.float64)
    for b, i, j in itertools.product(range(2), range(H), range(W)):
        hidden[b, :, i, j] = weight[d * HIDDEN : (d + 1) * HIDDEN, :, 0, 0] @ x[b, :, i, j]
        hidden[b, :, i, j] += bias[d * HIDDEN : (d + 1) * HIDDEN]
    whh = None if layer.whh is None else layer.whh[d]
    ref = naive_scan(hidden, whh, "left", layer.first_step_bias[d])
    states = layer.direction_states(x)
    torch.testing.assert_close(states["left"], ref, rtol=0, atol=1e-12)
    # The directions' inputs differ (a shared conv would give "right" the same input).
    assert not torch.allclose(states["right"], naive_scan(hidden, whh, "right"))

    out = model({"conv5": x})["context"]
    torch.testing.assert_close(
        out, naive_irnn(model, x, 2, "all", False)["context"], atol=1e-10, rtol=0
    )


def _concat_of(layer, fn):
    """Run fn() and return what layer's hidden-to-output conv received."""
    seen = []
    handle = layer.hidden_to_output.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        out = fn()
    finally:
        handle.remove()
    return seen[0], out


def test_concat_dropout_in_training_only():
    p = 0.25
    cfg = _cfg(HIDDEN_DIM=16, CONCAT_DROPOUT=p)
    model = build_ion_context(cfg, INPUT_SHAPE)
    _randomize(model, whh_noise=0.0)
    x = torch.randn(2, C, 8, 8)
    layer = model.layers[0]

    model.eval()
    clean, out_eval = _concat_of(layer, lambda: model({"conv5": x})["context"])
    torch.testing.assert_close(out_eval, naive_irnn(model, x, 2, "all", False)["context"])
    clean_again, _ = _concat_of(layer, lambda: model({"conv5": x})["context"])
    assert torch.equal(clean, clean_again)

    model.train()
    dropped, out_train = _concat_of(layer, lambda: model({"conv5": x})["context"])
    assert not torch.allclose(out_train, out_eval)
    active = clean > 0
    zeroed = (dropped[active] == 0).float().mean().item()
    assert active.sum() > 1000 and abs(zeroed - p) < 0.05
    kept = dropped[active] != 0
    torch.testing.assert_close(dropped[active][kept], clean[active][kept] / (1 - p))

    model = build_ion_context(_cfg(CONCAT_DROPOUT=0.0), INPUT_SHAPE).train()
    assert not any(isinstance(m, (torch.nn.Dropout, IONDropout)) for m in model.modules())
    assert torch.equal(model({"conv5": x})["context"], model.eval()({"conv5": x})["context"])


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_concat_dropout_bad_value_raises(p):
    with pytest.raises(ValueError, match=rf"concat_dropout={p}.*\[0, 1\)"):
        build_ion_context(_cfg(CONCAT_DROPOUT=p), INPUT_SHAPE)


# ----------------------------------------------------------------------------------------------
# Batch independence: an image's context alone equals its context beside a larger image
# ----------------------------------------------------------------------------------------------
STRIDE = 16
SIZE_A, SIZE_B = (40, 60), (80, 96)  # 3 x 4 and 5 x 6 valid cells at stride 16
CELLS_A = (3, 4)


def _batch_with_garbage(a, b, a_first):
    """A (N=1, C, 3, 4) and B (1, C, 5, 6) in one (2, C, 5, 6) map, A's padding random (as the
    padding's activations in a trunk would be)."""
    padded = torch.randn(1, a.shape[1], *b.shape[-2:], dtype=a.dtype) * 3
    padded[..., : a.shape[-2], : a.shape[-1]] = a
    batch = torch.cat([padded, b] if a_first else [b, padded])
    sizes = [SIZE_A, SIZE_B] if a_first else [SIZE_B, SIZE_A]
    return batch, sizes


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("learned", [True, False])
def test_scans_start_at_each_images_edge(direction, learned):
    a = torch.randn(1, HIDDEN, *CELLS_A, dtype=torch.float64)
    b = torch.randn(1, HIDDEN, 5, 6, dtype=torch.float64)
    whh = torch.eye(HIDDEN, dtype=torch.float64) + 0.3 * torch.randn(HIDDEN, HIDDEN).double()
    b0 = torch.randn(HIDDEN, dtype=torch.float64)
    batch, _ = _batch_with_garbage(a, b, a_first=True)
    valid = torch.tensor([list(CELLS_A), [5, 6]])

    if learned:
        out = _irnn_scan(batch, whh, direction, b0, valid)
    else:
        out = _irnn_scan_identity(batch, direction, b0, valid)
    ref_whh = whh if learned else None
    torch.testing.assert_close(
        out[:1, :, :3, :4], naive_scan(a, ref_whh, direction, b0), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(out[1:], naive_scan(b, ref_whh, direction, b0), atol=1e-12, rtol=0)
    outside = torch.ones(5, 6, dtype=torch.bool)
    outside[:3, :4] = False
    assert (out[0][:, outside] == 0).all()


# name, IRNN keys, dtype
BATCH_CASES = [
    ("IRNN", {"RECURRENT": "learned", "FIRST_STEP_BIAS": True}, torch.float64),
    ("IRNN", {"RECURRENT": "removed", "FIRST_STEP_BIAS": True}, torch.float64),
    ("IRNN", {"RECURRENT": "learned", "FIRST_STEP_BIAS": True}, torch.float32),
    ("IRNN", {"RECURRENT": "removed", "FIRST_STEP_BIAS": True}, torch.float32),
    ("IRNN", {"DIRECTIONS": "lr_then_ud", "OUTPUT_ALL_LAYERS": True}, torch.float64),
    ("IRNN", {"SHARED_INPUT_TO_HIDDEN": False, "FIRST_STEP_BIAS": True}, torch.float64),
    (
        "IRNN",
        {"WIRING": "paper", "FIRST_STEP_BIAS": True, "OUTPUT_ALL_LAYERS": True},
        torch.float64,
    ),
    (
        "IRNN",
        {"WIRING": "paper", "FIRST_STEP_BIAS": True, "OUTPUT_ALL_LAYERS": True},
        torch.float32,
    ),
    ("StackedConv", {}, torch.float64),
    ("StackedConv", {}, torch.float32),
    ("GlobalAvgPool", {}, torch.float64),
    ("GlobalAvgPool", {}, torch.float32),
    ("IRNNAndStackedConv", {}, torch.float64),
]


@pytest.mark.parametrize("name,irnn,dtype", BATCH_CASES)
@pytest.mark.parametrize("a_first", [True, False])
def test_context_does_not_depend_on_the_batch(name, irnn, dtype, a_first):
    model = build_ion_context(_cfg(name, **irnn), INPUT_SHAPE).to(dtype)
    _randomize(model)
    a = torch.randn(1, C, *CELLS_A, dtype=dtype)
    b = torch.randn(1, C, 5, 6, dtype=dtype)
    batch, sizes = _batch_with_garbage(a, b, a_first)
    ia = 0 if a_first else 1

    alone = model({"conv5": a}, [SIZE_A])
    together = model({"conv5": batch}, sizes)
    # float32: to 1e-6 of the map's largest value, the scans' own rounding (a batched matmul
    # rounds differently from a single image's; the float64 cases are exact to 1e-12).
    scale = max(1.0, alone["context"].abs().max().item(), together["context"].abs().max().item())
    tol = {"rtol": 0, "atol": 1e-12 if dtype == torch.float64 else 1e-6 * scale}
    assert alone.keys() == together.keys()
    for key, value in alone.items():
        assert (value > 0).any()
        torch.testing.assert_close(together[key][ia : ia + 1, :, :3, :4], value, **tol)
        torch.testing.assert_close(together[key][1 - ia : 2 - ia], model({"conv5": b})[key], **tol)
        # Padded cells get no context.
        padding = together[key][ia].clone()
        padding[:, :3, :4] = 0
        assert (padding == 0).all()
    # Without the sizes the padding leaks into A (the behaviour before image_sizes existed).
    leaky = model({"conv5": batch})["context"][ia : ia + 1, :, :3, :4]
    assert not torch.allclose(leaky, alone["context"], **tol)


@pytest.mark.parametrize("name,irnn", ALL_MODULES + [("IRNNAndStackedConv", {})])
def test_full_image_sizes_change_nothing(name, irnn):
    # Equal-size images that fill the map: exactly the output without sizes.
    model = build_ion_context(_cfg(name, **irnn), INPUT_SHAPE)
    _randomize(model)
    x = torch.randn(2, C, H, W)
    sizes = [(H * STRIDE - 5, W * STRIDE - 15)] * 2  # ceil(size / 16) = (H, W)
    with_sizes, without = model({"conv5": x}, sizes), model({"conv5": x})
    for key in without:
        assert torch.equal(with_sizes[key], without[key])


def test_image_sizes_must_match_batch():
    model = build_ion_context(_cfg(), INPUT_SHAPE)
    with pytest.raises(ValueError, match="3 image sizes for a batch of 2"):
        model({"conv5": torch.randn(2, C, H, W)}, [(10, 10)] * 3)


@pytest.mark.parametrize("recurrent", ["learned", "removed"])
def test_irnn_gradcheck_with_image_sizes(recurrent):
    cfg = _cfg(RECURRENT=recurrent, FIRST_STEP_BIAS=True)
    cfg.MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM = 2
    model = build_ion_context(cfg, {"conv5": ShapeSpec(channels=2, stride=16)}).double()
    with torch.no_grad():  # positive weights keep the ReLUs mostly open: gradients to check
        for p in model.parameters():
            p.copy_(p.abs() + 0.05)
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    sizes = [(33, 40), (48, 64)]  # 3 x 3 and 3 x 4 cells
    assert torch.autograd.gradcheck(
        lambda t: model({"conv5": t}, sizes)["context"], (x,), eps=1e-6, atol=1e-5
    )
    # No gradient reaches the padding (and some reaches the image: the check is not vacuous).
    out = model({"conv5": x}, sizes)["context"]
    out[0].pow(2).sum().backward()
    assert (x.grad[0, :, :, 3] == 0).all() and (x.grad[0, :, :, :3] != 0).any()
