"""IONROIHeads and box voting, following detectron2's tests/modeling/test_roi_heads.py."""

import os

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, ImageList, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from model_utils import ion_cfg, load_cfg, shrink_cfg

from ion_d2.modeling.box_voting import box_voting_inference
from ion_d2.modeling.roi_heads import IONROIHeads
from ion_d2.modeling.skip_pooling import IONSkipPooler

IMAGE = (64, 80)


def _cfg(in_features=("f3", "f4", "f5"), **skip_pool):
    overrides = {
        "MODEL.ROI_HEADS.NAME": "IONROIHeads",
        "MODEL.ROI_HEADS.IN_FEATURES": list(in_features),
        "MODEL.ROI_HEADS.NUM_CLASSES": 3,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 16,
        "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
        "MODEL.ROI_BOX_HEAD.NUM_FC": 2,
        "MODEL.ROI_BOX_HEAD.FC_DIM": 32,
        "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
        "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIPool",
        "MODEL.ION.SKIP_POOL.REDUCE_DIM": 8,
        # The heads pool made-up features; SCALE_INIT 0 (the paper's constants) is accepted
        # for ion_d2's VGG16 only, whose features the constants were measured on.
        "MODEL.BACKBONE.NAME": "build_ion_vgg16_backbone",
    }
    overrides.update({f"MODEL.ION.SKIP_POOL.{k}": v for k, v in skip_pool.items()})
    return ion_cfg(overrides)


def _shapes():
    return {
        "f3": ShapeSpec(channels=4, stride=4),
        "f4": ShapeSpec(channels=6, stride=8),
        "f5": ShapeSpec(channels=6, stride=16),
        "context": ShapeSpec(channels=6, stride=16),
    }


def _features(n=2):
    g = torch.Generator().manual_seed(1)
    return {
        k: torch.rand(n, s.channels, IMAGE[0] // s.stride, IMAGE[1] // s.stride, generator=g)
        for k, s in _shapes().items()
    }


def _proposals(counts=(6, 5)):
    g = torch.Generator().manual_seed(2)
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g) * 40
        wh = torch.rand(n, 2, generator=g) * 30 + 8
        inst = Instances(IMAGE)
        inst.proposal_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.objectness_logits = torch.rand(n, generator=g)
        out.append(inst)
    return out


def _targets(counts=(2, 1)):
    out = []
    for i, n in enumerate(counts):
        inst = Instances(IMAGE)
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 40.0, 35.0], [30.0, 5.0, 60.0, 50.0]][:n]))
        inst.gt_classes = torch.tensor([1, 2][:n])
        out.append(inst)
    return out


def _images(n=2):
    return ImageList(torch.zeros(n, 3, *IMAGE), [IMAGE] * n)


def test_builds_skip_pooler_over_every_in_feature():
    heads = build_roi_heads(_cfg(("f3", "f4", "f5", "context")), _shapes())
    assert isinstance(heads, IONROIHeads)
    assert isinstance(heads.box_pooler, IONSkipPooler)
    assert len(heads.box_pooler.poolers) == 4
    assert heads.box_pooler.reduce.in_channels == 4 + 6 + 6 + 6
    assert heads.box_pooler.reduce.out_channels == 8
    # fc6 sees the 8x7x7 descriptor.
    assert heads.box_head.fc1.in_features == 8 * 7 * 7


def test_unknown_in_feature_raises():
    with pytest.raises(ValueError, match=r"\['conv9'\].*available features"):
        build_roi_heads(_cfg(("f3", "conv9")), _shapes())


def test_training_losses_and_inference_instances():
    torch.manual_seed(0)
    heads = build_roi_heads(_cfg(), _shapes())
    heads.train()
    with EventStorage():
        _, losses = heads(_images(), _features(), _proposals(), _targets())
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert heads.box_pooler.reduce.weight.grad.abs().sum() > 0
    assert heads.box_pooler.scale.grad.abs().sum() > 0

    heads.eval()
    heads.box_predictor.test_score_thresh = 0.0
    with torch.no_grad():
        results, _ = heads(_images(), _features(), _proposals(), None)
    assert len(results) == 2
    for r in results:
        assert r.image_size == IMAGE
        assert r.has("pred_boxes") and r.has("scores") and r.has("pred_classes")
        assert len(r) > 0 and (r.pred_classes < 3).all()


