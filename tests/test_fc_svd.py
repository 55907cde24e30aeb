"""Fast R-CNN's truncated SVD of the box head's fc layers (ion_d2/modeling/fc_svd.py,
MODEL.ION.FC_SVD_RANKS, tools/compress_fc_svd.py), checked against torch.linalg.svd in float64."""

import logging
import os
import re

import pytest
import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from model_utils import ion_cfg, load_cfg, load_script, random_inputs, shrink_cfg

from ion_d2.modeling.box_head import IONFCHead
from ion_d2.modeling.fc_svd import IONFactoredLinear, factor_linear_state_dict

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")
SHAPE = ShapeSpec(channels=4, height=3, width=3)  # 36 inputs per region


def _head(ranks=(), fc_dims=(12, 10)):
    return IONFCHead(SHAPE, fc_dims=list(fc_dims), dropout=0.0, fc_svd_ranks=list(ranks)).eval()


def _best_rank_t(weight: torch.Tensor, t: int):
    """Reference: the rank-t truncation of ``weight`` and its singular values, in float64."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, :t] * s[:t]) @ vh[:t], s


def test_full_rank_head_equals_unfactored_head():
    head = _head()
    factored = _head(ranks=(12, 10))  # min(in, out) of fc1 (36 -> 12) and fc2 (12 -> 10)
    assert isinstance(factored.fc1, IONFactoredLinear) and list(factored.fcs) == [
        factored.fc1,
        factored.fc2,
    ]
    incompatible = factored.load_state_dict(head.state_dict())  # strict: factors on load
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    assert sorted(factored.state_dict()) == [
        "fc1.svd_u.bias",
        "fc1.svd_u.weight",
        "fc1.svd_v.weight",
        "fc2.svd_u.bias",
        "fc2.svd_u.weight",
        "fc2.svd_v.weight",
    ]
    x = torch.randn(7, 4, 3, 3)
    # No ReLU between the two factors: Σ_t V^T x has negative entries, which one would clip.
    assert (factored.fc1.svd_v(x.flatten(1)) < 0).any()
    with torch.no_grad():
        torch.testing.assert_close(factored(x), head(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_rank_t_factors_are_the_best_rank_t_approximation(rank):
    weight, bias = torch.randn(9, 20), torch.randn(9)
    state = {"fc.weight": weight.clone(), "fc.bias": bias.clone()}
    error = factor_linear_state_dict(state, "fc.", rank=rank, in_features=20, out_features=9)
    assert sorted(state) == ["fc.svd_u.bias", "fc.svd_u.weight", "fc.svd_v.weight"]
    assert state["fc.svd_v.weight"].shape == (rank, 20)
    assert state["fc.svd_u.weight"].shape == (9, rank)
    assert torch.equal(state["fc.svd_u.bias"], bias)

    reference, s = _best_rank_t(weight, rank)
    product = state["fc.svd_u.weight"].double() @ state["fc.svd_v.weight"].double()
    torch.testing.assert_close(product, reference, rtol=0, atol=1e-5)
    # Eckart-Young: the squared error is the sum of the discarded squared singular values.
    discarded = s[rank:].square().sum()
    torch.testing.assert_close(
        (weight.double() - product).square().sum(), discarded, rtol=1e-4, atol=1e-8
    )
    assert error == pytest.approx((discarded / s.square().sum()).sqrt().item(), rel=1e-5)

    # The module computes x -> U (Σ_t V^T x) + b, i.e. the truncated layer.
    layer = IONFactoredLinear(20, 9, rank)
    layer.load_state_dict({k[len("fc.") :]: v for k, v in state.items()})
    x = torch.randn(5, 20)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x).double(), F.linear(x.double(), reference, bias.double()), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    "ranks, message",
    [
        ([5], r" = \[5\]: accepted \[\] .* 2 ranks"),  # one rank for two fc layers
        ([5, 4, 3], r" = \[5, 4, 3\]: accepted \[\] .* 2 ranks"),
        ([13, 0], r"\[0\] = 13 for fc1 \(36 -> 12\): accepted 0 .* \[1, 12\]"),
        ([0, 13], r"\[1\] = 13 for fc2 \(12 -> 12\): accepted 0 .* \[1, 12\]"),
        ([-1, 0], r"\[0\] = -1 for fc1 .*accepted"),
        ([2.5, 0], r"\[0\] = 2.5 for fc1 .*accepted"),
    ],
)
def test_bad_ranks_raise_naming_the_key(ranks, message):
    cfg = ion_cfg(
        {
            "MODEL.ROI_BOX_HEAD.NUM_FC": 2,
            "MODEL.ROI_BOX_HEAD.FC_DIM": 12,
            "MODEL.ION.FC_SVD_RANKS": ranks,
        }
    )
    with pytest.raises(ValueError, match=r"MODEL\.ION\.FC_SVD_RANKS" + message):
        IONFCHead(cfg, SHAPE)


def test_checkpoint_mismatches_raise():
    # A factored checkpoint into an unfactored layer.
    with pytest.raises(ValueError, match=r"fc1\.svd_v\.weight.*rank 4.*FC_SVD_RANKS"):
        _head().load_state_dict(_head(ranks=(4, 0)).state_dict())
    # An unfactored fc1 whose shape is not the model's (FC_DIM 12 vs 8).
    with pytest.raises(ValueError, match=r"fc1.*\(12, 36\).*36 -> 8"):
        _head(ranks=(4, 0), fc_dims=(8, 10)).load_state_dict(_head().state_dict(), strict=False)


def test_checkpoint_of_another_rank_raises_through_detection_checkpointer(tmp_path):
    # Detectron2's checkpointer drops the rank-4 factors (shapes) and would only warn.
    path = str(tmp_path / "rank4.pth")
    torch.save({"model": _head(ranks=(4, 0)).state_dict()}, path)
    with pytest.raises(ValueError, match=r"fc1\.svd_u\.bias.*another rank"):
        DetectionCheckpointer(_head(ranks=(3, 0))).load(path)


# --- the tool and compress-on-load on the tiny ION model ----------------------------------------


def _load_tool():
    return load_script("tools/compress_fc_svd.py")


def _tiny_model(ranks=()):
    cfg = shrink_cfg(load_cfg(TINY, {"MODEL.ION.FC_SVD_RANKS": list(ranks)}))
    cfg.TEST.DETECTIONS_PER_IMAGE = 1000  # every detection: none cut by a near-tied score
    return cfg, build_model(cfg).eval()


@pytest.fixture(scope="module")
def uncompressed(tmp_path_factory):
    """A randomly initialised tiny ION model (fc1: 32*7*7 -> 64, fc2: 64 -> 64) and its file."""
    torch.manual_seed(0)
    cfg, model = _tiny_model()
    folder = tmp_path_factory.mktemp("svd")
    DetectionCheckpointer(model, save_dir=str(folder)).save("full")
    return cfg, model, str(folder / "full.pth")


def _compress(tool, weights, ranks, output, capsys):
    argv = ["--config-file", TINY, "--weights", weights, "--output", output]
    tool.main(argv[:4] + ["--ranks"] + [str(r) for r in ranks] + argv[4:])
    return capsys.readouterr().out


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _load_checked(model, path):
    """Load ``path`` as DefaultPredictor does, failing on any warning of the checkpointer."""
    # On the checkpointer's own logger: detectron2's setup_logger stops "fvcore" propagating.
    logger = logging.getLogger("fvcore.common.checkpoint")
    handler = _Records()
    logger.addHandler(handler)
    try:
        DetectionCheckpointer(model).load(path)
    finally:
        logger.removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]
    # And strictly: no missing or unexpected key at all.
    model.load_state_dict(torch.load(path)["model"], strict=True)


def _detect(model, cfg):
    image = random_inputs(cfg, n=1, seed=3)[0]
    with torch.no_grad():
        return model([{k: image[k] for k in ("image", "height", "width")}])[0]["instances"]


def test_tool_output_loads_and_detects_as_uncompressed_at_full_rank(uncompressed, tmp_path, capsys):
    cfg, full, weights = uncompressed
    output = str(tmp_path / "svd.pth")
    printed = _compress(_load_tool(), weights, [64, 64], output, capsys)
    assert "FC_SVD_RANKS: [64, 64]" in printed

    cfg_svd, model = _tiny_model([64, 64])
    _load_checked(model, output)
    a, b = _detect(full, cfg), _detect(model, cfg_svd)
    assert len(a) == len(b) > 0
    # Match each detection of the uncompressed model to one of the compressed model's (same
    # class, nearest box): equal scores may come out in either order.
    boxes_a, boxes_b = a.pred_boxes.tensor, b.pred_boxes.tensor
    dist = (boxes_a[:, None] - boxes_b[None]).abs().amax(dim=2)
    dist[a.pred_classes[:, None] != b.pred_classes[None]] = float("inf")
    match = dist.argmin(dim=1)
    assert sorted(match.tolist()) == list(range(len(b)))
    torch.testing.assert_close(boxes_b[match], boxes_a, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(b.scores[match], a.scores, rtol=1e-4, atol=1e-5)


def test_tool_reports_each_layer_and_equals_compress_on_load(
    uncompressed, tmp_path, capsys, caplog
):
    cfg, full, weights = uncompressed
    output = str(tmp_path / "svd.pth")
    printed = _compress(_load_tool(), weights, [16, 0], output, capsys)

    # One line per fc layer: rank, parameters before and after, relative Frobenius error.
    fc1 = re.search(r"box_head\.fc1\s+1568 -> 64\s+16\s+(\d+)\s+(\d+)\s+(\S+)", printed)
    assert fc1 is not None, printed
    assert int(fc1.group(1)) == 1568 * 64 + 64
    assert int(fc1.group(2)) == 16 * 1568 + 64 * 16 + 64
    _, s = _best_rank_t(full.roi_heads.box_head.fc1.weight.detach(), 16)
    assert float(fc1.group(3)) == pytest.approx(
        (s[16:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-3
    )
    assert re.search(r"box_head\.fc2\s+64 -> 64\s+-\s+4160\s+4160\s+\(kept\)", printed), printed
    assert "FC_SVD_RANKS: [16, 0]" in printed
    assert 'MODEL.ION.FC_SVD_RANKS "[16, 0]"' in printed

    written = torch.load(output)["model"]
    prefix = "roi_heads.box_head.fc1."
    reference, _ = _best_rank_t(full.roi_heads.box_head.fc1.weight.detach(), 16)
    product = written[prefix + "svd_u.weight"].double() @ written[prefix + "svd_v.weight"].double()
    torch.testing.assert_close(product, reference, rtol=0, atol=1e-5)

    # Compress-on-load: the uncompressed checkpoint into a model built with the same ranks
    # gives the tool's weights, and says so in the log.
    _, model = _tiny_model([16, 0])
    with caplog.at_level(logging.INFO, logger="ion_d2.modeling.fc_svd"):
        DetectionCheckpointer(model).load(weights)
    assert "Factored the checkpoint's unfactored roi_heads.box_head.fc1.weight" in caplog.text
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(written)
    for key, value in written.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)

    # The tool refuses its own output as input.
    with pytest.raises(ValueError, match="already factored"):
        _compress(_load_tool(), output, [16, 0], str(tmp_path / "again.pth"), capsys)
