"""Every YAML in configs/ (the paper presets in configs/paper/ included) builds a model, and every
distinct model among them trains a step and runs inference on CPU, as DensePose's test_setup.py
does for its configs; the VGG16 presets do too on selective-search proposals
(MODEL.ION.PROPOSALS), and the top-level stage-1 presets' stage 2 (SOLVER.ION_STAGE2)."""

import glob
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from model_utils import load_cfg, random_inputs, shrink_cfg

from ion_d2 import IONRCNNWithTTA
from ion_d2.engine.skip_pool_scale import measure_skip_pool_scale, skip_pooler
from ion_d2.engine.stages import training_stages

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True))
SS = {"MODEL.ION.PROPOSALS": "selective_search"}
# The top-level VGG16 presets, which the paper trains and tests on selective-search proposals.
SS_PRESETS = [
    os.path.join(CONFIG_DIR, f"{arch}_VGG16_{data}.yaml")
    for arch in ("ION", "FastRCNN")
    for data in ("VOC0712_stage1", "synthetic")
] + [os.path.join(CONFIG_DIR, "ION_VGG16_COCO_stage1.yaml")]


def _name(path):
    return os.path.relpath(path, CONFIG_DIR)


def _model_key(cfg) -> str:
    """
    Everything that reaches the model or its inputs, but the weights file and the stage: configs
    with equal keys (a paper row and the identical row of another table, a stage-1 preset and
    its stage 2) build the same model and run the same steps. MODEL.BACKBONE.FREEZE_AT, the only
    model key in which stage 2 differs from stage 1 (tests/test_paper_configs.py), only sets
    requires_grad in the trunk; VARIANTS runs a stage-1 preset's both.
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
# (config, its overrides): every distinct model, the VGG16 presets on selective-search
# proposals (the precomputed path), and stage 2's model key of a stage-1 preset (conv3-conv5
# trained).
VARIANTS = [(p, {}) for p in DISTINCT] + [(p, SS) for p in SS_PRESETS]
VARIANTS.append((SS_PRESETS[0], {"MODEL.BACKBONE.FREEZE_AT": 2}))


def _variant_name(variant):
    path, overrides = variant
    return _name(path) + "".join(f" {k} {v}" for k, v in overrides.items())


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


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_name)
def test_config_trains_and_predicts(variant):
    cfg = shrink_cfg(load_cfg(*variant))
    model = build_model(cfg)
    inputs = random_inputs(cfg)
    # SKIP_POOL.SCALE_INIT -1 (the paper's presets): measured as IONTrainer does, on these inputs.
    pooler = skip_pooler(model)
    if pooler is not None and pooler.scale_pending:
        measure_skip_pool_scale(model, [inputs])
    model.train()
    with EventStorage():
        losses = model(inputs)
    expected = {"loss_cls", "loss_box_reg"}
    if not cfg.MODEL.LOAD_PROPOSALS:
        expected |= {"loss_rpn_cls", "loss_rpn_loc"}
    if cfg.MODEL.ION.SEG_LOSS_ON:
        expected.add("loss_sem_seg")
    if cfg.MODEL.ION.LOCAL_CONTEXT.IN_FEATURE and cfg.MODEL.ION.LOCAL_CONTEXT.LOSS_WEIGHT > 0:
        expected.add("loss_local_context")
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


@pytest.mark.parametrize("proposals", ["generator", "selective_search"])
@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_precomputed_proposal_files_match_datasets(path, proposals):
    """A config that loads proposals names one file per dataset, in the datasets' order."""
    cfg = load_cfg(path, {"MODEL.ION.PROPOSALS": proposals})
    assert cfg.MODEL.LOAD_PROPOSALS == (cfg.MODEL.PROPOSAL_GENERATOR.NAME == "PrecomputedProposals")
    if cfg.MODEL.LOAD_PROPOSALS:
        assert len(cfg.DATASETS.PROPOSAL_FILES_TRAIN) == len(cfg.DATASETS.TRAIN)
        assert len(cfg.DATASETS.PROPOSAL_FILES_TEST) == len(cfg.DATASETS.TEST)


PAPER_PRESETS = [
    f"{arch}_VGG16_{data}_stage1.yaml"
    for arch, data in [("ION", "VOC0712"), ("ION", "COCO"), ("FastRCNN", "VOC0712")]
]


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_use_fast_rcnn_and_ion_training_details(name, stage):
    cfg = load_cfg(os.path.join(CONFIG_DIR, name), {"SOLVER.ION_STAGE2.ENABLED": True})
    cfg.freeze()
    cfg = training_stages(cfg)[stage - 1]
    roi = cfg.MODEL.ROI_HEADS
    # Fast R-CNN's sampling and test NMS (lib/fast_rcnn/config.py).
    assert list(roi.IOU_THRESHOLDS) == [0.1, 0.5] and list(roi.IOU_LABELS) == [-1, 0, 1]
    assert roi.POSITIVE_FRACTION == 0.25 and roi.BATCH_SIZE_PER_IMAGE == 128
    assert roi.PROPOSAL_APPEND_GT and roi.NMS_THRESH_TEST == 0.3
    assert tuple(cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS) == (10.0, 10.0, 5.0, 5.0)
    assert cfg.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA == 1.0
    # Biases: lr_mult 2, decay_mult 0.
    assert cfg.SOLVER.BIAS_LR_FACTOR == 2.0 and cfg.SOLVER.WEIGHT_DECAY_BIAS == 0.0
    # Section 4.1: one gradient norm over all parameters, 20 on the batch-mean loss.
    clip = cfg.SOLVER.CLIP_GRADIENTS
    assert clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE == 20.0
    assert clip.NORM_TYPE == 2.0
    # Section 5.2: the skip-pooling scale measured on the training set.
    assert cfg.MODEL.ION.SKIP_POOL.SCALE_INIT == -1.0
    assert cfg.MODEL.ION.SKIP_POOL.SCALE_MEASURE_IMAGES == 100


@pytest.mark.parametrize("name", ["ION_VGG16_synthetic.yaml", "FastRCNN_VGG16_synthetic.yaml"])
def test_synthetic_configs_keep_the_settings_readme_was_measured_with(name):
    cfg = load_cfg(os.path.join(CONFIG_DIR, name))
    roi = cfg.MODEL.ROI_HEADS
    assert list(roi.IOU_THRESHOLDS) == [0.5] and list(roi.IOU_LABELS) == [0, 1]
    assert roi.NMS_THRESH_TEST == 0.5
    assert cfg.SOLVER.BIAS_LR_FACTOR == 1.0 and cfg.SOLVER.WEIGHT_DECAY_BIAS is None
    clip = cfg.SOLVER.CLIP_GRADIENTS
    assert clip.CLIP_TYPE == "norm" and clip.CLIP_VALUE == 80.0
    assert cfg.MODEL.ION.SKIP_POOL.SCALE_INIT == 100.0
