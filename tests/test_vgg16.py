"""IONVGG16 backbone, IONFCHead box head and the ImageNet VGG16 weight converter."""

import logging
import os

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import ROI_BOX_HEAD_REGISTRY, build_backbone, build_box_head, build_model
from model_utils import ion_cfg, load_script

from ion_d2.modeling.box_head import IONFCHead
from ion_d2.modeling.vgg16 import IONVGG16

_ALL_FEATURES = ["conv1", "conv2", "conv3", "conv4", "conv5"]
_CONVS_PER_STAGE = {"conv1": 2, "conv2": 2, "conv3": 3, "conv4": 3, "conv5": 3}


def _load_tool():
    return load_script("tools/convert_vgg16_to_d2.py")


def _conv_names(stage):
    return [f"{stage}_{i}" for i in range(1, _CONVS_PER_STAGE[stage] + 1)]


def _cfg(out_features=_ALL_FEATURES, width_mult=0.125, freeze_at=0, norm=""):
    return ion_cfg(
        {
            "MODEL.BACKBONE.NAME": "build_ion_vgg16_backbone",
            "MODEL.ION.VGG16.OUT_FEATURES": list(out_features),
            "MODEL.ION.VGG16.WIDTH_MULT": width_mult,
            "MODEL.ION.VGG16.NORM": norm,
            "MODEL.BACKBONE.FREEZE_AT": freeze_at,
        }
    )