def test_no_proposals_and_no_ground_truth():
    torch.manual_seed(0)
    heads = build_roi_heads(_cfg(), _shapes())
    heads.train()
    with EventStorage():
        _, losses = heads(_images(), _features(), _proposals((0, 4)), _targets((0, 1)))
    assert all(torch.isfinite(v) for v in losses.values())
    heads.eval()
    with torch.no_grad():
        results, _ = heads(_images(), _features(), _proposals((0, 4)), None)
    assert len(results[0]) == 0


def test_one_feature_without_normalisation_reproduces_standard_roi_heads():
    cfg = _cfg(("f5",), NORM="none", REDUCE_DIM=0, CONCAT_DROPOUT=0.0)
    ion = build_roi_heads(cfg, _shapes())
    std_cfg = cfg.clone()
    std_cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    std = build_roi_heads(std_cfg, _shapes())
    missing, unexpected = ion.load_state_dict(std.state_dict(), strict=False)
    # The skip pooler's record of its feature order is all StandardROIHeads lacks.
    assert missing == ["box_pooler.feature_order"] and not unexpected
    ion.eval()
    std.eval()
    with torch.no_grad():
        a, _ = ion(_images(), _features(), _proposals(), None)
        b, _ = std(_images(), _features(), _proposals(), None)
    for x, y in zip(a, b):
        assert len(x) == len(y) > 0
        assert torch.allclose(x.pred_boxes.tensor, y.pred_boxes.tensor, atol=1e-5)
        assert torch.allclose(x.scores, y.scores, atol=1e-6)
        assert torch.equal(x.pred_classes, y.pred_classes)


def test_box_voting_by_hand():
    # One class (K=1), class-specific boxes; two overlapping boxes and one far away.
    boxes = torch.tensor(
        [[10.0, 10.0, 30.0, 30.0], [12.0, 10.0, 32.0, 30.0], [50.0, 50.0, 60.0, 60.0]]
    )
    scores = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    (result,) = box_voting_inference(
        [boxes],
        [scores],
        [(100, 100)],
        score_thresh=0.05,
        nms_thresh=0.5,
        topk_per_image=100,
        vote_iou=0.5,
    )
    assert torch.allclose(result.scores, torch.tensor([0.9, 0.3]))
    voted = (0.9 * boxes[0] + 0.6 * boxes[1]) / 1.5
    assert torch.allclose(result.pred_boxes.tensor[0], voted)
    assert torch.allclose(result.pred_boxes.tensor[1], boxes[2])
    # A box of another class never votes.
    boxes2 = torch.cat([boxes, boxes], dim=1)  # K=2
    scores2 = torch.tensor([[0.9, 0.0, 0.1], [0.0, 0.6, 0.4], [0.3, 0.0, 0.7]])
    (result2,) = box_voting_inference(
        [boxes2],
        [scores2],
        [(100, 100)],
        score_thresh=0.05,
        nms_thresh=0.5,
        topk_per_image=100,
        vote_iou=0.5,
    )
    kept0 = result2.pred_boxes.tensor[result2.scores == 0.9][0]
    assert torch.allclose(kept0, boxes[0])


def test_box_voting_inference_through_roi_heads():
    cfg = _cfg()
    cfg.MODEL.ION.BOX_VOTING.ENABLED = True
    heads = build_roi_heads(cfg, _shapes())
    assert heads.box_voting
    heads.eval()
    heads.box_predictor.test_score_thresh = 0.0
    with torch.no_grad():
        results, _ = heads(_images(), _features(), _proposals((6, 0)), None)
    assert len(results[0]) > 0 and len(results[1]) == 0
    r = results[0]
    assert (r.pred_boxes.tensor[:, 0::2] <= IMAGE[1]).all()
    assert (r.pred_boxes.tensor[:, 1::2] <= IMAGE[0]).all()
    assert (r.pred_boxes.tensor >= 0).all()


CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.mark.parametrize(
    "config,low_overlap_is_background",
    [("ION_VGG16_VOC0712_stage1.yaml", False), ("ION_VGG16_synthetic.yaml", True)],
)
def test_fast_rcnn_sampling_ignores_proposals_below_0_1_iou(config, low_overlap_is_background):
    # Fast R-CNN (BG_THRESH_LO 0.1): background is IoU in [0.1, 0.5); below 0.1 is never
    # sampled. The synthetic config keeps Detectron2's rule (every IoU < 0.5 is background).
    cfg = shrink_cfg(load_cfg(os.path.join(CONFIGS, config)))
    shapes = {
        "conv3": ShapeSpec(channels=4, stride=4),
        "conv4": ShapeSpec(channels=4, stride=8),
        "conv5": ShapeSpec(channels=4, stride=16),
        "context": ShapeSpec(channels=4, stride=16),
    }
    heads = build_roi_heads(cfg, shapes)
    gt = Instances((100, 100), gt_boxes=Boxes(torch.tensor([[0.0, 0.0, 40.0, 40.0]])))
    gt.gt_classes = torch.tensor([1])
    low = torch.tensor([[36.0, 0.0, 76.0, 40.0], [0.0, 36.0, 40.0, 76.0], [37.0, 37.0, 77.0, 77.0]])
    mid = torch.tensor([[22.0, 0.0, 62.0, 40.0]])
    boxes = Boxes(torch.cat([low, mid]))
    ious = pairwise_iou(boxes, gt.gt_boxes)[:, 0]
    assert (ious[:3] < 0.1).all() and (ious[:3] > 0).all() and 0.25 < ious[3] < 0.35
    proposals = Instances((100, 100), proposal_boxes=boxes)
    proposals.objectness_logits = torch.zeros(4)
    background = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for seed in range(3):
        torch.manual_seed(seed)
        with EventStorage():
            (sampled,) = heads.label_and_sample_proposals([proposals], [gt])
        bg_boxes = sampled.proposal_boxes.tensor[sampled.gt_classes == background]
        low_sampled = [any(torch.equal(b, x) for x in sampled.proposal_boxes.tensor) for b in low]
        assert all(low_sampled) if low_overlap_is_background else not any(low_sampled)
        # The IoU-0.3 proposal is a background sample either way.
        assert any(torch.equal(b, mid[0]) for b in bg_boxes)
        # The ground truth, appended to the proposals, is the one foreground.
        assert (sampled.gt_classes == 1).sum() == 1


def _vote(boxes, scores, score_thresh=0.05):
    (result,) = box_voting_inference(
        [boxes],
        [scores],
        [(100, 100)],
        score_thresh=score_thresh,
        nms_thresh=0.5,
        topk_per_image=100,
        vote_iou=0.5,
    )
    return result


def test_box_voting_keeps_a_zero_area_box_instead_of_nan():
    # The top box lies right of the 100 x 100 image: clipping leaves it zero-area, and
    # pairwise_iou gives a zero-area box IoU 0 even with itself, so it had no voter (0 / 0).
    boxes = torch.tensor([[120.0, 10.0, 150.0, 30.0], [20.0, 20.0, 20.0, 40.0], [5.0, 5, 25, 25]])
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    result = _vote(boxes, scores)
    assert torch.isfinite(result.pred_boxes.tensor).all()
    expected = {0.9: [100.0, 10.0, 100.0, 30.0], 0.8: [20.0, 20.0, 20.0, 40.0], 0.7: [5, 5, 25, 25]}
    assert len(result) == 3
    for box, score in zip(result.pred_boxes.tensor, result.scores):
        assert box.tolist() == pytest.approx(expected[round(score.item(), 1)])


def test_box_voting_with_zero_score_weights_keeps_the_box():
    # A score threshold below 0 admits candidates whose softmax score is exactly 0; a kept box
    # whose voters all weigh 0 stays where NMS left it.
    boxes = torch.tensor([[10.0, 10.0, 30.0, 30.0], [11.0, 10.0, 31.0, 30.0]])
    scores = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    result = _vote(boxes, scores, score_thresh=-1.0)
    assert len(result) == 1
    assert torch.isfinite(result.pred_boxes.tensor).all()
    assert result.scores.tolist() == [0.0]
    assert any(torch.equal(result.pred_boxes.tensor[0], b) for b in boxes)


def _voting_heads(rescore, agnostic=False, topk=0, min_score=0.0):
    torch.manual_seed(0)
    cfg = _cfg()
    cfg.MODEL.ION.BOX_VOTING.ENABLED = True
    cfg.MODEL.ION.BOX_VOTING.RESCORE = rescore
    cfg.MODEL.ION.BOX_VOTING.RESCORE_TOPK = topk
    cfg.MODEL.ION.BOX_VOTING.RESCORE_MIN_SCORE = min_score
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = agnostic
    heads = build_roi_heads(cfg, _shapes())
    heads.eval()
    heads.box_predictor.test_score_thresh = 0.0
    return heads


