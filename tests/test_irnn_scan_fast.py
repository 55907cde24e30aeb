"""
The IRNN's step-loop scans (:func:`ion_d2.modeling.context.irnn_scan.irnn_scans`, channels last, all directions
at once, custom backward) and the IRNN module built on them, against a copy of the
implementation they replaced and against a cell-by-cell loop.
"""

from typing import List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from model_utils import ion_cfg

from ion_d2.modeling.context import build_ion_context
from ion_d2.modeling.context.irnn_scan import (
    IRNN_DIRECTIONS,
    _identity_closed_form,
    irnn_scan,
    irnn_scan_identity,
    irnn_scans,
)
from ion_d2.modeling.padding import valid_cell_mask, valid_cells_of, zero_outside_valid_cells

C, HIDDEN, H, W = 4, 3, 5, 6
STRIDE = 16
MIXED_SIZES = [(40, 60), (80, 96)]  # 3 x 4 and 5 x 6 valid cells of a 5 x 6 map at stride 16
MIXED_CELLS = torch.tensor([[3, 4], [5, 6]])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------
# REFERENCE: the implementation before irnn_scans (ion_d2/modeling/context/irnn_scan.py and the _IRNNLayer /
# IRNN forward of ion_d2/modeling/context/irnn.py at commit 1b41e24), copied unchanged but for names.
# ----------------------------------------------------------------------------------------------
def ref_irnn_scan(x, whh, direction, first_step_bias=None, valid_cells=None):
    x = zero_outside_valid_cells(x, valid_cells)
    x = _ref_add_first_step_bias(x, direction, first_step_bias, valid_cells)
    return zero_outside_valid_cells(_ref_learned_recurrence(x, whh, direction), valid_cells)


def ref_irnn_scan_identity(x, direction, first_step_bias=None, valid_cells=None):
    x = zero_outside_valid_cells(x, valid_cells)
    x = _ref_add_first_step_bias(x, direction, first_step_bias, valid_cells)
    return zero_outside_valid_cells(_ref_identity_recurrence(x, direction), valid_cells)


def _ref_scan_dim(direction: str) -> Tuple[int, bool]:
    if direction == "right":
        return 3, False
    if direction == "left":
        return 3, True
    if direction == "down":
        return 2, False
    if direction == "up":
        return 2, True
    raise ValueError(f"Unknown IRNN direction {direction!r}; expected one of {IRNN_DIRECTIONS}.")


def _ref_first_cells(direction, valid_cells, height, width):
    dim, reverse = _ref_scan_dim(direction)
    rows = torch.arange(height, device=valid_cells.device)[None, :]
    cols = torch.arange(width, device=valid_cells.device)[None, :]
    valid_h, valid_w = valid_cells[:, :1], valid_cells[:, 1:]
    if dim == 3:
        start = cols == (valid_w - 1 if reverse else 0)
        first = (rows < valid_h)[:, :, None] & start[:, None, :]
    else:
        start = rows == (valid_h - 1 if reverse else 0)
        first = start[:, :, None] & (cols < valid_w)[:, None, :]
    return first[:, None]


def _ref_add_first_step_bias(x, direction, first_step_bias, valid_cells):
    if first_step_bias is None:
        return x
    n, _, height, width = x.shape
    if valid_cells is None:
        valid_cells = torch.tensor([[height, width]], device=x.device).expand(n, 2)
    first = _ref_first_cells(direction, valid_cells, height, width)
    return torch.where(first, x + first_step_bias.view(1, -1, 1, 1), x)


def _ref_learned_recurrence(x, whh, direction):
    dim, reverse = _ref_scan_dim(direction)
    n, c, height, width = x.shape
    if dim == 3:
        seq = x.permute(3, 0, 2, 1).reshape(width, n * height, c)
    else:
        seq = x.permute(2, 0, 3, 1).reshape(height, n * width, c)
    length = seq.shape[0]
    whh_t = whh.t()
    steps = range(length - 1, -1, -1) if reverse else range(length)
    states: List[Optional[torch.Tensor]] = [None] * length
    h: Optional[torch.Tensor] = None
    for t in steps:
        h = torch.relu(seq[t] if h is None else torch.addmm(seq[t], h, whh_t))
        states[t] = h
    out = torch.stack(states, dim=0)
    if dim == 3:
        return out.view(width, n, height, c).permute(1, 3, 2, 0)
    return out.view(height, n, width, c).permute(1, 3, 0, 2)