# ---------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------
def test_full_width_output_shape():
    backbone = build_backbone(_cfg(width_mult=1.0))
    assert isinstance(backbone, IONVGG16)
    shapes = backbone.output_shape()
    assert list(shapes) == _ALL_FEATURES
    assert [s.channels for s in shapes.values()] == [64, 128, 256, 512, 512]
    assert [s.stride for s in shapes.values()] == [1, 2, 4, 8, 16]
    assert backbone.conv1_1.weight.shape == (64, 3, 3, 3)
    assert backbone.conv4_3.weight.shape == (512, 512, 3, 3)
    assert backbone.conv5_3.bias.shape == (512,)
    assert backbone.size_divisibility == 16
    # Padded to a multiple of 16, every map is exactly input / stride.
    out = build_backbone(_cfg(width_mult=0.125))(torch.zeros(1, 3, 48, 80))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [
        (48 // s, 80 // s) for s in (1, 2, 4, 8, 16)
    ]


def test_width_mult_forward_shapes():
    backbone = build_backbone(_cfg(width_mult=0.125))
    shapes = backbone.output_shape()
    assert {k: v.channels for k, v in shapes.items()} == {
        "conv1": 8,
        "conv2": 16,
        "conv3": 32,
        "conv4": 64,
        "conv5": 64,
    }
    out = backbone(torch.randn(2, 3, 32, 48))
    assert list(out) == _ALL_FEATURES
    for name, feature in out.items():
        stride = shapes[name].stride
        assert feature.shape == (2, shapes[name].channels, 32 // stride, 48 // stride), name
        # Every feature is a ReLU output.
        assert feature.min() >= 0


def test_width_mult_rounds_and_keeps_one_channel():
    # round(64 * 0.01) = 1, round(128 * 0.01) = 1, round(256 * 0.01) = 3, round(512 * 0.01) = 5;
    # a product that rounds to 0 keeps 1 channel.
    shapes = build_backbone(_cfg(width_mult=0.01)).output_shape()
    assert [s.channels for s in shapes.values()] == [1, 1, 3, 5, 5]
    shapes = build_backbone(_cfg(width_mult=0.001)).output_shape()
    assert [s.channels for s in shapes.values()] == [1, 1, 1, 1, 1]


def test_out_features_subset_builds_and_runs_only_what_is_needed():
    backbone = build_backbone(_cfg(out_features=["conv4", "conv2"]))
    assert set(backbone.output_shape()) == {"conv2", "conv4"}
    assert backbone.output_shape()["conv4"].stride == 8
    # Nothing after the last requested feature is built, so none of it can run.
    assert not any(name.startswith("conv5") for name, _ in backbone.named_parameters())
    assert hasattr(backbone, "conv4_3")
    out = backbone(torch.randn(1, 3, 16, 16))
    assert set(out) == {"conv2", "conv4"}
    assert out["conv2"].shape == (1, 16, 8, 8)
    assert out["conv4"].shape == (1, 64, 2, 2)


def test_honours_input_channels():
    backbone = build_backbone(_cfg(), ShapeSpec(channels=1))
    assert backbone.conv1_1.weight.shape == (8, 1, 3, 3)
    assert backbone(torch.randn(1, 1, 16, 16))["conv5"].shape == (1, 64, 1, 1)


def test_forward_matches_reference_computation():
    backbone = build_backbone(_cfg(out_features=["conv2"], width_mult=0.0625))
    x = torch.randn(1, 3, 12, 10)
    y = x
    for stage in ("conv1", "conv2"):
        if stage == "conv2":
            y = torch.nn.functional.max_pool2d(y, 2, 2)
        for name in _conv_names(stage):
            conv = getattr(backbone, name)
            y = torch.relu(torch.nn.functional.conv2d(y, conv.weight, conv.bias, padding=1))
    torch.testing.assert_close(backbone(x)["conv2"], y)


@pytest.mark.parametrize("freeze_at", [0, 2, 5])
def test_freeze_at(freeze_at):
    backbone = build_backbone(_cfg(freeze_at=freeze_at))
    for k, stage in enumerate(_ALL_FEATURES, start=1):
        for name in _conv_names(stage):
            for p in getattr(backbone, name).parameters():
                assert p.requires_grad == (k > freeze_at), (name, freeze_at)

    out = backbone(torch.randn(1, 3, 16, 16))
    loss = sum(f.sum() for f in out.values())
    if freeze_at == 5:
        assert not loss.requires_grad
        return
    loss.backward()
    for k, stage in enumerate(_ALL_FEATURES, start=1):
        grad = getattr(backbone, _conv_names(stage)[0]).weight.grad
        assert (grad is None) == (k <= freeze_at), (stage, freeze_at)


def test_freeze_at_converts_batchnorm_of_frozen_stages():
    backbone = build_backbone(_cfg(freeze_at=2, norm="BN"))
    assert backbone.conv1_1.bias is None
    for stage in ("conv1", "conv2"):
        for name in _conv_names(stage):
            assert isinstance(getattr(backbone, name).norm, FrozenBatchNorm2d), name
    for stage in ("conv3", "conv4", "conv5"):
        for name in _conv_names(stage):
            norm = getattr(backbone, name).norm
            assert type(norm) is torch.nn.BatchNorm2d, name
            assert norm.weight.requires_grad
    backbone.train()
    assert backbone(torch.randn(2, 3, 16, 16))["conv5"].shape == (2, 64, 1, 1)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"out_features": ["conv6"]}, r"conv6.*accepted.*conv1"),
        ({"out_features": ["conv5", "res4"]}, r"res4"),
        ({"out_features": []}, r"at least one"),
        ({"width_mult": 0.0}, r"width_mult > 0, got 0.0"),
        ({"width_mult": -1.0}, r"got -1.0"),
        ({"freeze_at": 6}, r"freeze_at in 0..5.*got 6"),
        ({"freeze_at": -1}, r"got -1"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(_cfg(**overrides))


# ---------------------------------------------------------------------------------------------
# Box head
# ---------------------------------------------------------------------------------------------
def _head_cfg(num_fc=2, fc_dim=16, dropout=0.0):
    cfg = _cfg()
    cfg.MODEL.ROI_BOX_HEAD.NAME = "IONFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = num_fc
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = fc_dim
    cfg.MODEL.ION.FC_DROPOUT = dropout
    return cfg


def _reference_head(head, x):
    x = x.flatten(1)
    for k in range(1, len(head.fcs) + 1):
        fc = getattr(head, f"fc{k}")
        x = torch.relu(x @ fc.weight.T + fc.bias)
    return x


def test_head_shapes_names_and_values():
    assert ROI_BOX_HEAD_REGISTRY.get("IONFCHead") is IONFCHead
    head = build_box_head(_head_cfg(), ShapeSpec(channels=8, height=3, width=3))
    assert isinstance(head, IONFCHead)
    assert head.output_shape.channels == 16
    assert sorted(n for n, _ in head.named_parameters()) == [
        "fc1.bias",
        "fc1.weight",
        "fc2.bias",
        "fc2.weight",
    ]
    assert head.fc1.weight.shape == (16, 72)
    assert head.fc2.weight.shape == (16, 16)
    assert torch.all(head.fc1.bias == 0)

    x = torch.randn(5, 8, 3, 3)
    out = head(x)
    assert out.shape == (5, 16)
    torch.testing.assert_close(out, _reference_head(head, x))
    assert head(torch.zeros(0, 8, 3, 3)).shape == (0, 16)


def test_head_without_dropout_is_deterministic_in_training():
    head = build_box_head(_head_cfg(dropout=0.0), ShapeSpec(channels=8, height=3, width=3))
    head.train()
    x = torch.randn(4, 8, 3, 3)
    torch.testing.assert_close(head(x), head(x), rtol=0, atol=0)
    torch.testing.assert_close(head(x), _reference_head(head, x))


def test_head_dropout_is_stochastic_in_training_only():
    p = 0.5
    head = build_box_head(
        _head_cfg(num_fc=1, fc_dim=256, dropout=p), ShapeSpec(channels=8, height=3, width=3)
    )
    x = torch.randn(4, 8, 3, 3)
    ref = _reference_head(head, x)
    head.eval()
    torch.testing.assert_close(head(x), ref)
    torch.testing.assert_close(head(x), head(x), rtol=0, atol=0)

    head.train()
    a, b = head(x), head(x)
    assert not torch.equal(a, b)
    # Inverted dropout: every unit is either dropped or scaled by 1 / (1 - p).
    kept = a != 0
    torch.testing.assert_close(a[kept], ref[kept] / (1 - p))
    live = ref != 0
    drop_rate = (~kept & live).sum().item() / live.sum().item()
    assert 0.35 < drop_rate < 0.65


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dropout": 1.0}, r"dropout in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"got -0.1"),
        ({"num_fc": 0}, r"at least one fc layer"),
        ({"fc_dim": 0}, r"positive fc_dims"),
    ],
)
def test_head_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_box_head(_head_cfg(**kwargs), ShapeSpec(channels=8, height=3, width=3))


