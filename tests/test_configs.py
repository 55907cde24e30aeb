"""Every YAML in configs/ (the paper presets in configs/paper/ included) builds a model, and every
distinct model among them trains a step and runs inference on CPU, as DensePose's test_setup.py
does for its configs."""

import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from model_utils import load_cfg, random_inputs, shrink_cfg

from ion_d2 import IONRCNNWithTTA

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True))


def _name(path):
    return os.path.relpath(path, CONFIG_DIR)


def _model_key(cfg) -> str:
    """
    Everything that reaches the model or its inputs, but the weights file and the stage: configs
    with equal keys (a paper row and the identical row of another table, a row's stage 1 and its
    stage 2) build the same model and run the same steps. MODEL.BACKBONE.FREEZE_AT, the only
    model key in which a stage-2 preset differs from its stage 1 (tests/test_paper_configs.py),
    only sets requires_grad in the trunk; the top-level stage-1 and stage-2 configs run both.
    """
    model = cfg.MODEL.clone()
    model.WEIGHTS = ""
    model.BACKBONE.FREEZE_AT = 0
    return model.dump() + cfg.INPUT.dump() + cfg.TEST.dump()


def _distinct(paths):
    """The top-level configs, and each paper preset whose model none of those before it has."""
    top_level = [p for p in paths if os.path.dirname(_name(p)) == ""]
    first = {}
    for path in top_level + [p for p in paths if p not in top_level]:
        first.setdefault(_model_key(shrink_cfg(load_cfg(path))), path)
    return sorted(set(first.values()) | set(top_level))


DISTINCT = _distinct(CONFIGS)


def test_configs_found():
    names = {_name(c) for c in CONFIGS}
    assert {"Base-ION-VGG16.yaml", "ION_VGG16_tiny_cpu.yaml"} <= names
    assert "paper/table4/c2_c3_c4_c5_1x1.yaml" in names
    assert len(DISTINCT) < len(CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_config_builds(path):
    cfg = shrink_cfg(load_cfg(path))
    model = build_model(cfg)
    assert model.roi_heads.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES


@pytest.mark.parametrize("path", DISTINCT, ids=_name)
def test_config_trains_and_predicts(path):
    cfg = shrink_cfg(load_cfg(path))
    model = build_model(cfg)
    model.train()
    inputs = random_inputs(cfg)
    with EventStorage():
        losses = model(inputs)
    expected = {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    if cfg.MODEL.ION.SEG_LOSS_ON:
        expected.add("loss_sem_seg")
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()

    model.eval()
    test_inputs = [{k: v for k, v in x.items() if k != "instances"} for x in inputs]
    with torch.no_grad():
        outputs = model(test_inputs)
    assert len(outputs) == len(inputs)
    for out, x in zip(outputs, inputs):
        assert out["instances"].image_size == (x["height"], x["width"])
        assert torch.isfinite(out["instances"].pred_boxes.tensor).all()

    if cfg.TEST.AUG.ENABLED:
        height, width = inputs[0]["height"], inputs[0]["width"]
        cfg.TEST.AUG.MIN_SIZES, cfg.TEST.AUG.MAX_SIZE = (height,), width
        with torch.no_grad():
            outputs = IONRCNNWithTTA(cfg, model)(test_inputs)
        assert outputs[0]["instances"].image_size == (height, width)