def _one_box(heads, features, image, box):
    """Softmax scores (K + 1) and decoded boxes (K * 4 or 4) of one box of one image, alone."""
    feats = [features[f] for f in heads.box_in_features]
    boxes = [Boxes(torch.zeros(0, 4)) for _ in range(len(feats[0]))]
    boxes[image] = Boxes(box[None])
    proposals = [Instances(IMAGE, proposal_boxes=b) for b in boxes]
    logits, deltas = heads._run_box_head(feats, proposals)
    decoded = heads.box_predictor.box2box_transform.apply_deltas(deltas, box[None])
    return logits.softmax(dim=1)[0], decoded[0]


def _clip(box):
    box = Boxes(box[None].clone())
    box.clip(IMAGE)
    return box.tensor[0]


@pytest.mark.parametrize("rescore", ["top_class", "per_class"])
def test_box_voting_candidates_against_a_box_by_box_computation(rescore):
    heads = _voting_heads(rescore)
    features, proposals = _features(), _proposals()
    with torch.no_grad():
        boxes, scores = heads.box_voting_candidates(features, proposals)
        for i, p in enumerate(proposals):
            num = len(p)
            assert boxes[i].shape == (2 * num, 3 * 4) and scores[i].shape == (2 * num, 3 + 1)
            for r, proposal in enumerate(p.proposal_boxes.tensor):
                s1, b1 = _one_box(heads, features, i, proposal)
                assert torch.allclose(scores[i][r], s1, atol=1e-5)
                assert torch.allclose(boxes[i][r], b1, atol=1e-3)
                if rescore == "top_class":
                    # The box regressed for the top class is scored again, for every class.
                    top = s1[:-1].argmax()
                    s2, b2 = _one_box(heads, features, i, _clip(b1[4 * top : 4 * top + 4]))
                    assert torch.allclose(scores[i][num + r], s2, atol=1e-5)
                    assert torch.allclose(boxes[i][num + r], b2, atol=1e-3)
                    continue
                # Each class's regressed box is scored again, for its own class only.
                for c in range(3):
                    cols = slice(4 * c, 4 * c + 4)
                    s2, b2 = _one_box(heads, features, i, _clip(b1[cols]))
                    assert torch.allclose(scores[i][num + r, c], s2[c], atol=1e-5)
                    assert torch.allclose(boxes[i][num + r, cols], b2[cols], atol=1e-3)
                assert scores[i][num + r, 3] == 0.0


def _voted(heads, boxes, scores):
    """:func:`box_voting_inference` of the candidates with ``heads``' test settings."""
    return box_voting_inference(
        boxes,
        scores,
        [IMAGE, IMAGE],
        score_thresh=0.0,
        nms_thresh=heads.box_predictor.test_nms_thresh,
        topk_per_image=heads.box_predictor.test_topk_per_image,
        vote_iou=0.5,
    )


def test_per_class_rescoring_changes_the_detections_and_equals_voting_its_candidates():
    features, proposals = _features(), _proposals()
    top, per = _voting_heads("top_class"), _voting_heads("per_class")
    per.load_state_dict(top.state_dict())
    with torch.no_grad():
        top_results, _ = top(_images(), features, proposals, None)
        per_results, _ = per(_images(), features, proposals, None)
        boxes, scores = per.box_voting_candidates(features, proposals)
    expected = _voted(per, boxes, scores)
    for got, want in zip(per_results, expected):
        assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
        assert torch.equal(got.scores, want.scores)
    assert any(
        len(a) != len(b) or not torch.allclose(a.scores, b.scores)
        for a, b in zip(top_results, per_results)
    )


def test_per_class_rescoring_with_class_agnostic_boxes_is_top_class():
    features, proposals = _features(), _proposals()
    top, per = _voting_heads("top_class", agnostic=True), _voting_heads("per_class", agnostic=True)
    per.load_state_dict(top.state_dict())
    with torch.no_grad():
        a = top.box_voting_candidates(features, proposals)
        b = per.box_voting_candidates(features, proposals)
    assert a[0][0].shape[1] == 4  # one box per proposal, for every class
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("rescore", ["top_class", "per_class"])
def test_rescore_topk_scores_again_only_the_top_k_proposals(rescore):
    """RESCORE_TOPK k: round 1 as before; round 2's rows are the full round 2's rows of the k
    proposals with the highest round-1 class score, in proposal order."""
    features, proposals = _features(), _proposals()
    full = _voting_heads(rescore)
    k = 2
    top = _voting_heads(rescore, topk=k)
    top.load_state_dict(full.state_dict())
    with torch.no_grad():
        boxes, scores = full.box_voting_candidates(features, proposals)
        top_boxes, top_scores = top.box_voting_candidates(features, proposals)
        results, _ = top(_images(), features, proposals, None)
    for i, p in enumerate(proposals):
        num = len(p)
        assert num > k
        picked = scores[i][:num, :-1].max(dim=1).values.argsort(descending=True)[:k].sort().values
        assert top_boxes[i].shape[0] == top_scores[i].shape[0] == num + k
        assert torch.equal(top_boxes[i][:num], boxes[i][:num])
        assert torch.allclose(top_boxes[i][num:], boxes[i][num + picked], atol=1e-4)
        assert torch.allclose(top_scores[i][num:], scores[i][num + picked], atol=1e-6)
    expected = _voted(top, top_boxes, top_scores)
    for got, want in zip(results, expected):
        assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)
    # k at least the number of proposals: the paper's round 2.
    every = _voting_heads(rescore, topk=100)
    every.load_state_dict(full.state_dict())
    with torch.no_grad():
        for x, y in zip(every.box_voting_candidates(features, proposals)[0], boxes):
            assert torch.equal(x, y)


