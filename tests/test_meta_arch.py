"""IONRCNN's data flow: context features, the training-only segmentation regularizer, and ION's
heads swapped into a stock Detectron2 config."""

import os

import pytest
import torch
from detectron2 import model_zoo
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from model_utils import ion_cfg, load_cfg, random_inputs

from ion_d2 import IONRCNN
from ion_d2.engine.skip_pool_scale import measure_skip_pool_scale

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


def test_the_constructor_checks_the_parts_however_they_were_built():
    # IONRCNN.__init__, not a config builder, refuses these: the YAML path, the LazyConfig
    # builder and a direct call all get the same checks.
    cfg = load_cfg(TINY)  # SKIP_POOL.SCALE_INIT 0: the paper's constant, for VGG16 only
    model = build_model(cfg)
    names = ("backbone", "context", "sem_seg_head", "proposal_generator", "roi_heads")
    parts = {name: getattr(model, name) for name in names}
    pixels = {"pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD}
    IONRCNN(**parts, **pixels)
    with pytest.raises(ValueError, match=r"scale_init .* is 0.* the backbone is Identity"):
        IONRCNN(**{**parts, "backbone": torch.nn.Identity()}, **pixels)
    parts["roi_heads"].box_in_features = ["conv3", "conv4", "conv5"]
    with pytest.raises(ValueError, match=r"\['context'\], which no head reads.*SEG_LOSS_ON"):
        IONRCNN(**{**parts, "sem_seg_head": None}, **pixels)


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
    cfg = ion_cfg(path=model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"))
    # The paper's skip pooling on FPN (README.md, "ION's heads in your own config", its second
    # paragraph): every ROI from every level plus the context.
    cfg.merge_from_list(
        [
            "MODEL.META_ARCHITECTURE",
            "IONRCNN",
            "MODEL.ION.CONTEXT.IN_FEATURE",
            "p5",
            "MODEL.ION.SKIP_POOL.SCALE_INIT",
            "-1.0",
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
    inputs = random_inputs(cfg, with_sem_seg=(False,))
    # SCALE_INIT -1: measured first, as SkipPoolScaleHook does before the first step.
    measure_skip_pool_scale(model, [inputs])
    model.train()
    with EventStorage():
        losses = model(inputs)
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} == set(losses)
    sum(losses.values()).backward()
    assert model.context.layers[0].input_to_hidden.weight.grad is not None
    model.eval()
    with torch.no_grad():
        outputs = model(_strip(random_inputs(cfg)))
    assert outputs[0]["instances"].image_size == (96, 128)


# ----------------------------------------------------------------------------------------------
# Batch independence (section 4.1's single-image passes) and the labelled-fraction metric
# ----------------------------------------------------------------------------------------------
SIZE_A, SIZE_B = (72, 100), (120, 128)  # padded alone to 80 x 112 and 128 x 128


def _random_biases(model, std=0.1):
    """The default inits zero every conv bias, so the batch's padding would stay 0 through the
    trunk and the IRNN; trained weights have biases."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(std * torch.randn(p.shape, generator=g))


def _image(size, seed, boxes, sem_seg=False):
    h, w = size
    g = torch.Generator().manual_seed(seed)
    x = {"image": torch.randint(0, 256, (3, h, w), generator=g).float(), "height": h, "width": w}
    props = Instances(size)
    props.proposal_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    props.objectness_logits = torch.ones(len(boxes))
    x["proposals"] = props
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.tensor(boxes[:1], dtype=torch.float32))
    inst.gt_classes = torch.tensor([1])
    x["instances"] = inst
    if sem_seg:
        x["sem_seg"] = torch.randint(0, 4, size, generator=g)
    return x


# A's proposals reach its right and bottom edges, where the batch's padding would leak in.
BOXES_A = [[4.0, 6.0, 40.0, 50.0], [50.0, 30.0, 100.0, 72.0], [0.0, 0.0, 100.0, 72.0]]
BOXES_B = [[10.0, 10.0, 100.0, 110.0]]


def _precomputed_model(**ion):
    cfg = load_cfg(TINY)
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PrecomputedProposals"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    for key, value in ion.items():
        cfg.MODEL.ION[key] = value
    model = build_model(cfg)
    _random_biases(model)
    return model.eval()


def _detections(model, inputs, index):
    with torch.no_grad():
        return model(_strip_gt(inputs))[index]["instances"]


def _strip_gt(inputs):
    return [{k: v for k, v in x.items() if k not in ("instances", "sem_seg")} for x in inputs]


def _same_detections(x, y):
    # Equal up to float32 rounding: the trunk's kernels may sum in another order for another
    # batch shape (2 ulps, 1.5e-5 px, on 100-px boxes on an AMD EPYC), so the boxes' tolerance
    # grows with their size. B's padding reaching A moves them by tens of pixels.
    return (
        len(x) == len(y)
        and torch.allclose(x.pred_boxes.tensor, y.pred_boxes.tensor, rtol=1e-6, atol=1e-5)
        and torch.allclose(x.scores, y.scores, rtol=0, atol=1e-5)
        and torch.equal(x.pred_classes, y.pred_classes)
    )


def test_detections_do_not_depend_on_the_batch():
    model = _precomputed_model()
    a, b = _image(SIZE_A, 1, BOXES_A), _image(SIZE_B, 2, BOXES_B)
    alone = _detections(model, [a], 0)
    assert len(alone) > 0
    assert _same_detections(_detections(model, [a, b], 0), alone)
    assert _same_detections(_detections(model, [b, a], 1), alone)

    # The switch acts: one batched trunk pass lets B's padding reach A's conv5.
    model.backbone_per_image = False
    assert not _same_detections(_detections(model, [a, b], 0), alone)


def _rpn_model():
    cfg = load_cfg(TINY)
    assert cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    # Every anchor is sampled, so the training losses are free of random draws.
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 100000
    model = build_model(cfg)
    _random_biases(model)
    return model


def _rpn_proposals(model, inputs):
    gt = [x["instances"] for x in inputs] if model.training else None
    _, _, proposals, losses = model.features_and_proposals(inputs, gt)
    return proposals, losses


def _trunk(model, images):
    """The trunk's features as IONRCNN computes them (per padded size or batched)."""
    return {k: v for k, v in model.extract_features(images).items() if k != "context"}


@pytest.mark.parametrize("a_first", [True, False])
def test_rpn_proposals_and_detections_do_not_depend_on_the_batch(a_first):
    model = _rpn_model().eval()
    a, b = _image(SIZE_A, 1, BOXES_A), _image(SIZE_B, 2, BOXES_B)
    for x in (a, b):
        del x["proposals"]
    batch, ia = ([a, b], 0) if a_first else ([b, a], 1)
    with torch.no_grad():
        alone = _rpn_proposals(model, _strip_gt([a]))[0][0]
        together = _rpn_proposals(model, _strip_gt(batch))[0][ia]
    # The RPN keeps its post-NMS top-k of A's own anchors: the same boxes and scores.
    assert len(alone) > 10
    torch.testing.assert_close(together.proposal_boxes.tensor, alone.proposal_boxes.tensor)
    torch.testing.assert_close(together.objectness_logits, alone.objectness_logits)
    # And so the whole model's detections.
    detections = _detections(model, [a], 0)
    assert len(detections) > 0
    assert _same_detections(_detections(model, batch, ia), detections)


def test_rpn_training_losses_are_the_mean_of_the_images_alone():
    model = _rpn_model().train()
    a, b = _image(SIZE_A, 1, BOXES_A), _image(SIZE_B, 2, BOXES_B)
    with EventStorage(), torch.no_grad():
        loss_a = _rpn_proposals(model, [a])[1]
        loss_b = _rpn_proposals(model, [b])[1]
        loss_ab = _rpn_proposals(model, [a, b])[1]
    assert set(loss_ab) == {"loss_rpn_cls", "loss_rpn_loc"}
    for name in loss_ab:
        # Anchors over the batch's padding below and right of A are no negatives of A's.
        torch.testing.assert_close(loss_ab[name], (loss_a[name] + loss_b[name]) / 2)


def test_backbone_per_image_passes():
    model = _precomputed_model()
    calls = []
    model.backbone.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape))
    a, b = _image(SIZE_A, 1, BOXES_A), _image(SIZE_B, 2, BOXES_B)
    a2 = _image((80, 112), 3, BOXES_A)  # pads to A's size: one group with A

    # Equal padded sizes: one batched pass, exactly Detectron2's usual one.
    images = model.preprocess_image([a, a2])
    with torch.no_grad():
        per_image = _trunk(model, images)
        model.backbone_per_image = False
        batched = _trunk(model, images)
        model.backbone_per_image = True
    assert calls == [(2, 3, 80, 112)] * 2
    assert all(torch.equal(per_image[k], batched[k]) for k in batched)

    # Mixed: one pass per padded size, each image's features as alone, zeros beyond.
    calls.clear()
    with torch.no_grad():
        mixed = _trunk(model, model.preprocess_image([b, a, a2]))
        assert sorted(calls) == [(1, 3, 128, 128), (2, 3, 80, 112)]
        alone = _trunk(model, model.preprocess_image([a]))
    for name, feature in mixed.items():
        stride = model.backbone.output_shape()[name].stride
        assert feature.shape[-2:] == (128 // stride, 128 // stride)
        h, w = alone[name].shape[-2:]
        assert (h, w) == (80 // stride, 112 // stride)
        # (A shares its pass with a2: a batch of 2 convolves with other float rounding.)
        torch.testing.assert_close(feature[1:2, :, :h, :w], alone[name], rtol=1e-5, atol=1e-5)
        assert (feature[1:, :, h:] == 0).all() and (feature[1:, :, :, w:] == 0).all()


@pytest.mark.parametrize("per_image_train", [True, False])
def test_backbone_per_image_train_decides_training_passes_only(per_image_train):
    model = _precomputed_model(BACKBONE_PER_IMAGE_TRAIN=per_image_train)
    assert model.backbone_per_image and model.backbone_per_image_train == per_image_train
    calls = []
    model.backbone.register_forward_hook(lambda m, inp, out: calls.append(tuple(inp[0].shape)))
    images = model.preprocess_image([_image(SIZE_A, 1, BOXES_A), _image(SIZE_B, 2, BOXES_B)])
    with torch.no_grad():
        model.train()
        _trunk(model, images)
        training_calls, calls[:] = list(calls), []
        model.eval()
        _trunk(model, images)
    per_size = [(1, 3, 80, 112), (1, 3, 128, 128)]
    assert sorted(training_calls) == (per_size if per_image_train else [(2, 3, 128, 128)])
    # Inference follows BACKBONE_PER_IMAGE whatever the training setting.
    assert sorted(calls) == per_size


@pytest.mark.parametrize(
    "norm, per_image_train, warns", [("BN", True, True), ("BN", False, False), ("", True, False)]
)
def test_per_image_training_passes_with_batch_norm_warn(caplog, norm, per_image_train, warns):
    cfg = load_cfg(TINY)
    cfg.MODEL.ION.VGG16.NORM = norm
    cfg.MODEL.ION.BACKBONE_PER_IMAGE_TRAIN = per_image_train
    with caplog.at_level("WARNING", logger="ion_d2.modeling.meta_arch"):
        build_model(cfg)
    assert (
        "BACKBONE_PER_IMAGE_TRAIN is True and the backbone has BatchNorm" in caplog.text
    ) == warns


def test_equal_size_outputs_same_with_and_without_backbone_per_image():
    model = _precomputed_model()
    inputs = [_image((96, 128), 1, BOXES_A), _image((96, 128), 2, BOXES_B)]
    per_image = [_detections(model, inputs, i) for i in range(2)]
    model.backbone_per_image = False
    batched = [_detections(model, inputs, i) for i in range(2)]
    for x, y in zip(per_image, batched):
        assert len(x) > 0
        assert torch.equal(x.pred_boxes.tensor, y.pred_boxes.tensor)
        assert torch.equal(x.scores, y.scores)


@pytest.mark.parametrize("a_first", [True, False])
def test_seg_loss_of_an_image_does_not_depend_on_the_batch(a_first):
    cfg = load_cfg(TINY)
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PrecomputedProposals"
    # Dropout draws differ with the batch's size; the property is about the padding.
    cfg.MODEL.ION.CONTEXT.IRNN.CONCAT_DROPOUT = 0.0
    model = build_model(cfg).train()
    _random_biases(model)
    torch.nn.init.normal_(model.sem_seg_head.score.weight, std=0.1)
    a = _image(SIZE_A, 1, BOXES_A, sem_seg=True)
    b = _image(SIZE_B, 2, BOXES_B, sem_seg=False)
    with EventStorage():
        alone = model([a])["loss_sem_seg"]
        together = model([a, b] if a_first else [b, a])["loss_sem_seg"]
    assert alone.item() > 0
    # The loss is a mean over images, B unlabelled adding 0: A's loss is unchanged by B.
    torch.testing.assert_close(together, alone / 2, rtol=1e-5, atol=0)


def test_sem_seg_labelled_fraction_is_logged():
    cfg = load_cfg(TINY)
    model = build_model(cfg).train()
    with EventStorage() as storage:
        model(random_inputs(cfg, n=4, with_sem_seg=(True, False, False, False)))
        assert storage.history("ion/sem_seg_labelled_fraction").latest() == 0.25
        storage.step()
        model(random_inputs(cfg, n=2, with_sem_seg=(True,)))
        assert storage.history("ion/sem_seg_labelled_fraction").latest() == 1.0

    cfg.MODEL.ION.SEG_LOSS_ON = False
    model = build_model(cfg).train()
    with EventStorage() as storage:
        model(random_inputs(cfg, with_sem_seg=(True,)))
        assert "ion/sem_seg_labelled_fraction" not in storage.histories()


def test_unlabelled_pixels_take_the_seg_heads_ignore_value():
    cfg = load_cfg(TINY)
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 254
    args = IONRCNN.from_config(cfg)
    assert IONRCNN(**args).sem_seg_head.ignore_value == 254
    with pytest.raises(ValueError, match="sem_seg_ignore_value=255 differs"):
        IONRCNN(**args, sem_seg_ignore_value=255)
