"""Test-time augmentation (left-right flip, section 4.4) with IONRCNN, with and without box
voting: IONRCNNWithTTA against a manual merge of the two passes, flip consistency, and the
evaluation entry points (IONTrainer.test_with_TTA, train_net.py --eval-only)."""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import default_argument_parser
from detectron2.layers import cat
from detectron2.modeling import GeneralizedRCNNWithTTA, build_model
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image
from detectron2.structures import Boxes, Instances
from model_utils import load_cfg, load_script

from ion_d2 import IONRCNNWithTTA
from ion_d2.modeling.box_voting import box_voting_single_image

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")
H, W = 96, 128


def _cfg(voting: bool):
    cfg = load_cfg(TINY)
    cfg.MODEL.ION.SEG_LOSS_ON = False
    cfg.MODEL.ION.BOX_VOTING.ENABLED = voting
    cfg.TEST.AUG.ENABLED = True
    cfg.TEST.AUG.MIN_SIZES = (H,)
    cfg.TEST.AUG.MAX_SIZE = W
    cfg.TEST.AUG.FLIP = True
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 20
    return cfg


def _model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.eval()
    return model


def _image(seed=0, symmetric=False):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8)
    image[:, 20:60, 10:50] = 200  # something box-like to detect
    if symmetric:
        image = torch.cat([image[:, :, : W // 2], image[:, :, : W // 2].flip(-1)], dim=2)
    return image


def _mirror(boxes: torch.Tensor) -> torch.Tensor:
    """Left-right mirror of (N, 4k) XYXY boxes in a W-wide image."""
    b = boxes.reshape(-1, 4)
    return torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], dim=1).reshape(boxes.shape)


def _tta(model, cfg, image):
    with torch.no_grad():
        return IONRCNNWithTTA(cfg, model)([{"image": image, "height": H, "width": W}])[0][
            "instances"
        ]


def test_without_voting_tta_is_the_merge_of_both_passes():
    cfg = _cfg(voting=False)
    model = _model(cfg)
    image = _image()
    got = _tta(model, cfg, image)
    with torch.no_grad():
        plain, flipped = model.inference(
            [{"image": image}, {"image": image.flip(-1)}], do_postprocess=False
        )
    boxes = cat([plain.pred_boxes.tensor, _mirror(flipped.pred_boxes.tensor)])
    classes = cat([plain.pred_classes, flipped.pred_classes])
    scores = torch.zeros(len(boxes), cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1)
    scores[torch.arange(len(boxes)), classes] = cat([plain.scores, flipped.scores])
    want, _ = fast_rcnn_inference_single_image(
        boxes,
        scores,
        (H, W),
        1e-8,
        cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
        cfg.TEST.DETECTIONS_PER_IMAGE,
    )
    assert len(got) == len(want) > 0
    assert torch.allclose(got.pred_boxes.tensor, want.pred_boxes.tensor, atol=1e-4)
    assert torch.allclose(got.scores, want.scores)
    assert torch.equal(got.pred_classes, want.pred_classes)


def test_with_voting_tta_votes_once_over_both_passes_candidates():
    cfg = _cfg(voting=True)
    model = _model(cfg)
    image = _image()
    got = _tta(model, cfg, image)
    with torch.no_grad():
        (b1, b2), (s1, s2) = model.box_voting_candidates(
            [{"image": image}, {"image": image.flip(-1)}]
        )
    predictor = model.roi_heads.box_predictor
    want = box_voting_single_image(
        cat([b1, _mirror(b2)]),
        cat([s1, s2]),
        (H, W),
        score_thresh=predictor.test_score_thresh,
        nms_thresh=predictor.test_nms_thresh,
        topk_per_image=predictor.test_topk_per_image,
        vote_iou=cfg.MODEL.ION.BOX_VOTING.IOU_THRESH,
    )
    assert len(got) == len(want) > 0
    assert torch.allclose(got.pred_boxes.tensor, want.pred_boxes.tensor, atol=1e-4)
    assert torch.allclose(got.scores, want.scores)
    assert torch.equal(got.pred_classes, want.pred_classes)
    # Voting acted: the merged boxes are not just the candidates NMS kept.
    assert not all(
        any(torch.allclose(box, c, atol=1e-4) for c in cat([b1, _mirror(b2)]).reshape(-1, 4))
        for box in got.pred_boxes.tensor
    )


@pytest.mark.parametrize("voting", [False, True])
def test_symmetric_input_gives_mirrored_passes(voting):
    cfg = _cfg(voting)
    model = _model(cfg)
    tta = IONRCNNWithTTA(cfg, model)
    image = _image(symmetric=True)
    assert torch.equal(image, image.flip(-1))
    inputs, tfms = tta._get_augmented_inputs({"image": image, "height": H, "width": W})
    with torch.no_grad():
        boxes, scores, classes = tta._get_augmented_boxes(inputs, tfms)
    if not voting:
        scores, classes = torch.stack(scores), torch.stack(classes)
    half = len(boxes) // 2
    assert half > 0
    # The flipped pass sees the same pixels; mapped back, its boxes are the mirror images.
    assert torch.allclose(boxes[half:], _mirror(boxes[:half]), atol=1e-4)
    assert torch.allclose(scores[half:], scores[:half], atol=1e-6)
    if classes is not None:
        assert torch.equal(classes[half:], classes[:half])


@pytest.mark.parametrize("voting", [False, True])
def test_flipping_the_input_mirrors_the_tta_detections(voting):
    cfg = _cfg(voting)
    # ROIPool snaps boxes to the feature grid, so nearby proposals can tie on score exactly and
    # NMS then keeps whichever comes first; ROIAlign has no such ties.
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"
    model = _model(cfg)
    image = _image(seed=3)
    a = _tta(model, cfg, image)
    b = _tta(model, cfg, image.flip(-1))
    assert len(a) == len(b) > 0
    # Each detection of the flipped image is the mirror image of one of the image's (matched on
    # class and score rather than on rank, which float noise may swap between near-equal scores).
    mirrored = _mirror(a.pred_boxes.tensor)
    for box, score, cls in zip(b.pred_boxes.tensor, b.scores, b.pred_classes):
        match = (a.pred_classes == cls) & ((a.scores - score).abs() < 1e-5)
        assert match.any()
        assert (mirrored[match] - box).abs().max(dim=1).values.min() < 1e-3


def test_voting_tta_needs_ionrcnn():
    cfg = _cfg(voting=True)
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.ION.CONTEXT.NAME = ""
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["conv3", "conv4", "conv5"]
    with pytest.raises(TypeError, match="IONRCNN.*GeneralizedRCNN"):
        IONRCNNWithTTA(cfg, build_model(cfg))


@pytest.fixture
def tiny_coco(tmp_path):
    """Two images with one box each, registered as a COCO-format dataset."""
    name = "ion_d2_test_tta_coco"
    os.makedirs(tmp_path / "images")
    images, annotations = [], []
    for i in range(2):
        image = _image(seed=i).permute(1, 2, 0).numpy()
        cv2.imwrite(str(tmp_path / "images" / f"{i}.png"), np.ascontiguousarray(image))
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": H, "width": W})
        annotations.append(
            {"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 20, 40, 40]}
        )
        annotations[-1].update(area=1600, iscrowd=0)
    num_classes = load_cfg(TINY).MODEL.ROI_HEADS.NUM_CLASSES
    categories = [{"id": k + 1, "name": f"c{k}"} for k in range(num_classes)]
    with open(tmp_path / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    register_coco_instances(name, {}, str(tmp_path / "instances.json"), str(tmp_path / "images"))
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_train_net_eval_only_with_tta(tiny_coco, tmp_path, monkeypatch):
    cfg = _cfg(voting=True)
    model = _model(cfg)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("weights")
    train_net = load_script("train_net.py")
    # default_setup would attach file loggers to the test process; the config is all it needs.
    monkeypatch.setattr(train_net, "default_setup", lambda cfg, args: None)
    overrides = {
        "MODEL.WEIGHTS": str(tmp_path / "weights.pth"),
        "DATASETS.TEST": f"('{tiny_coco}',)",
        "MODEL.ION.SEG_LOSS_ON": "False",
        "MODEL.ION.BOX_VOTING.ENABLED": "True",
        "INPUT.MIN_SIZE_TEST": str(H),
        "TEST.AUG.ENABLED": "True",
        "TEST.AUG.MIN_SIZES": f"({H},)",
        "TEST.AUG.MAX_SIZE": str(W),
        "MODEL.RPN.POST_NMS_TOPK_TEST": "20",
        "OUTPUT_DIR": str(tmp_path / "cli"),
    }
    argv = ["--config-file", TINY, "--eval-only"] + [x for kv in overrides.items() for x in kv]
    # train_net.py --eval-only reports the plain and the TTA evaluation (IONTrainer.test_with_TTA).
    res = train_net.main(default_argument_parser().parse_args(argv))
    assert set(res) == {"bbox", "bbox_TTA"}
    assert np.isfinite(res["bbox_TTA"]["AP"])
    assert os.path.isdir(tmp_path / "cli" / "inference_TTA" / tiny_coco)


# ----------------------------------------------------------------------------------------------
# Precomputed proposals (selective search, as the paper): moved with the image.
# ----------------------------------------------------------------------------------------------
def _proposal_cfg(voting: bool):
    cfg = _cfg(voting)
    cfg.MODEL.LOAD_PROPOSALS = True
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PrecomputedProposals"
    return cfg


def _proposals(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([W - 20.0, H - 20.0])
    wh = 8 + torch.rand(n, 2, generator=g) * 40
    boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([W, H]))], dim=1)
    proposals = Instances((H, W))
    proposals.proposal_boxes = Boxes(boxes)
    proposals.objectness_logits = -torch.arange(n, dtype=torch.float32)
    return proposals


def _mirrored(proposals):
    out = Instances(proposals.image_size)
    out.proposal_boxes = Boxes(_mirror(proposals.proposal_boxes.tensor))
    out.objectness_logits = proposals.objectness_logits
    return out


def test_detectron2_tta_refuses_precomputed_proposals():
    cfg = _proposal_cfg(False)
    with pytest.raises(AssertionError, match="pre-computed proposals"):
        GeneralizedRCNNWithTTA(cfg, _model(cfg))


@pytest.mark.parametrize("voting", [False, True])
def test_tta_with_precomputed_proposals_is_the_manual_flip_and_merge(voting):
    cfg = _proposal_cfg(voting)
    model = _model(cfg)
    image, proposals = _image(), _proposals()
    with torch.no_grad():
        got = IONRCNNWithTTA(cfg, model)(
            [{"image": image, "height": H, "width": W, "proposals": proposals}]
        )[0]["instances"]
    inputs = [
        {"image": image, "proposals": proposals},
        {"image": image.flip(-1), "proposals": _mirrored(proposals)},
    ]
    predictor = model.roi_heads.box_predictor
    with torch.no_grad():
        if voting:
            (b1, b2), (s1, s2) = model.box_voting_candidates(inputs)
            want = box_voting_single_image(
                cat([b1, _mirror(b2)]),
                cat([s1, s2]),
                (H, W),
                score_thresh=predictor.test_score_thresh,
                nms_thresh=predictor.test_nms_thresh,
                topk_per_image=predictor.test_topk_per_image,
                vote_iou=cfg.MODEL.ION.BOX_VOTING.IOU_THRESH,
            )
        else:
            plain, flipped = model.inference(inputs, do_postprocess=False)
            boxes = cat([plain.pred_boxes.tensor, _mirror(flipped.pred_boxes.tensor)])
            classes = cat([plain.pred_classes, flipped.pred_classes])
            scores = torch.zeros(len(boxes), cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1)
            scores[torch.arange(len(boxes)), classes] = cat([plain.scores, flipped.scores])
            want, _ = fast_rcnn_inference_single_image(
                boxes,
                scores,
                (H, W),
                1e-8,
                cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
                cfg.TEST.DETECTIONS_PER_IMAGE,
            )
    assert len(got) == len(want) > 0
    torch.testing.assert_close(got.pred_boxes.tensor, want.pred_boxes.tensor, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.scores, want.scores)
    assert torch.equal(got.pred_classes, want.pred_classes)


def test_tta_scales_precomputed_proposals_with_the_image():
    # The test loader resized a 2H x 2W image to H x W (proposals in those pixels); the TTA pass
    # at twice that scale, flipped, must see the proposals doubled and mirrored.
    cfg = _proposal_cfg(False)
    cfg.TEST.AUG.MIN_SIZES = (2 * H,)
    cfg.TEST.AUG.MAX_SIZE = 2 * W
    model = _model(cfg)
    proposals = _proposals()
    seen = []
    inference = model.inference

    def spy(batched_inputs, *args, **kwargs):
        seen.extend(batched_inputs)
        return inference(batched_inputs, *args, **kwargs)

    model.inference = spy
    with torch.no_grad():
        IONRCNNWithTTA(cfg, model)(
            [{"image": _image(), "height": 2 * H, "width": 2 * W, "proposals": proposals}]
        )
    assert [tuple(x["image"].shape[1:]) for x in seen] == [(2 * H, 2 * W)] * 2
    doubled = 2 * proposals.proposal_boxes.tensor
    mirrored = torch.stack(
        [2 * W - doubled[:, 2], doubled[:, 1], 2 * W - doubled[:, 0], doubled[:, 3]], dim=1
    )
    for x, want in zip(seen, [doubled, mirrored]):
        assert x["proposals"].image_size == (2 * H, 2 * W)
        torch.testing.assert_close(x["proposals"].proposal_boxes.tensor, want)
        assert torch.equal(x["proposals"].objectness_logits, proposals.objectness_logits)
