"""
Issue 29's weights faults: ``train_net.py --eval-only`` and ``IONPredictor`` refuse to run
without weights or with weights that do not match the model (naming the missing, unexpected and
mis-shaped keys) unless ``MODEL.ION.ALLOW_PARTIAL_WEIGHTS``; every load (training, resume,
evaluation, prediction) refuses weights holding NaN or inf, naming the tensors, except a
skip-pooling scale still pending in training.
"""

import logging
import os

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from model_utils import load_cfg, load_script, synthetic_slice

from ion_d2.engine.checkpoint import IONCheckpointer
from ion_d2.engine.predictor import IONPredictor

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")


@pytest.fixture(scope="module")
def val_name(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    with synthetic_slice(root, num_train=1, num_val=1, seed=5, name_prefix="wchecks") as names:
        yield names[1]


def _r50_fpn_state():
    """A stock Detectron2 R50-FPN Faster R-CNN (the model zoo's config) at toy widths: the
    same keys as the model zoo's checkpoints, small tensors."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 4
    cfg.MODEL.FPN.OUT_CHANNELS = 8
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 16
    return build_model(cfg).state_dict()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Checkpoint files for the tiny config: its own, a stock R50-FPN's, one of another VGG16
    width, one of its own with a NaN, and one trained with the segmentation head."""
    folder = tmp_path_factory.mktemp("weights")
    own = build_model(load_cfg(TINY)).state_dict()
    wider = build_model(load_cfg(TINY, {"MODEL.ION.VGG16.WIDTH_MULT": 0.25})).state_dict()
    nan = {k: v.clone() for k, v in own.items()}
    nan["roi_heads.box_predictor.cls_score.weight"][1, 2] = float("nan")
    nan["backbone.conv3_3.bias"][0] = float("inf")
    seg = build_model(load_cfg(TINY, {"MODEL.ION.SEG_LOSS_ON": True})).state_dict()
    files = {"own": own, "r50_fpn": _r50_fpn_state(), "wider": wider, "nan": nan, "seg": seg}
    for name, state in files.items():
        torch.save({"model": state, "iteration": 3}, folder / f"{name}.pth")
    return {name: str(folder / f"{name}.pth") for name in files}


# The error each kind of weights gives, for train_net.py --eval-only and IONPredictor alike.
REFUSED = {
    "": r"^No weights to load \(MODEL.WEIGHTS is empty.*random initial weights.*"
    r"MODEL.ION.ALLOW_PARTIAL_WEIGHTS True",
    "r50_fpn": r"r50_fpn.pth does not match the model: 38 of the model's 55 keys are not in it "
    r"\(backbone.conv1_1.weight, backbone.conv1_1.bias, backbone.conv1_2.weight, \.\.\. \(35 "
    r"more\)\); 276 of its keys are not the model's \(backbone.fpn_lateral2.weight, .*\); 14 "
    r"have another shape \(proposal_generator.rpn_head.conv.weight: \(8, 8, 3, 3\) in the file, "
    r"\(64, 64, 3, 3\) in the model; .*MODEL.ION.ALLOW_PARTIAL_WEIGHTS True",
    "wider": r"wider.pth does not match the model: 36 have another shape "
    r"\(backbone.conv1_1.weight: \(16, 3, 3, 3\) in the file, \(8, 3, 3, 3\) in the model; ",
    "nan": r"nan.pth holds NaN or inf in 2 tensors: backbone.conv3_3.bias \(1 inf of 32 values\), "
    r"roi_heads.box_predictor.cls_score.weight \(1 NaN of 448 values\)",
}


def _eval_only(monkeypatch, tmp_path, val_name, *opts):
    train_net = load_script("train_net.py")
    # default_setup and setup_logger would attach file loggers to the test process.
    monkeypatch.setattr(train_net, "default_setup", lambda cfg, args: None)
    monkeypatch.setattr(train_net, "setup_logger", lambda *args, **kwargs: None)
    argv = ["--config-file", TINY, "--eval-only", "DATASETS.TEST", f"('{val_name}',)"]
    argv += ["INPUT.MIN_SIZE_TEST", "64", "OUTPUT_DIR", str(tmp_path / "eval"), *opts]
    return train_net.main(train_net.argument_parser().parse_args(argv))


@pytest.mark.parametrize("kind", list(REFUSED))
def test_eval_only_refuses_missing_or_unmatched_weights(
    kind, weights, val_name, tmp_path, monkeypatch
):
    path = weights[kind] if kind else ""
    with pytest.raises(ValueError, match=REFUSED[kind]):
        _eval_only(monkeypatch, tmp_path, val_name, "MODEL.WEIGHTS", path)


@pytest.mark.parametrize("kind", list(REFUSED))
def test_predictor_refuses_missing_or_unmatched_weights(kind, weights):
    cfg = load_cfg(TINY)
    cfg.MODEL.WEIGHTS = weights[kind] if kind else ""
    with pytest.raises(ValueError, match=REFUSED[kind]):
        IONPredictor(cfg)


def test_partial_weights_run_only_when_allowed(weights, val_name, tmp_path, monkeypatch, caplog):
    # The opt-in: the untrained model is evaluated, the other width's weights load where their
    # shapes match (as Detectron2 loads them, with its warnings).
    res = _eval_only(monkeypatch, tmp_path, val_name, "MODEL.ION.ALLOW_PARTIAL_WEIGHTS", "True")
    assert "AP" in res["bbox"]
    cfg = load_cfg(TINY, {"MODEL.ION.ALLOW_PARTIAL_WEIGHTS": True})
    cfg.MODEL.WEIGHTS = weights["wider"]
    with caplog.at_level(logging.WARNING, logger="fvcore.common.checkpoint"):
        IONPredictor(cfg)
    assert "Skip loading parameter 'backbone.conv1_1.weight'" in caplog.text
    # NaN is refused even then.
    cfg.MODEL.WEIGHTS = weights["nan"]
    with pytest.raises(ValueError, match=REFUSED["nan"]):
        IONPredictor(cfg)


def test_strict_loads_accept_matching_weights(weights):
    # The weights of the config itself, and weights trained with the segmentation head (which
    # only training runs) into a model without it.
    cfg = load_cfg(TINY)
    cfg.MODEL.WEIGHTS = weights["seg"]
    predictor = IONPredictor(cfg)
    stored = torch.load(weights["seg"], map_location="cpu")["model"]
    for key, value in predictor.model.state_dict().items():
        assert torch.equal(value, stored[key]), key
    model = build_model(load_cfg(TINY))
    IONCheckpointer(model, strict=True).load(weights["own"])


def test_training_loads_partial_weights_but_not_nan(weights, tmp_path):
    # ImageNet VGG16 weights hold the trunk only: training loads them (heads start new).
    own = torch.load(weights["own"], map_location="cpu")["model"]
    trunk = {k: v for k, v in own.items() if k.startswith("backbone.")}
    torch.save({"model": trunk}, tmp_path / "trunk.pth")
    model = build_model(load_cfg(TINY))
    IONCheckpointer(model).load(str(tmp_path / "trunk.pth"))
    assert torch.equal(model.backbone.conv1_1.weight, trunk["backbone.conv1_1.weight"])
    with pytest.raises(ValueError, match=REFUSED["nan"]):
        IONCheckpointer(model).load(weights["nan"])
    # On resume too: the newest checkpoint of the run folder, named.
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_0000003.pth").write_bytes(open(weights["nan"], "rb").read())
    (run / "last_checkpoint").write_text("model_0000003.pth")
    with pytest.raises(ValueError, match=rf"{run / 'model_0000003.pth'} holds NaN or inf"):
        IONCheckpointer(model, save_dir=str(run)).resume_or_load("", resume=True)


def test_a_pending_skip_pool_scale_loads_for_training_only(tmp_path):
    # SCALE_INIT -1 leaves the scale NaN until training measures it; a checkpoint written
    # before that holds it so. Training loads it (and measures it); evaluation refuses it.
    cfg = load_cfg(TINY, {"MODEL.ION.SKIP_POOL.SCALE_INIT": -1.0})
    model = build_model(cfg)
    assert model.roi_heads.box_pooler.scale_pending
    IONCheckpointer(model, save_dir=str(tmp_path)).save("pending")
    path = str(tmp_path / "pending.pth")
    IONCheckpointer(build_model(cfg)).load(path)
    with pytest.raises(
        ValueError,
        match=r"pending.pth holds NaN or inf in 1 tensor: roi_heads.box_pooler.scale \(224 NaN "
        r"of 224 values\).* roi_heads.box_pooler.scale is a skip-pooling scale never measured",
    ):
        IONCheckpointer(build_model(cfg), strict=True).load(path)
    # Partly NaN is damage, not a pending scale: refused in training too.
    state = torch.load(path, map_location="cpu")
    state["model"]["roi_heads.box_pooler.scale"][1:] = 1000.0
    torch.save(state, tmp_path / "damaged.pth")
    with pytest.raises(ValueError, match=r"roi_heads.box_pooler.scale \(1 NaN of 224 values\)"):
        IONCheckpointer(build_model(cfg)).load(str(tmp_path / "damaged.pth"))
