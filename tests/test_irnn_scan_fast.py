"""
The IRNN's step-loop scans (:func:`ion_d2.modeling.context.irnn_scan.irnn_scans`, channels last, all
directions at once, custom backward) and the IRNN module built on them, against an independent
reference: a plain Python loop over each image's valid cells, one cell at a time, written from the
IRNN's definition (section 3.2), whose gradients autograd computes.
"""

import math
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from model_utils import ion_cfg, ref_dropout_mask

from ion_d2.modeling.context import build_ion_context
from ion_d2.modeling.context.irnn_scan import (
    IRNN_DIRECTIONS,
    _identity_closed_form,
    _irnn_scan,
    _irnn_scan_identity,
    irnn_scans,
)

C, HIDDEN, H, W = 4, 3, 5, 6
STRIDE = 16
MIXED_SIZES = [(40, 60), (80, 96)]  # 3 x 4 and 5 x 6 valid cells of a 5 x 6 map at stride 16
MIXED_COUNTS = torch.tensor([[3, 4], [5, 6]])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------
# REFERENCE, written from the definition (section 3.2 and ion_d2/modeling/padding.py), not from the
# code:
# one direction moves along each line (row or column) of an image's valid cells from its own
# edge and computes h_t = ReLU(Whh @ h_{t-1} + x_t) with h_{-1} = 0 (Whh = I when the recurrent
# transition is removed), b0 added to x at the line's first cell; the cells outside the image's
# valid cells (the top-left ceil(h / stride) x ceil(w / stride)) are never read and output 0.
# ----------------------------------------------------------------------------------------------
def ref_lines(direction: str, rows: int, cols: int) -> List[List[Tuple[int, int]]]:
    """The scan lines of a ``rows`` x ``cols`` image, each a list of (i, j) in scan order."""
    if direction == "right":
        return [[(i, j) for j in range(cols)] for i in range(rows)]
    if direction == "left":
        return [[(i, j) for j in reversed(range(cols))] for i in range(rows)]
    if direction == "down":
        return [[(i, j) for i in range(rows)] for j in range(cols)]
    if direction == "up":
        return [[(i, j) for i in reversed(range(rows))] for j in range(cols)]
    raise AssertionError(direction)


def ref_scan(x, whh, direction, b0=None, valid_counts=None):
    """
    One direction of an (N, C, H, W) map, one cell at a time; ``whh`` None: ``Whh = I``.
    ``valid_counts``: (N, 2) rows and columns of each image's valid cells, None: all.
    """
    n, c, height, width = x.shape
    zero = x.new_zeros(c)
    images = []
    for b in range(n):
        rows, cols = (height, width) if valid_counts is None else map(int, valid_counts[b])
        state: Dict[Tuple[int, int], torch.Tensor] = {}
        for line in ref_lines(direction, rows, cols):
            h = zero
            for step, (i, j) in enumerate(line):
                x_t = x[b, :, i, j]
                if step == 0 and b0 is not None:
                    x_t = x_t + b0
                h = torch.relu((h if whh is None else whh @ h) + x_t)
                state[i, j] = h
        grid = [[state.get((i, j), zero) for j in range(width)] for i in range(height)]
        images.append(torch.stack([torch.stack(row, dim=-1) for row in grid], dim=-2))
    return torch.stack(images)


def ref_valid_counts(image_sizes, stride, height, width):
    """(N, 2): each image's ceil(h / stride) x ceil(w / stride) cells, within the map."""
    if image_sizes is None:
        return None
    counts = [
        (min(math.ceil(h / stride), height), min(math.ceil(w / stride), width))
        for h, w in image_sizes
    ]
    return torch.tensor(counts)


def ref_outside_to_zero(x, valid_counts):
    """``x`` (N, C, H, W) with every cell outside the valid cells set to 0."""
    if valid_counts is None:
        return x
    keep = torch.zeros(x.shape[0], 1, x.shape[2], x.shape[3], dtype=x.dtype)
    for b, (rows, cols) in enumerate(valid_counts.tolist()):
        keep[b, :, :rows, :cols] = 1
    return x * keep


def ref_directions(mode: str, layer: int) -> Sequence[str]:
    """A layer's directions (Table 10a: "lr_then_ud" alternates left/right and up/down)."""
    if mode == "all":
        return ("right", "left", "down", "up")
    return ("right", "left") if layer % 2 == 0 else ("down", "up")


def ref_concat(layer, x, directions, shared, hidden_dim, valid_counts):
    """One IRNN layer's output as section 3.2 defines it: 1x1 input-to-hidden conv, one scan
    per direction, "concatenating the hidden state from the four directions"."""
    conv = layer.input_to_hidden
    hidden = F.conv2d(x, conv.weight, conv.bias)
    states = []
    for d, direction in enumerate(directions):
        x_d = hidden if shared else hidden[:, d * hidden_dim : (d + 1) * hidden_dim]
        whh = None if layer.whh is None else layer.whh[d]
        b0 = None if layer.first_step_bias is None else layer.first_step_bias[d]
        states.append(ref_scan(x_d, whh, direction, b0, valid_counts))
    return torch.cat(states, dim=1)


