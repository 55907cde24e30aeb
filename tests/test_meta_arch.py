"""IONRCNN's data flow: context features, the training-only segmentation regularizer, and ION's
heads swapped into a stock Detectron2 config."""

import os

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from model_utils import load_cfg, random_inputs, shrink_cfg

from ion_d2 import IONRCNN, add_ion_config

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "ION_VGG16_tiny_cpu.yaml")


def _strip(inputs):
    return [
        {k: v for k, v in x.items() if k not in ("instances", "sem_seg", "proposals")}
        for x in inputs
    ]


def test_context_feature_is_added_with_conv5_shape():
    cfg = load_cfg(TINY)
    model = build_model(cfg)
    assert isinstance(model, IONRCNN)
    images = model.preprocess_image(random_inputs(cfg))
    features = model.extract_features(images)
    assert set(features) == {"conv3", "conv4", "conv5", "context"}
    assert features["context"].shape == features["conv5"].shape


def test_without_context_and_seg_it_is_generalized_rcnn():
    cfg = load_cfg(TINY)
    cfg.MODEL.ION.CONTEXT.NAME = ""
    cfg.MODEL.ION.SEG_LOSS_ON = False
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["conv3", "conv4", "conv5"]
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    ion = build_model(cfg)
    assert ion.context is None and ion.sem_seg_head is None
    std_cfg = cfg.clone()
    std_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    std = build_model(std_cfg)
    std.load_state_dict(ion.state_dict())
    ion.eval()
    std.eval()
    inputs = _strip(random_inputs(cfg))
    with torch.no_grad():
        a, b = ion(inputs), std(inputs)
    for x, y in zip(a, b):
        x, y = x["instances"], y["instances"]
        assert len(x) == len(y) > 0
        assert torch.allclose(x.pred_boxes.tensor, y.pred_boxes.tensor)
        assert torch.allclose(x.scores, y.scores)


def test_seg_loss_only_from_labelled_images_and_only_in_training():
    torch.manual_seed(0)
    cfg = load_cfg(TINY)
    model = build_model(cfg)
    # The zero-initialised score conv (FCN) would give no gradient to the context features on
    # the first step; randomise it so this test sees the regularizer reach them.
    torch.nn.init.normal_(model.sem_seg_head.score.weight, std=0.1)
    model.train()
    with EventStorage():
        unlabelled = model(random_inputs(cfg, with_sem_seg=(False,)))
        labelled = model(random_inputs(cfg, with_sem_seg=(True,)))
    assert unlabelled["loss_sem_seg"].item() == 0.0
    assert labelled["loss_sem_seg"].item() > 0.0
    labelled["loss_sem_seg"].backward()
    irnn_grads = [p.grad for p in model.context.parameters() if p.grad is not None]
    assert irnn_grads and any(g.abs().sum() > 0 for g in irnn_grads)

    def fail(*args, **kwargs):
        raise AssertionError("the segmentation head must not run at inference")

    model.sem_seg_head.forward = fail
    model.eval()
    with torch.no_grad():
        outputs = model(_strip(random_inputs(cfg)))
    assert len(outputs) == 2


def test_precomputed_proposals_as_in_the_paper():
    cfg = load_cfg(TINY)
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PrecomputedProposals"
    model = build_model(cfg)
    inputs = random_inputs(cfg)
    for x in inputs:
        props = Instances((x["height"], x["width"]))
        props.proposal_boxes = Boxes(
            torch.tensor([[8.0, 10.0, 52.0, 58.0], [0.0, 0.0, 60.0, 60.0]])
        )
        props.objectness_logits = torch.ones(2)
        x["proposals"] = props
    model.train()
    with EventStorage():
        losses = model(inputs)
    assert "loss_rpn_cls" not in losses and torch.isfinite(sum(losses.values()))
    model.eval()
    with torch.no_grad():
        outputs = model([dict(d, proposals=x["proposals"]) for d, x in zip(_strip(inputs), inputs)])
    assert all(len(o["instances"]) <= 2 * cfg.MODEL.ROI_HEADS.NUM_CLASSES for o in outputs)
    with pytest.raises(ValueError, match="precomputed 'proposals'"):
        model(_strip(inputs))


def test_swap_ion_heads_into_stock_r50_fpn_config():
    cfg = get_cfg()
    add_ion_config(cfg)
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    # The exact lines of README.md, "ION's heads in your own config".
    cfg.merge_from_list(
        [
            "MODEL.META_ARCHITECTURE",
            "IONRCNN",
            "MODEL.ION.CONTEXT.IN_FEATURE",
            "p5",
            "MODEL.ROI_HEADS.NAME",
            "IONROIHeads",
            "MODEL.ROI_HEADS.IN_FEATURES",
            "['p2', 'p3', 'p4', 'p5', 'context']",
        ]
    )
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM = 16
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    model = build_model(cfg)
    pooler = model.roi_heads.box_pooler
    assert [p.level_poolers[0].spatial_scale for p in pooler.poolers] == [
        1 / 4,
        1 / 8,
        1 / 16,
        1 / 32,
        1 / 32,
    ]
    model.train()
    with EventStorage():
        losses = model(random_inputs(cfg, with_sem_seg=(False,)))
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} == set(losses)
    sum(losses.values()).backward()
    assert model.context.layers[0].input_to_hidden.weight.grad is not None
    model.eval()
    with torch.no_grad():
        outputs = model(_strip(random_inputs(cfg)))
    assert outputs[0]["instances"].image_size == (96, 128)