def _ref_identity_recurrence(x, direction):
    dim, reverse = _ref_scan_dim(direction)
    if reverse:
        x = x.flip(dim)
    prefix = torch.cumsum(x, dim=dim)
    running_min = torch.cummin(prefix, dim=dim).values.clamp(max=0)
    h = prefix - running_min
    return h.flip(dim) if reverse else h


def _ref_direction_states(layer, x, valid_cells=None):
    hidden = layer.input_to_hidden(x)
    if layer.shared_input_to_hidden:
        inputs = [hidden] * len(layer.directions)
    else:
        inputs = hidden.chunk(len(layer.directions), dim=1)
    states = {}
    for i, direction in enumerate(layer.directions):
        b0 = None if layer.first_step_bias is None else layer.first_step_bias[i]
        if layer.whh is None:
            states[direction] = ref_irnn_scan_identity(inputs[i], direction, b0, valid_cells)
        else:
            states[direction] = ref_irnn_scan(inputs[i], layer.whh[i], direction, b0, valid_cells)
    return states


def _ref_layer_forward(layer, x, valid_cells=None):
    concat = layer.dropout(
        torch.cat(list(_ref_direction_states(layer, x, valid_cells).values()), 1)
    )
    out = layer.hidden_to_output(concat)
    if valid_cells is not None:
        out.masked_fill_(~valid_cell_mask(valid_cells, x.shape[-2], x.shape[-1]), 0.0)
    return F.relu(out)


def ref_irnn_forward(module, features, image_sizes=None):
    x = features[module.in_feature]
    valid_cells = valid_cells_of(image_sizes, module._stride, x)
    outputs = []
    for layer in module.layers:
        x = _ref_layer_forward(layer, x, valid_cells)
        outputs.append(x)
    if not module.output_all_layers:
        outputs = outputs[-1:]
    return dict(zip(module._output_names(), outputs))


# ----------------------------------------------------------------------------------------------
# Slow reference: each image's valid cells, one cell at a time.
# ----------------------------------------------------------------------------------------------
def naive_scan(x, whh, direction, b0=None, valid_cells=None):
    """h_t = relu(whh @ h_{t-1} + x_t) (whh None: identity) over each image's valid cells."""
    n, c, height, width = x.shape
    out = torch.zeros_like(x)
    for b in range(n):
        rows, cols = (height, width) if valid_cells is None else valid_cells[b].tolist()
        if direction in ("right", "left"):
            order = list(range(cols)) if direction == "right" else list(range(cols))[::-1]
            lines = [[(i, j) for j in order] for i in range(rows)]
        else:
            order = list(range(rows)) if direction == "down" else list(range(rows))[::-1]
            lines = [[(i, j) for i in order] for j in range(cols)]
        for line in lines:
            h = torch.zeros(c, dtype=x.dtype)
            for step, (i, j) in enumerate(line):
                inp = x[b, :, i, j] + (b0 if step == 0 and b0 is not None else 0)
                h = torch.clamp((h if whh is None else whh @ h) + inp, min=0)
                out[b, :, i, j] = h
    return out


# ----------------------------------------------------------------------------------------------
# One direction
# ----------------------------------------------------------------------------------------------
def _scan_inputs(with_b0, n=2):
    x = torch.randn(n, HIDDEN, H, W, dtype=torch.float64, requires_grad=True)
    whh = torch.eye(HIDDEN, dtype=torch.float64) + 0.4 * torch.randn(HIDDEN, HIDDEN).double()
    whh.requires_grad_(True)
    b0 = torch.randn(HIDDEN, dtype=torch.float64, requires_grad=True) if with_b0 else None
    return x, whh, b0


def _value_and_grads(out, inputs, upstream):
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None], upstream)
    return [out.detach()] + list(grads)