def _ref_dropout(x, p, training):
    """ion_d2's dropout of an IRNN concatenation, its mask written out by hand
    (model_utils.ref_dropout_mask) and drawn in the concatenation's memory order: the module's
    concatenations are channels_last, (N, H, W, C) in memory."""
    if not training or p == 0:
        return x
    n, c, h, w = x.shape
    return x * ref_dropout_mask((n, h, w, c), p, dtype=x.dtype).permute(0, 3, 1, 2)


def ref_irnn(module, irnn, dropout, features, image_sizes=None):
    """
    The IRNN context module of ``irnn`` (its MODEL.ION.CONTEXT.IRNN keys; HIDDEN_DIM: HIDDEN
    unless given) with ``module``'s
    parameters, written from the wirings' definitions (ion_d2/modeling/context/irnn.py's docstring):
    "per_layer": x -> ReLU(conv1x1(dropout(concat_k(x)))) per layer; "paper": concat_1 ->
    dropout -> concat_2 ... -> dropout -> conv1x1, no ReLU. Every output is 0 outside the
    valid cells; dropout draws its masks in the same order as the module, so one seed gives
    the same masks.
    """
    x = features["conv5"]
    valid_counts = ref_valid_counts(image_sizes, STRIDE, x.shape[2], x.shape[3])
    mode = irnn.get("DIRECTIONS", "all")
    shared = irnn.get("SHARED_INPUT_TO_HIDDEN", True)
    hidden_dim = irnn.get("HIDDEN_DIM", HIDDEN)
    paper = irnn.get("WIRING", "per_layer") == "paper"
    outputs = []
    for k, layer in enumerate(module.layers):
        if paper and k > 0:
            x = _ref_dropout(x, dropout, module.training)
        x = ref_concat(layer, x, ref_directions(mode, k), shared, hidden_dim, valid_counts)
        if not paper:
            x = _ref_dropout(x, dropout, module.training)
            conv = layer.hidden_to_output
            x = F.relu(ref_outside_to_zero(F.conv2d(x, conv.weight, conv.bias), valid_counts))
        outputs.append(x)
    if paper:
        x = _ref_dropout(x, dropout, module.training)
        conv = module.hidden_to_output
        outputs[-1] = ref_outside_to_zero(F.conv2d(x, conv.weight, conv.bias), valid_counts)
    names = [f"context_{k}" for k in range(1, len(outputs))] + ["context"]
    if not irnn.get("OUTPUT_ALL_LAYERS", False):
        outputs, names = outputs[-1:], names[-1:]
    return dict(zip(names, outputs))