@pytest.mark.parametrize("rescore", ["top_class", "per_class"])
def test_rescore_min_score_scores_again_only_proposals_at_or_above_it(rescore):
    """RESCORE_MIN_SCORE m: round 1 as before; round 2's rows are the full round 2's rows of
    the proposals whose best round-1 class score is at least m, in proposal order; with
    RESCORE_TOPK k, the k highest of those; above every score, round 2 scores nothing and the
    detections vote among round 1's candidates alone."""
    features, proposals = _features(), _proposals()
    full = _voting_heads(rescore)
    with torch.no_grad():
        boxes, scores = full.box_voting_candidates(features, proposals)
    best = [s[: len(p), :-1].max(dim=1).values for s, p in zip(scores, proposals)]
    # A threshold between the scores, so that some proposals pass and some do not.
    threshold = float(torch.cat(best).median())
    for topk in (0, 1):
        heads = _voting_heads(rescore, topk=topk, min_score=threshold)
        heads.load_state_dict(full.state_dict())
        with torch.no_grad():
            got_boxes, got_scores = heads.box_voting_candidates(features, proposals)
        for i, p in enumerate(proposals):
            num = len(p)
            picked = (best[i] >= threshold).nonzero().flatten()
            assert 0 < len(picked) < num
            if topk:
                picked = picked[best[i][picked].argmax()][None]
            assert got_boxes[i].shape[0] == got_scores[i].shape[0] == num + len(picked)
            assert torch.equal(got_boxes[i][:num], boxes[i][:num])
            assert torch.allclose(got_boxes[i][num:], boxes[i][num + picked], atol=1e-4)
            assert torch.allclose(got_scores[i][num:], scores[i][num + picked], atol=1e-6)
    none = _voting_heads(rescore, min_score=1.0)
    none.load_state_dict(full.state_dict())
    with torch.no_grad():
        none_boxes, none_scores = none.box_voting_candidates(features, proposals)
        results, _ = none(_images(), features, proposals, None)
    for i, p in enumerate(proposals):
        assert torch.equal(none_boxes[i], boxes[i][: len(p)])
    expected = _voted(none, none_boxes, none_scores)
    for got, want in zip(results, expected):
        assert len(got) > 0
        assert torch.equal(got.pred_boxes.tensor, want.pred_boxes.tensor)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("RESCORE", "all", r"RESCORE='all'.*top_class"),
        ("IOU_THRESH", 1.5, r"IOU_THRESH=1.5"),
        ("RESCORE_TOPK", -1, r"RESCORE_TOPK=-1 is invalid; expected an int >= 0"),
        ("RESCORE_TOPK", 100, r"RESCORE_TOPK=100 only acts with.*ENABLED True"),
        ("RESCORE_MIN_SCORE", 1.5, r"RESCORE_MIN_SCORE=1.5 is not a class score.*\[0, 1\]"),
        ("RESCORE_MIN_SCORE", -0.1, r"RESCORE_MIN_SCORE=-0.1 is not a class score"),
        ("RESCORE_MIN_SCORE", 0.001, r"RESCORE_MIN_SCORE=0.001 only acts with.*ENABLED True"),
    ],
)
def test_bad_box_voting_settings_raise(key, value, match):
    cfg = _cfg()
    setattr(cfg.MODEL.ION.BOX_VOTING, key, value)
    with pytest.raises(ValueError, match=match):
        build_roi_heads(cfg, _shapes())