@pytest.mark.parametrize("direction", IRNN_DIRECTIONS)
@pytest.mark.parametrize("scan", ["learned", "step", "closed_form"])
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("with_b0", [False, True])
def test_scan_matches_reference(direction, scan, with_valid, with_b0):
    x, whh, b0 = _scan_inputs(with_b0)
    valid = MIXED_CELLS if with_valid else None
    upstream = torch.randn(2, HIDDEN, H, W, dtype=torch.float64)
    if scan == "learned":
        inputs = (x, whh, b0)
        new = irnn_scan(x, whh, direction, b0, valid)
        ref = ref_irnn_scan(x, whh, direction, b0, valid)
    else:
        inputs = (x, b0)
        new = irnn_scan_identity(x, direction, b0, valid, method=scan)
        ref = ref_irnn_scan_identity(x, direction, b0, valid)
    assert (ref == 0).any() and (ref > 0).any()  # resets happen: the ReLU matters
    for a, b in zip(
        _value_and_grads(new, inputs, upstream), _value_and_grads(ref, inputs, upstream)
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("direction", IRNN_DIRECTIONS)
@pytest.mark.parametrize("with_valid", [False, True])
def test_identity_step_and_closed_form_match_each_other_and_naive(direction, with_valid):
    x, _, b0 = _scan_inputs(with_b0=True)
    valid = MIXED_CELLS if with_valid else None
    upstream = torch.randn(2, HIDDEN, H, W, dtype=torch.float64)
    step = irnn_scan_identity(x, direction, b0, valid, method="step")
    closed = irnn_scan_identity(x, direction, b0, valid, method="closed_form")
    naive = naive_scan(x.detach(), None, direction, b0.detach(), valid)
    torch.testing.assert_close(step, naive, rtol=0, atol=1e-12)
    torch.testing.assert_close(closed, naive, rtol=0, atol=1e-12)
    grads_step = torch.autograd.grad(step, (x, b0), upstream)
    grads_closed = torch.autograd.grad(closed, (x, b0), upstream)
    for a, b in zip(grads_step, grads_closed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_identity_method_is_chosen_per_device():
    # The step loop on a CPU, the closed form on a GPU (see _identity_closed_form).
    assert not _identity_closed_form("auto", torch.device("cpu"))
    assert _identity_closed_form("auto", torch.device("cuda"))
    assert _identity_closed_form("closed_form", torch.device("cpu"))
    assert not _identity_closed_form("step", torch.device("cuda"))
    x = torch.randn(2, HIDDEN, H, W)
    auto = irnn_scan_identity(x, "left", valid_cells=MIXED_CELLS)
    assert torch.equal(auto, irnn_scan_identity(x, "left", valid_cells=MIXED_CELLS, method="step"))


# ----------------------------------------------------------------------------------------------
# All directions at once
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("learned", [True, False])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("n,valid", [(1, None), (1, [[4, 3]]), (2, None), (2, [[3, 4], [5, 6]])])
def test_irnn_scans_match_reference_per_direction(learned, shared, n, valid):
    # n = 1 steps down/up one (W, C) matrix per step, n = 2 one (W, C) matrix per image.
    dirs = IRNN_DIRECTIONS
    valid = None if valid is None else torch.tensor(valid)
    k = 1 if shared else len(dirs)
    x = torch.randn(n, H, W, k, HIDDEN, dtype=torch.float64, requires_grad=True)
    whh = torch.eye(HIDDEN, dtype=torch.float64) + 0.4 * torch.randn(4, HIDDEN, HIDDEN).double()
    whh.requires_grad_(True)
    b0 = torch.randn(4, HIDDEN, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(n, H, W, 4, HIDDEN, dtype=torch.float64)
    inputs = (x, whh, b0) if learned else (x, b0)

    new = irnn_scans(x, dirs, whh if learned else None, b0, valid)
    assert new.shape == (n, H, W, 4, HIDDEN) and new.is_contiguous()
    ref_states = []
    for d, direction in enumerate(dirs):
        x_d = x[:, :, :, d if k > 1 else 0].permute(0, 3, 1, 2)
        if learned:
            ref_d = ref_irnn_scan(x_d, whh[d], direction, b0[d], valid)
        else:
            ref_d = ref_irnn_scan_identity(x_d, direction, b0[d], valid)
        ref_states.append(ref_d.permute(0, 2, 3, 1))
    ref = torch.stack(ref_states, dim=3)
    for a, b in zip(
        _value_and_grads(new, inputs, upstream), _value_and_grads(ref, inputs, upstream)
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"x": torch.zeros(1, 5, 6, 3)}, r"x of shape \(1, 5, 6, 3\).*\(N, H, W, K, C\)"),
        ({"x": torch.zeros(1, 5, 6, 3, 3)}, r"K = 1 .* or K = 2"),
        ({"whh": torch.zeros(2, 3, 2)}, r"whh of shape \(2, 3, 2\); expected \(2, 3, 3\)"),
        (
            {"first_step_bias": torch.zeros(3)},
            r"first_step_bias of shape \(3,\); expected \(2, 3\)",
        ),
        ({"identity_method": "cumsum"}, r"'cumsum'.*'auto', 'step', 'closed_form'"),
        ({"directions": ("right", "diagonal")}, r"'diagonal'.*'right', 'left', 'down', 'up'"),
    ],
)
def test_irnn_scans_rejects_bad_input(kwargs, match):
    args = {"x": torch.zeros(1, 5, 6, 1, 3), "directions": ("right", "up")}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        irnn_scans(**args)


