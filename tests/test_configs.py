"""Every YAML in configs/ builds a model that trains a step and runs inference on CPU, as
DensePose's test_setup.py does for its configs."""

import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from model_utils import load_cfg, random_inputs, shrink_cfg

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def test_configs_found():
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"Base-ION-VGG16.yaml", "ION_VGG16_tiny_cpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_trains_and_predicts(path):
    cfg = shrink_cfg(load_cfg(path))
    model = build_model(cfg)
    model.train()
    inputs = random_inputs(cfg)
    with EventStorage():
        losses = model(inputs)
    expected = {"loss_cls", "loss_box_reg"}
    if not cfg.MODEL.LOAD_PROPOSALS:
        expected |= {"loss_rpn_cls", "loss_rpn_loc"}
    if cfg.MODEL.ION.SEG_LOSS_ON:
        expected.add("loss_sem_seg")
    assert set(losses) == expected
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()

    model.eval()
    with torch.no_grad():
        outputs = model([{k: v for k, v in x.items() if k != "instances"} for x in inputs])
    assert len(outputs) == len(inputs)
    for out, x in zip(outputs, inputs):
        assert out["instances"].image_size == (x["height"], x["width"])


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_precomputed_proposal_files_match_datasets(path):
    """A config that loads proposals names one file per dataset, in the datasets' order."""
    cfg = load_cfg(path)
    assert cfg.MODEL.LOAD_PROPOSALS == (cfg.MODEL.PROPOSAL_GENERATOR.NAME == "PrecomputedProposals")
    if cfg.MODEL.LOAD_PROPOSALS:
        assert len(cfg.DATASETS.PROPOSAL_FILES_TRAIN) == len(cfg.DATASETS.TRAIN)
        assert len(cfg.DATASETS.PROPOSAL_FILES_TEST) == len(cfg.DATASETS.TEST)
