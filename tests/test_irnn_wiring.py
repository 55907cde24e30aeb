"""The IRNN stack's two wirings (MODEL.ION.CONTEXT.IRNN.WIRING; ion_d2/modeling/context/irnn.py):
"paper", Figure 3 (1x1 -> IRNN -> concat -> 1x1 -> IRNN -> concat -> 1x1), against the paper's
description and an independent cell-by-cell reference; "per_layer", ion_d2's earlier wiring, kept
for its checkpoints; which presets use which; and a checkpoint of one wiring refusing the other."""

import glob
import os

import fvcore.nn.weight_init as weight_init
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from model_utils import ion_cfg, load_cfg
from test_context import naive_conv1x1, naive_input_to_hidden, naive_scan

from ion_d2.modeling.context import StackedConv, build_ion_context

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CONV5 = {"conv5": ShapeSpec(channels=512, stride=16)}
DIRECTIONS = ("right", "left", "down", "up")


def _irnn(wiring, channels=512, hidden=512, **keys):
    overrides = {
        "MODEL.ION.CONTEXT.IRNN.WIRING": wiring,
        "MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM": hidden,
    }
    overrides.update({f"MODEL.ION.CONTEXT.IRNN.{k}": v for k, v in keys.items()})
    return build_ion_context(ion_cfg(overrides), {"conv5": ShapeSpec(channels=channels, stride=16)})


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_wiring_is_figure_3():
    """Figure 3 at the paper's sizes (conv5: 512 channels; "All IRNNs use 512 hidden units").
    Two input-to-hidden 1x1 convs (the second, "the subsequent 1x1 convolution", reduces the
    first IRNN's 4 x 512 concat to 512), two recurrent transitions per direction, one
    hidden-to-output 1x1 conv back to conv5's shape."""
    c = h = 512
    model = _irnn("paper")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "layers.0.input_to_hidden.weight": (h, c, 1, 1),
        "layers.0.input_to_hidden.bias": (h,),
        "layers.0.whh": (4, h, h),
        "layers.1.input_to_hidden.weight": (h, 4 * h, 1, 1),
        "layers.1.input_to_hidden.bias": (h,),
        "layers.1.whh": (4, h, h),
        "hidden_to_output.weight": (c, 4 * h, 1, 1),
        "hidden_to_output.bias": (c,),
    }
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3
    assert _count(model) == (c * h + h) + (4 * h * h + h) + (4 * h * c + c) + 2 * 4 * h * h
    # "produce an output with the same shape as conv5"
    out = model({"conv5": torch.randn(1, c, 3, 4)})
    assert out["context"].shape == (1, c, 3, 4)
    assert model.output_shape()["context"].channels == c


def test_per_layer_wiring_is_unchanged():
    c = h = 512
    model = _irnn("per_layer")
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4
    assert _count(model) == 2 * ((c * h + h) + (4 * h * c + c) + 4 * h * h)


def test_paper_wiring_has_fewer_parameters_than_table_7s_alternatives():
    """Section 5.4: "The 2x stacked 4-dir IRNN layers have fewer parameters than the
    alternatives". True of Figure 3's wiring; the per-layer wiring has more than Table 7a's
    2x stacked 512x3x3 conv (by 1024 biases)."""

    def conv(kernel, channels):
        cfg = ion_cfg(
            {
                "MODEL.ION.CONTEXT.NAME": "StackedConv",
                "MODEL.ION.CONTEXT.CONV.KERNEL_SIZE": kernel,
                "MODEL.ION.CONTEXT.CONV.CHANNELS": channels,
            }
        )
        return _count(StackedConv(cfg, CONV5))

    alternatives = [conv(3, 512), conv(5, 256)]
    assert _count(_irnn("paper")) < min(alternatives)
    assert _count(_irnn("per_layer")) == alternatives[0] + 1024


def _naive_paper(model, x, dirs_per_layer, output_all):
    """Figure 3 cell by cell: every layer's input-to-hidden conv and scans, its concat the next
    conv's input, one linear hidden-to-output conv at the top."""
    outputs = {}
    for k, dirs in enumerate(dirs_per_layer):
        layer = model.layers[k]
        states = []
        for d, direction in enumerate(dirs):
            weight, bias = naive_input_to_hidden(layer, d)
            whh = None if layer.whh is None else layer.whh[d]
            b0 = None if layer.first_step_bias is None else layer.first_step_bias[d]
            states.append(naive_scan(naive_conv1x1(x, weight, bias), whh, direction, b0))
        x = torch.cat(states, 1)
        if output_all and k < len(dirs_per_layer) - 1:
            outputs[f"context_{k + 1}"] = x
    conv = model.hidden_to_output
    outputs["context"] = naive_conv1x1(x, conv.weight, conv.bias)
    return outputs


