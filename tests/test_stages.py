"""Section 4.1's two stages from one config (ion_d2.engine.stages, SOLVER.ION_STAGE2), and
train_and_evaluate running them. train_net.py's run is in test_train_net_cli.py."""

import os

import pytest
import torch
from detectron2.data import MetadataCatalog
from model_utils import ion_cfg, load_cfg, synthetic_slice

from ion_d2.engine import train_and_evaluate
from ion_d2.engine.stages import training_stages

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")


def test_one_stage_unless_enabled():
    cfg = ion_cfg()
    assert cfg.SOLVER.ION_STAGE2.ENABLED is False
    assert training_stages(cfg) == [cfg]


def test_stage_2_is_stage_1_with_the_stage_2_keys():
    cfg = load_cfg(os.path.join(REPO, "configs", "ION_VGG16_VOC0712_stage1.yaml"))
    cfg.SOLVER.ION_STAGE2.ENABLED = True
    cfg.OUTPUT_DIR = "runs/x"
    first, second = training_stages(cfg)
    assert first.OUTPUT_DIR == os.path.join("runs/x", "stage1")
    assert second.OUTPUT_DIR == os.path.join("runs/x", "stage2")
    assert second.MODEL.WEIGHTS == os.path.join("runs/x", "stage1", "model_final.pth")
    # Section 4.1's stages: 40k iterations, conv1-conv5 frozen, 5e-3 -> 1e-4; then 100k,
    # conv1-conv2 frozen, 1e-3 -> 1e-5.
    assert (first.SOLVER.MAX_ITER, first.MODEL.BACKBONE.FREEZE_AT) == (40000, 5)
    assert (first.SOLVER.BASE_LR, first.SOLVER.ION_END_LR) == (5e-3, 1e-4)
    assert (second.SOLVER.MAX_ITER, second.MODEL.BACKBONE.FREEZE_AT) == (100000, 2)
    assert (second.SOLVER.BASE_LR, second.SOLVER.ION_END_LR) == (1e-3, 1e-5)
    # Stage 1 is the config itself; each stage's stored config trains that stage alone.
    assert first.MODEL.WEIGHTS == cfg.MODEL.WEIGHTS
    for stage in (first, second):
        assert stage.SOLVER.ION_STAGE2.ENABLED is False and stage.is_frozen()
    assert cfg.OUTPUT_DIR == "runs/x" and cfg.SOLVER.ION_STAGE2.ENABLED  # not mutated


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "'WarmupMultiStepLR'"),
        ("SOLVER.ION_STAGE2.MAX_ITER", 0, "MAX_ITER must be >= 1"),
    ],
)
def test_stage_2_that_could_not_act_is_refused(key, value, message):
    cfg = load_cfg(os.path.join(REPO, "configs", "ION_VGG16_VOC0712_stage1.yaml"))
    cfg.merge_from_list(["SOLVER.ION_STAGE2.ENABLED", True, key, value])
    with pytest.raises(ValueError, match=message):
        training_stages(cfg)


def test_train_and_evaluate_trains_both_stages_and_evaluates_the_second(tmp_path):
    with synthetic_slice(
        str(tmp_path / "data"), num_train=4, num_val=2, seed=5, name_prefix="stages"
    ) as (
        train,
        val,
    ):
        cfg = load_cfg(TINY)
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train,), (val,)
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = MetadataCatalog.get(train).num_sem_seg_classes
        cfg.SOLVER.MAX_ITER = 2
        cfg.SOLVER.ION_STAGE2.ENABLED = True
        cfg.SOLVER.ION_STAGE2.MAX_ITER = 3
        cfg.OUTPUT_DIR = str(tmp_path / "run")
        cfg.freeze()
        trainer, results = train_and_evaluate(cfg)
        assert trainer.cfg.OUTPUT_DIR == os.path.join(cfg.OUTPUT_DIR, "stage2")
        assert trainer.iter == 3 and "bbox" in results  # stage 2's 3 steps, then evaluated
        stage1 = torch.load(os.path.join(cfg.OUTPUT_DIR, "stage1", "model_final.pth"))
        assert stage1["iteration"] == 1  # stage 1's 2 steps (the last one's index)
        w1 = stage1["model"]
        w2 = trainer.model.state_dict()
        # Stage 2 (FREEZE_AT 2) starts from stage 1's weights and keeps conv1-conv2.
        assert torch.equal(w1["backbone.conv1_2.weight"], w2["backbone.conv1_2.weight"])
        assert not torch.equal(w1["backbone.conv4_1.weight"], w2["backbone.conv4_1.weight"])
        # A second call finds both stages finished and trains neither again.
        again, _ = train_and_evaluate(cfg)
        assert again.start_iter == 3