def test_head_rejects_conv_layers():
    cfg = _head_cfg()
    cfg.MODEL.ROI_BOX_HEAD.NUM_CONV = 2
    with pytest.raises(ValueError, match="NUM_CONV must be 0, got 2"):
        build_box_head(cfg, ShapeSpec(channels=8, height=3, width=3))


# ---------------------------------------------------------------------------------------------
# Weight conversion
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torchvision_vgg16():
    torch.manual_seed(1)
    return torchvision.models.vgg16(weights=None).eval()


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


def test_converted_backbone_matches_torchvision(torchvision_vgg16, tool):
    converted = tool.convert_vgg16_state_dict(torchvision_vgg16.state_dict())
    prefix = "backbone."
    backbone_sd = {k[len(prefix) :]: v for k, v in converted.items() if k.startswith(prefix)}
    backbone = IONVGG16(3, out_features=["conv5"], width_mult=1.0)
    backbone.load_state_dict(backbone_sd, strict=True)

    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        expected = torchvision_vgg16.features[:30](x)
        out = backbone(x)["conv5"]
    assert out.shape == (1, 512, 4, 5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_converted_box_head_matches_torchvision(torchvision_vgg16, tool):
    converted = tool.convert_vgg16_state_dict(torchvision_vgg16.state_dict())
    prefix = "roi_heads.box_head."
    head_sd = {k[len(prefix) :]: v for k, v in converted.items() if k.startswith(prefix)}
    head = IONFCHead(ShapeSpec(channels=512, height=7, width=7), fc_dims=[4096, 4096], dropout=0.5)
    head.load_state_dict(head_sd, strict=True)
    head.eval()

    x = torch.randn(2, 512, 7, 7)
    with torch.no_grad():
        expected = torchvision_vgg16.classifier[:5](x.flatten(1))
        out = head(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_conversion_drops_fc8_and_accepts_caffe_names(torchvision_vgg16, tool):
    sd = torchvision_vgg16.state_dict()
    converted = tool.convert_vgg16_state_dict(sd)
    conv_names = [n for stage in _ALL_FEATURES for n in _conv_names(stage)]
    expected_modules = [f"backbone.{n}" for n in conv_names] + [
        "roi_heads.box_head.fc1",
        "roi_heads.box_head.fc2",
    ]
    expected_keys = [f"{m}.{p}" for m in expected_modules for p in ("weight", "bias")]
    assert sorted(converted) == sorted(expected_keys)
    assert converted["roi_heads.box_head.fc2.weight"] is sd["classifier.3.weight"]
    assert converted["backbone.conv3_2.bias"] is sd["features.12.bias"]

    # The same weights under Caffe names (as numpy arrays, as Caffe converters often give them).
    tv_to_caffe = dict(zip(["classifier.0", "classifier.3"], ["fc6", "fc7"]))
    conv_indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    tv_to_caffe.update({f"features.{i}": n for i, n in zip(conv_indices, conv_names)})
    caffe_sd = {}
    for key, value in sd.items():
        layer, param = key.rsplit(".", 1)
        if layer != "classifier.6":  # fc8 is optional
            caffe_sd[f"{tv_to_caffe[layer]}.{param}"] = value.numpy()
    from_caffe = tool.convert_vgg16_state_dict(caffe_sd)
    assert from_caffe.keys() == converted.keys()
    for k in converted:
        assert torch.equal(from_caffe[k], converted[k]), k


def test_conversion_rejects_unknown_and_missing_keys(torchvision_vgg16, tool):
    sd = dict(torchvision_vgg16.state_dict())
    with pytest.raises(ValueError, match=r"Unknown keys.*features\.1\.running_mean"):
        tool.convert_vgg16_state_dict({**sd, "features.1.running_mean": torch.zeros(64)})
    del sd["features.28.bias"]
    with pytest.raises(ValueError, match=r"Missing keys.*features\.28\.bias"):
        tool.convert_vgg16_state_dict(sd)
    with pytest.raises(ValueError, match="Not a VGG16 state dict"):
        tool.convert_vgg16_state_dict({"layer1.0.conv1.weight": torch.zeros(1)})


def _ion_vgg16_model_cfg():
    cfg = _cfg(out_features=["conv5"], width_mult=1.0, freeze_at=2)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.RPN.IN_FEATURES = ["conv5"]
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["conv5"]
    cfg.MODEL.ROI_BOX_HEAD.NAME = "IONFCHead"
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIPool"
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 4096
    return cfg


def test_cli_checkpoint_loads_with_detection_checkpointer(
    torchvision_vgg16, tool, tmp_path, caplog
):
    src = str(tmp_path / "vgg16_torchvision.pth")
    dst = str(tmp_path / "vgg16_ion_d2.pth")
    torch.save(torchvision_vgg16.state_dict(), src)
    with caplog.at_level(logging.INFO, logger="convert_vgg16_to_d2"):
        tool.main([src, dst])
    assert 'FORMAT: "RGB"' in caplog.text
    assert "[123.675, 116.28, 103.53]" in caplog.text
    assert "[58.395, 57.12, 57.375]" in caplog.text
    os.remove(src)

    model = build_model(_ion_vgg16_model_cfg())
    assert isinstance(model.backbone, IONVGG16)
    assert isinstance(model.roi_heads.box_head, IONFCHead)
    model_sd = model.state_dict()
    converted = tool.convert_vgg16_state_dict(torchvision_vgg16.state_dict())
    # Every converted tensor has a same-shaped home in the model (none is silently skipped).
    for k, v in converted.items():
        assert k in model_sd and model_sd[k].shape == v.shape, k
    key = "backbone.conv4_3.weight"
    assert not torch.equal(model_sd[key], converted[key])

    DetectionCheckpointer(model).load(dst)
    model_sd = model.state_dict()
    for k, v in converted.items():
        assert torch.equal(model_sd[k], v), k
    # FREEZE_AT survives loading.
    assert not model.backbone.conv2_2.weight.requires_grad
    assert model.backbone.conv3_1.weight.requires_grad


def test_cli_rejects_pkl_output(tool, tmp_path):
    with pytest.raises(SystemExit) as exc:
        tool.main([str(tmp_path / "in.pth"), str(tmp_path / "out.pkl")])
    assert exc.value.code == 2
