"""ION on ResNet: the shipped presets under Detectron2's stock trainer, and the swap section."""

import logging
import math
import os

import pytest
import torch
import yaml
from detectron2 import model_zoo
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.utils.events import EventStorage
from model_utils import (
    flat_cfg,
    ion_cfg,
    load_cfg,
    narrow_resnet,
    random_inputs,
    synthetic_slice,
)

import ion_d2
from ion_d2 import IONRes5ROIHeads
from ion_d2.engine.skip_pool_scale import measure_pooled_norms, measure_skip_pool_scale, skip_pooler
from ion_d2.modeling.context.into_levels import IONContextIntoLevels

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


class StockTrainer(DefaultTrainer):
    """Detectron2's tools/train_net.py Trainer: DefaultTrainer with only build_evaluator."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def _tiny(cfg, output_dir, train_name):
    narrow_resnet(cfg)
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
def test_resnet_preset_trains_under_detectron2s_stock_trainer(preset, tmp_path, caplog):
    with synthetic_slice(
        str(tmp_path / "data"), num_train=4, num_val=1, seed=3, name_prefix="r50"
    ) as (train, _):
        cfg = _tiny(load_cfg(preset), tmp_path / "out", train)
        trainer = StockTrainer(cfg)
        trainer.resume_or_load(resume=False)
        # The line docs/USAGE.md adds to tools/train_net.py's main() (a no-op for the stock
        # preset, which has no skip pooler).
        exec(STOCK_TRAINER_LINE, {"ion_d2": ion_d2, "trainer": trainer, "cfg": cfg})
        with caplog.at_level(logging.INFO, logger="ion_d2.engine.skip_pool_scale"):
            trainer.train()
        assert trainer.iter == cfg.SOLVER.MAX_ITER == 2  # iterations 0 and 1 ran
        assert math.isfinite(trainer.storage.history("total_loss").latest())
        pooler = skip_pooler(trainer.model)
        if "ION_R50_C4" in preset:
            # SCALE_INIT -1 (C4's pooler too), measured before the first step on the training
            # images (SCALE_MEASURE_IMAGES, here all 4): section 5.2's one procedure.
            assert pooler is not None and not pooler.scale_pending
            assert "on 4 training images" in caplog.text and "scale set to" in caplog.text
        else:
            # The stock model and ION-FPN (the context added into the levels) pool nothing
            # with ION's skip pooler.
            assert pooler is None and "scale set to" not in caplog.text


def _swap(zoo_config, lines):
    cfg = ion_cfg(path=model_zoo.get_config_file(zoo_config))
    cfg.merge_from_list(lines)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM = 16
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    return narrow_resnet(cfg)


def _step_and_infer(cfg):
    model = build_model(cfg)
    inputs = random_inputs(cfg, with_sem_seg=(False,))
    if skip_pooler(model) is not None:
        # SCALE_INIT -1: measured first, as SkipPoolScaleHook does before the first step.
        measure_skip_pool_scale(model, [inputs])
    model.train()
    with EventStorage():
        losses = model(inputs)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": x["image"]} for x in random_inputs(cfg)])
    assert outputs[0]["instances"].image_size == (96, 128)
    return model


def _doc_block(doc, heading, language):
    """The first ```language block under ``heading`` in ``doc``."""
    with open(os.path.join(REPO, doc)) as f:
        text = f.read()
    section = text[text.index(heading) :]
    start = section.index(f"```{language}\n") + len(f"```{language}\n")
    return section[start : section.index("\n```\n", start)]


