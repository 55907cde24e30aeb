"""ION on ResNet: the shipped presets under Detectron2's stock trainer, and the swap section."""

import math
import os

import pytest
import torch
import yaml
from detectron2 import model_zoo
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from model_utils import ion_cfg, load_cfg, random_inputs, synthetic_slice

from ion_d2 import IONRes5ROIHeads

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


class StockTrainer(DefaultTrainer):
    """Detectron2's tools/train_net.py Trainer: DefaultTrainer with only build_evaluator."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def _narrow(cfg):
    # R50's depth at toy widths (multiples of 32 for GroupNorm; seconds per step on a CPU).
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 32
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    if cfg.MODEL.ION.SKIP_POOL.REDUCE_DIM == 256:
        cfg.MODEL.ION.SKIP_POOL.REDUCE_DIM = 32
    return cfg


def _tiny(cfg, output_dir, train_name):
    _narrow(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM = 16
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 64
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 6
    cfg.DATASETS.TRAIN = (train_name,)
    cfg.DATASETS.TEST = ()
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = 2
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.SOLVER.STEPS = ()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


@pytest.mark.parametrize(
    "preset",
    [
        "configs/ION_R50_FPN_1x.yaml",
        "configs/ION_R50_C4_1x.yaml",
        "configs/ION_R50_FPN_synthetic.yaml",
        "configs/FasterRCNN_R50_FPN_synthetic.yaml",
    ],
)
def test_resnet_preset_trains_under_detectron2s_stock_trainer(preset, tmp_path):
    with synthetic_slice(
        str(tmp_path / "data"), num_train=4, num_val=1, seed=3, name_prefix="r50"
    ) as (train, _):
        cfg = _tiny(load_cfg(preset), tmp_path / "out", train)
        trainer = StockTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        assert trainer.iter == cfg.SOLVER.MAX_ITER == 2  # iterations 0 and 1 ran
        assert math.isfinite(trainer.storage.history("total_loss").latest())
        pooler = getattr(trainer.model.roi_heads, "box_pooler", None)
        pooler = getattr(trainer.model.roi_heads, "pooler", pooler)
        if "ION_" in preset:
            # SCALE_INIT -1, measured on the first training batch by the stock trainer.
            assert not pooler.scale_pending and torch.isfinite(pooler.scale).all()


def _swap(zoo_config, lines):
    cfg = ion_cfg(path=model_zoo.get_config_file(zoo_config))
    cfg.merge_from_list(lines)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM = 16
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    return _narrow(cfg)


def _step_and_infer(cfg):
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(random_inputs(cfg, with_sem_seg=(False,)))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": x["image"]} for x in random_inputs(cfg)])
    assert outputs[0]["instances"].image_size == (96, 128)
    return model


def _doc_lines(doc, heading):
    """The first ```yaml block under ``heading`` in ``doc``, as merge_from_list's key/value pairs:
    the lines the docs tell users to add, read from the docs themselves."""
    with open(os.path.join(REPO, doc)) as f:
        text = f.read()
    section = text[text.index(heading) :]
    block = section[section.index("```yaml\n") + len("```yaml\n") : section.index("\n```\n")]

    def flat(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield from (prefix + key, repr(value) if isinstance(value, list) else str(value))

    return list(flat(yaml.safe_load(block)))


FPN_LINES = _doc_lines("README.md", "## ION's heads in your own config")
C4_LINES = _doc_lines("docs/USAGE.md", "## ION's heads in a C4 model")


def test_doc_lines_are_read():
    assert FPN_LINES[:2] == ["MODEL.META_ARCHITECTURE", "IONRCNN"]
    assert ["MODEL.ROI_HEADS.NAME", "IONRes5ROIHeads"] == C4_LINES[-4:-2]


def test_swap_section_fpn():
    model = _step_and_infer(_swap("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", FPN_LINES))
    pooler = model.roi_heads.box_pooler
    assert pooler.feature_names == ["p2", "p3", "p4", "p5", "context"]
    assert pooler.reduce.out_channels == 32  # REDUCE_DIM 256 narrowed with FPN.OUT_CHANNELS


def test_swap_section_c4_keeps_res5_as_the_box_head():
    cfg = _swap("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", C4_LINES)
    model = _step_and_infer(cfg)
    heads = model.roi_heads
    assert isinstance(heads, IONRes5ROIHeads)
    assert heads.pooler.feature_names == ["res2", "res3", "res4", "context"]
    # res5's input: RES2_OUT_CHANNELS * 4 (1024 for R50; 128 at the test's width).
    assert heads.pooler.reduce.out_channels == 4 * cfg.MODEL.RESNETS.RES2_OUT_CHANNELS == 128
    # res5 is the stock C4 model's, parameter for parameter: its ImageNet weights load.
    stock = ion_cfg(path=model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"))
    stock.MODEL.DEVICE = "cpu"
    _narrow(stock)
    stock_res5 = build_model(stock).roi_heads.res5.state_dict()
    ours = heads.res5.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in stock_res5.items()}


def test_scale_init_zero_on_resnet_is_refused():
    lines = FPN_LINES[:4] + FPN_LINES[6:]  # without SCALE_INIT: the default 0
    cfg = _swap("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", lines)
    with pytest.raises(ValueError, match="SCALE_INIT is 0.*build_resnet_fpn_backbone"):
        build_model(cfg)