def _valid_mask(valid_counts, n=2):
    """(N, 1, H, W) bool, True on the valid cells (all cells for None)."""
    return ref_outside_to_zero(torch.ones(n, 1, H, W), valid_counts).bool()


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
    # Forward and the gradients wrt x, Whh and b0.
    x, whh, b0 = _scan_inputs(with_b0)
    valid = MIXED_COUNTS if with_valid else None
    upstream = torch.randn(2, HIDDEN, H, W, dtype=torch.float64)
    if scan == "learned":
        inputs = (x, whh, b0)
        new = _irnn_scan(x, whh, direction, b0, valid)
        ref = ref_scan(x, whh, direction, b0, valid)
    else:
        inputs = (x, b0)
        new = _irnn_scan_identity(x, direction, b0, valid, method=scan)
        ref = ref_scan(x, None, direction, b0, valid)
    inside = _valid_mask(valid).expand_as(ref)
    assert (ref[inside] == 0).any() and (ref > 0).any()  # resets happen: the ReLU matters
    for a, b in zip(
        _value_and_grads(new, inputs, upstream), _value_and_grads(ref, inputs, upstream)
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("direction", IRNN_DIRECTIONS)
@pytest.mark.parametrize("with_valid", [False, True])
def test_identity_step_and_closed_form_match_each_other_and_reference(direction, with_valid):
    x, _, b0 = _scan_inputs(with_b0=True)
    valid = MIXED_COUNTS if with_valid else None
    upstream = torch.randn(2, HIDDEN, H, W, dtype=torch.float64)
    step = _irnn_scan_identity(x, direction, b0, valid, method="step")
    closed = _irnn_scan_identity(x, direction, b0, valid, method="closed_form")
    ref = ref_scan(x, None, direction, b0, valid)
    # Whh = I given as a learned matrix: the same recursion.
    eye = _irnn_scan(x, torch.eye(HIDDEN, dtype=torch.float64), direction, b0, valid)
    for out in (step, closed, eye):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grads_ref = torch.autograd.grad(ref, (x, b0), upstream)
    for out in (step, closed):
        for a, b in zip(torch.autograd.grad(out, (x, b0), upstream), grads_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_identity_method_is_chosen_per_device():
    # The step loop on a CPU, the closed form on a GPU (see _identity_closed_form).
    assert not _identity_closed_form("auto", torch.device("cpu"))
    assert _identity_closed_form("auto", torch.device("cuda"))
    assert _identity_closed_form("closed_form", torch.device("cpu"))
    assert not _identity_closed_form("step", torch.device("cuda"))
    x = torch.randn(2, HIDDEN, H, W)
    auto = _irnn_scan_identity(x, "left", valid_counts=MIXED_COUNTS)
    step = _irnn_scan_identity(x, "left", valid_counts=MIXED_COUNTS, method="step")
    assert torch.equal(auto, step)


def test_reference_scan_on_a_hand_computed_line():
    # The reference itself, on one 1 x 3 line, "left", C = 1, Whh = 2, b0 = 1:
    # x = [1, -5, 3] scanned from the right: h(2) = relu(3 + 1) = 4, h(1) = relu(8 - 5) = 3,
    # h(0) = relu(6 + 1) = 7. Padding: 2 valid columns, h(1) = relu(-5 + 1) = 0, h(0) = 1.
    x = torch.tensor([1.0, -5.0, 3.0]).view(1, 1, 1, 3)
    whh, b0 = torch.tensor([[2.0]]), torch.tensor([1.0])
    assert ref_scan(x, whh, "left", b0).flatten().tolist() == [7.0, 3.0, 4.0]
    valid = torch.tensor([[1, 2]])
    assert ref_scan(x, whh, "left", b0, valid).flatten().tolist() == [1.0, 0.0, 0.0]
    assert ref_scan(x, None, "right").flatten().tolist() == [1.0, 0.0, 3.0]


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
        ref_d = ref_scan(x_d, whh[d] if learned else None, direction, b0[d], valid)
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
    {"WIRING": "paper", "RECURRENT": "learned", "FIRST_STEP_BIAS": True},
    {"WIRING": "paper", "SHARED_INPUT_TO_HIDDEN": False, "OUTPUT_ALL_LAYERS": True},
]


def _module(irnn, dropout):
    overrides = {
        "MODEL.ION.CONTEXT.NAME": "IRNN",
        # The reference's wiring unless a case sets "paper" (add_ion_config's default).
        "MODEL.ION.CONTEXT.IRNN.WIRING": "per_layer",
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
    # In training with dropout: the same seed gives the same dropout masks.
    dropout = 0.25 if train else 0.0
    model = _module(irnn, dropout).train(train)
    x = torch.randn(2, C, H, W, dtype=torch.float64, requires_grad=True)
    params = [x] + list(model.parameters())
    results = []
    for forward in (model, lambda f, s: ref_irnn(model, irnn, dropout, f, s)):
        torch.manual_seed(1)
        outputs = forward({"conv5": x}, sizes)
        total = sum((o * torch.randn_like(o)).sum() for o in outputs.values())
        results.append((outputs, torch.autograd.grad(total, params)))
    (new, new_grads), (ref, ref_grads) = results
    assert new.keys() == ref.keys()
    outside = ~_valid_mask(ref_valid_counts(sizes, STRIDE, H, W))
    for name in ref:
        assert new[name].is_contiguous()
        assert (ref[name] > 0).any()
        if sizes is not None:
            assert (new[name].masked_select(outside) == 0).all()
        torch.testing.assert_close(new[name], ref[name], rtol=0, atol=1e-12)
    for a, b in zip(new_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("recurrent", ["learned", "removed"])
def test_irnn_module_float32_matches_reference(recurrent):
    # float32 convs and scans at a less tiny size: the same results within float tolerance.
    irnn = {"HIDDEN_DIM": 16, "RECURRENT": recurrent}
    overrides = {"MODEL.ION.CONTEXT.NAME": "IRNN", "MODEL.ION.CONTEXT.IRNN.WIRING": "per_layer"}
    overrides.update({f"MODEL.ION.CONTEXT.IRNN.{k}": v for k, v in irnn.items()})
    model = build_ion_context(ion_cfg(overrides), {"conv5": ShapeSpec(channels=8, stride=16)})
    model.eval()
    x = torch.randn(1, 8, 9, 13)
    with torch.no_grad():
        new = model({"conv5": x})["context"]
        ref = ref_irnn(model, irnn, 0.0, {"conv5": x})["context"]
    assert (ref > 0).any()
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recurrent", ["learned", "removed"])
def test_irnn_module_under_autocast_matches_reference(recurrent):
    # Autocast runs the convs in bfloat16 and leaves Whh in float32: the in-place steps, which
    # autocast does not cast, must still work as the reference's autocast matmul does.
    irnn = {"RECURRENT": recurrent}
    model = _module(irnn, dropout=0.0).float()
    x = torch.randn(2, C, H, W, requires_grad=True)
    params = [x] + list(model.parameters())
    results = []
    for forward in (model, lambda f, s: ref_irnn(model, irnn, 0.0, f, s)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward({"conv5": x}, MIXED_SIZES)["context"]
        assert out.dtype == torch.bfloat16
        results.append((out.float(), torch.autograd.grad(out.float().sum(), params)))
    (new, new_grads), (ref, ref_grads) = results
    assert (ref > 0).any()
    torch.testing.assert_close(new, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
    for a, b in zip(new_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * b.abs().max().item())