def _doc_lines(doc, heading):
    """The first ```yaml block under ``heading`` in ``doc``, as merge_from_list's key/value pairs:
    the lines the docs tell users to add, read from the docs themselves."""
    block = _doc_block(doc, heading, "yaml")

    def flat(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield from (prefix + key, repr(value) if isinstance(value, list) else str(value))

    return list(flat(yaml.safe_load(block)))


FPN_LINES = _doc_lines("README.md", "## ION's heads in your own config")
C4_LINES = _doc_lines("docs/USAGE.md", "## ION's heads in a C4 model")
# The one line a trainer other than IONTrainer adds (section 5.2's scale, before the first step).
STOCK_TRAINER_LINE = _doc_block("docs/USAGE.md", "## Which trainer", "python")


def test_doc_lines_are_read():
    assert FPN_LINES[:2] == ["MODEL.META_ARCHITECTURE", "IONRCNN"]
    assert ["MODEL.ROI_HEADS.NAME", "IONRes5ROIHeads"] == C4_LINES[-4:-2]
    assert STOCK_TRAINER_LINE == "trainer.register_hooks([ion_d2.engine.SkipPoolScaleHook(cfg)])"


def test_swap_section_fpn():
    model = _step_and_infer(_swap("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", FPN_LINES))
    assert isinstance(model.context, IONContextIntoLevels) and model.context.detach_input
    assert model.context.targets == ["p2", "p3", "p4", "p5"]
    assert model.context.proj.out_channels == 32  # the FPN's width (narrowed)
    assert type(model.roi_heads) is StandardROIHeads  # Detectron2's, untouched
    assert model.roi_heads.box_in_features == ["p2", "p3", "p4", "p5"]


# The keys that decide ION's model on top of the detector it is swapped into.
ION_MODEL_KEYS = (
    "MODEL.META_ARCHITECTURE",
    "MODEL.ION.",
    "MODEL.ROI_HEADS.",
    "MODEL.ROI_BOX_HEAD.",
    "MODEL.SEM_SEG_HEAD.",
)


@pytest.mark.parametrize(
    "zoo_config, lines, preset",
    [
        ("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", FPN_LINES, "configs/ION_R50_FPN_1x.yaml"),
        ("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", C4_LINES, "configs/ION_R50_C4_1x.yaml"),
    ],
)
def test_swap_lines_alone_give_the_presets_model(zoo_config, lines, preset):
    # Drop-in (issue 25): add_ion_config plus the documented lines, and no other key, give the
    # preset's (the measured) model.
    swapped = flat_cfg(ion_d2.get_ion_cfg(model_zoo.get_config_file(zoo_config), lines))
    shipped = flat_cfg(load_cfg(preset))
    keys = sorted(k for k in shipped if k.startswith(ION_MODEL_KEYS))
    assert {k: swapped[k] for k in keys} == {k: shipped[k] for k in keys}


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
    narrow_resnet(stock)
    stock_res5 = build_model(stock).roi_heads.res5.state_dict()
    ours = heads.res5.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in stock_res5.items()}


def test_c4_scale_is_found_and_measured_by_the_one_procedure():
    # Issue 25: C4 keeps its pooler as roi_heads.pooler (Res5ROIHeads), not box_pooler.
    cfg = _swap("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", C4_LINES)
    model = build_model(cfg)
    pooler = model.roi_heads.pooler
    assert skip_pooler(model) is pooler and pooler.scale_pending
    assert pooler.scale_reference == cfg.MODEL.ION.CONTEXT.IN_FEATURE == "res4"
    inputs = random_inputs(cfg, with_sem_seg=(False,))
    value = measure_skip_pool_scale(model, [inputs])
    assert value == pytest.approx(measure_pooled_norms(model, [inputs]).per_roi["res4"])
    assert torch.equal(pooler.scale, torch.full_like(pooler.scale, value))


# The paper's skip pooling on FPN (README.md's second paragraph of the section): every ROI from
# every level and the context, without the context added into the levels.
SKIP_POOL_FPN = [
    "MODEL.META_ARCHITECTURE", "IONRCNN",
    "MODEL.ION.CONTEXT.IN_FEATURE", "p5",
    "MODEL.ROI_HEADS.NAME", "IONROIHeads",
    "MODEL.ROI_HEADS.IN_FEATURES", "['p2', 'p3', 'p4', 'p5', 'context']",
    "MODEL.ION.SKIP_POOL.REDUCE_DIM", "256",
]  # fmt: skip


def test_scale_init_zero_on_resnet_is_refused():
    # Without SKIP_POOL.SCALE_INIT: the default 0.
    cfg = _swap("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", SKIP_POOL_FPN)
    with pytest.raises(ValueError, match=r"SCALE_INIT\) is 0.*the backbone is FPN"):
        build_model(cfg)


def test_options_the_c4_heads_would_ignore_are_refused():
    # Issue 25: box voting on C4 was silently ignored (IONRes5ROIHeads has no second round).
    cfg = _swap("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", C4_LINES)
    cfg.MODEL.ION.BOX_VOTING.ENABLED = True
    with pytest.raises(TypeError, match=r"BOX_VOTING.ENABLED is True.*IONRes5ROIHeads"):
        build_model(cfg)
    # Enlarged boxes act on C4 (its skip pooler reads them) ...
    cfg = _swap("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml", C4_LINES)
    cfg.MODEL.ION.SKIP_POOL.ENLARGED.IN_FEATURES = ["res3"]
    heads = _step_and_infer(cfg).roi_heads
    assert heads.in_features[-1] == "res3" and heads.pooler.box_factors[-1] == 3.0
    # ... but not with Detectron2's own heads, which never pool with ION's skip pooler.
    cfg = _swap("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", FPN_LINES)
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ION.SKIP_POOL.ENLARGED.IN_FEATURES = ["p2"]
    with pytest.raises(TypeError, match=r"ENLARGED.IN_FEATURES is \['p2'\].*StandardROIHeads"):
        build_model(cfg)
    # Nor a scale to measure (SCALE_INIT -1), which IONTrainer would silently skip.
    cfg = _swap("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", FPN_LINES)
    cfg.MODEL.ION.SKIP_POOL.SCALE_INIT = -1.0
    with pytest.raises(TypeError, match=r"SCALE_INIT is -1 .*StandardROIHeads.*no scale"):
        build_model(cfg)