# ----------------------------------------------------------------------------------------------
# The IRNN module
# ----------------------------------------------------------------------------------------------
MODULE_CASES = [
    {"RECURRENT": "learned", "FIRST_STEP_BIAS": True},
    {"RECURRENT": "removed", "FIRST_STEP_BIAS": True},
    {"RECURRENT": "learned", "SHARED_INPUT_TO_HIDDEN": False},
    {"RECURRENT": "removed", "SHARED_INPUT_TO_HIDDEN": False, "FIRST_STEP_BIAS": True},
    {"RECURRENT": "learned", "DIRECTIONS": "lr_then_ud", "OUTPUT_ALL_LAYERS": True},
    {"RECURRENT": "removed", "DIRECTIONS": "lr_then_ud", "OUTPUT_ALL_LAYERS": True},
]


def _module(irnn, dropout):
    overrides = {
        "MODEL.ION.CONTEXT.NAME": "IRNN",
        "MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM": HIDDEN,
        "MODEL.ION.CONTEXT.IRNN.CONCAT_DROPOUT": dropout,
    }
    overrides.update({f"MODEL.ION.CONTEXT.IRNN.{k}": v for k, v in irnn.items()})
    shape = {"conv5": ShapeSpec(channels=C, stride=STRIDE)}
    model = build_ion_context(ion_cfg(overrides), shape).double()
    with torch.no_grad():  # every parameter away from its init
        for name, p in model.named_parameters():
            p.add_((0.3 if name.endswith("whh") else 0.5) * torch.randn_like(p))
    return model


@pytest.mark.parametrize("irnn", MODULE_CASES)
@pytest.mark.parametrize("sizes", [None, MIXED_SIZES])
@pytest.mark.parametrize("train", [False, True])
def test_irnn_module_matches_reference(irnn, sizes, train):
    # In training with dropout: the same seed gives the same dropout masks as before.
    model = _module(irnn, dropout=0.25 if train else 0.0).train(train)
    x = torch.randn(2, C, H, W, dtype=torch.float64, requires_grad=True)
    params = [x] + list(model.parameters())
    results = []
    for forward in (model, lambda f, s: ref_irnn_forward(model, f, s)):
        torch.manual_seed(1)
        outputs = forward({"conv5": x}, sizes)
        total = sum((o * torch.randn_like(o)).sum() for o in outputs.values())
        results.append((outputs, torch.autograd.grad(total, params)))
    (new, new_grads), (ref, ref_grads) = results
    assert new.keys() == ref.keys()
    for name in ref:
        assert new[name].is_contiguous()
        assert (ref[name] > 0).any()
        torch.testing.assert_close(new[name], ref[name], rtol=0, atol=1e-12)
    for a, b in zip(new_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("recurrent", ["learned", "removed"])
def test_irnn_module_float32_matches_reference(recurrent):
    # float32 convs and scans at a less tiny size: the same results within float tolerance.
    overrides = {
        "MODEL.ION.CONTEXT.NAME": "IRNN",
        "MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM": 16,
        "MODEL.ION.CONTEXT.IRNN.RECURRENT": recurrent,
    }
    model = build_ion_context(ion_cfg(overrides), {"conv5": ShapeSpec(channels=8, stride=16)})
    model.eval()
    x = torch.randn(1, 8, 9, 13)
    with torch.no_grad():
        new = model({"conv5": x})["context"]
        ref = ref_irnn_forward(model, {"conv5": x})["context"]
    assert (ref > 0).any()
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recurrent", ["learned", "removed"])
def test_irnn_module_under_autocast_matches_reference(recurrent):
    # Autocast runs the convs in bfloat16 and leaves Whh in float32: the in-place steps, which
    # autocast does not cast, must still work as the reference's autocast addmm does.
    model = _module({"RECURRENT": recurrent}, dropout=0.0).float()
    x = torch.randn(2, C, H, W, requires_grad=True)
    params = [x] + list(model.parameters())
    results = []
    for forward in (model, lambda f, s: ref_irnn_forward(model, f, s)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward({"conv5": x}, MIXED_SIZES)["context"]
        assert out.dtype == torch.bfloat16
        results.append((out.float(), torch.autograd.grad(out.float().sum(), params)))
    (new, new_grads), (ref, ref_grads) = results
    assert (ref > 0).any()
    torch.testing.assert_close(new, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
    if recurrent == "removed":
        # The reference's closed form sums prefixes in bfloat16: where a state is near 0 its
        # ReLU may reset there and not in the step loop, so only the forward is comparable.
        assert all(g.isfinite().all() and (g != 0).any() for g in new_grads)
        return
    for a, b in zip(new_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * b.abs().max().item())