@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"RECURRENT": "removed", "FIRST_STEP_BIAS": True},
        {"NUM_LAYERS": 3, "OUTPUT_ALL_LAYERS": True, "SHARED_INPUT_TO_HIDDEN": False},
        {"DIRECTIONS": "lr_then_ud", "OUTPUT_ALL_LAYERS": True},
    ],
)
def test_paper_wiring_matches_naive_reference(keys):
    torch.manual_seed(0)
    model = _irnn("paper", channels=4, hidden=3, CONCAT_DROPOUT=0.0, **keys).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            (
                p.add_(0.3 * torch.randn_like(p))
                if name.endswith("whh")
                else p.copy_(0.5 * torch.randn_like(p))
            )
    layers = keys.get("NUM_LAYERS", 2)
    if keys.get("DIRECTIONS") == "lr_then_ud":
        dirs = [("right", "left") if k % 2 == 0 else ("down", "up") for k in range(layers)]
    else:
        dirs = [DIRECTIONS] * layers
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    got = model({"conv5": x})
    want = _naive_paper(model, x, dirs, keys.get("OUTPUT_ALL_LAYERS", False))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-10)
    # The hidden-to-output transition is linear: the context has negative values.
    assert (got["context"] < 0).any() and (got["context"] > 0).any()


def test_paper_wiring_dropout_after_each_concat_in_training_only():
    torch.manual_seed(0)
    model = _irnn("paper", channels=4, hidden=3, CONCAT_DROPOUT=0.5)
    seen = []
    for conv in (model.layers[1].input_to_hidden, model.hidden_to_output):
        conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    x = torch.rand(1, 4, 5, 6) + 0.1
    model.train()
    model({"conv5": x})
    first = model.layers[0].concat(x)
    assert len(seen) == 2 and all((s == 0).float().mean() > 0.3 for s in seen)  # p = 0.5
    kept = seen[0] != 0
    torch.testing.assert_close(seen[0][kept], 2 * first[kept])  # scaled by 1 / (1 - p)
    model.eval()
    seen.clear()
    model({"conv5": x})
    torch.testing.assert_close(seen[0], first)
    assert (first == 0).float().mean() < 0.3


@pytest.mark.parametrize("saved,loading", [("per_layer", "paper"), ("paper", "per_layer")])
def test_checkpoint_of_the_other_wiring_is_refused(saved, loading):
    state = {"context." + k: v for k, v in _irnn(saved, 4, 3).state_dict().items()}
    holder = torch.nn.Module()
    holder.context = _irnn(loading, 4, 3)
    with pytest.raises(ValueError, match=f"'{saved}' wiring.*WIRING '{loading}'.*set WIRING"):
        holder.load_state_dict(state, strict=False)
    holder.context = _irnn(saved, 4, 3)
    assert not holder.load_state_dict(state, strict=False).missing_keys


def test_unknown_wiring_raises():
    with pytest.raises(ValueError, match="wiring='figure3'.*'paper', 'per_layer'"):
        _irnn("figure3", 4, 3)


def _configs(pattern):
    return sorted(glob.glob(os.path.join(REPO, "configs", pattern), recursive=True))


def test_every_preset_uses_the_papers_wiring():
    # Detectron2's defaults with ION's keys (what a drop-in user gets) and every preset, the
    # synthetic ones included since 0.2.0: Figure 3's wiring. Checkpoints written before the key
    # existed (per_layer, their config dumps without WIRING) load by their keys
    # (tests/test_checkpoint_compat.py).
    assert ion_cfg().MODEL.ION.CONTEXT.IRNN.WIRING == "paper"
    presets = _configs("**/*.yaml")
    assert len(presets) > 60
    for path in presets:
        assert load_cfg(path).MODEL.ION.CONTEXT.IRNN.WIRING == "paper", path


def test_per_layer_weights_from_a_seed_are_those_before_the_paper_wiring():
    """Earlier synthetic runs' numerics: a seed gives the per-layer convs the weights it gave
    before the wiring key (both convs built, then both filled)."""
    torch.manual_seed(0)
    model = _irnn("per_layer", 4, 3, RECURRENT="removed")
    torch.manual_seed(0)
    for layer in model.layers:
        first = torch.nn.Conv2d(4, 3, kernel_size=1)
        second = torch.nn.Conv2d(12, 4, kernel_size=1)
        weight_init.c2_xavier_fill(first)
        weight_init.c2_xavier_fill(second)
        assert torch.equal(layer.input_to_hidden.weight, first.weight)
        assert torch.equal(layer.hidden_to_output.weight, second.weight)


def test_detectron2_checkpointer_refuses_the_other_wiring(tmp_path):
    """Through DetectionCheckpointer (which loads non-strictly, dropping keys of the wrong shape
    with only a warning): a per-layer model's checkpoint into a paper-wiring model stops."""
    tiny = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")
    cfg = load_cfg(tiny)
    cfg.MODEL.ION.CONTEXT.IRNN.WIRING = "per_layer"
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("per_layer")
    cfg.MODEL.ION.CONTEXT.IRNN.WIRING = "paper"
    with pytest.raises(ValueError, match="'per_layer' wiring.*MODEL.ION.CONTEXT.IRNN.WIRING"):
        DetectionCheckpointer(build_model(cfg)).load(str(tmp_path / "per_layer.pth"))
