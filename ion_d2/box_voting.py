"""Weighted box voting after NMS ("W" in Tables 1-3; section 4.2, after MR-CNN)."""

from typing import List, Tuple

import torch
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances, pairwise_iou

__all__ = ["box_voting_inference"]


def box_voting_inference(
    boxes: List[torch.Tensor],
    scores: List[torch.Tensor],
    image_shapes: List[Tuple[int, int]],
    *,
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
    vote_iou: float,
) -> List[Instances]:
    """
    Like :func:`detectron2.modeling.roi_heads.fast_rcnn.fast_rcnn_inference`, but every box kept
    by per-class NMS is replaced by the score-weighted mean of all candidate boxes of its class
    (suppressed ones included) that overlap it by at least ``vote_iou``.

    Args:
        boxes (list[Tensor]): per image, (R, K * 4) class-specific or (R, 4) class-agnostic boxes.
        scores (list[Tensor]): per image, (R, K + 1) softmax scores, background last.
        image_shapes (list[tuple]): per image (height, width) to clip boxes to.
        score_thresh (float): keep candidates with a score above this (section 4.1: 0.05).
        nms_thresh (float): IoU threshold of per-class NMS.
        topk_per_image (int): keep at most this many detections (section 4.1: 100); < 0 keeps all.
        vote_iou (float): IoU from which a candidate votes on a kept box (section 4.2: 0.5).

    Returns:
        list[Instances]: per image, fields "pred_boxes", "scores", "pred_classes".
    """
    return [
        _box_voting_single_image(b, s, shape, score_thresh, nms_thresh, topk_per_image, vote_iou)
        for b, s, shape in zip(boxes, scores, image_shapes)
    ]


def _box_voting_single_image(boxes, scores, image_shape, score_thresh, nms_thresh, topk, vote_iou):
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    boxes, scores = boxes[valid], scores[valid]
    scores = scores[:, :-1]
    num_bbox_reg_classes = boxes.shape[1] // 4
    boxes = Boxes(boxes.reshape(-1, 4))
    boxes.clip(image_shape)
    boxes = boxes.tensor.view(-1, num_bbox_reg_classes, 4)

    candidates = (scores > score_thresh).nonzero()
    cand_classes = candidates[:, 1]
    reg_class = cand_classes if num_bbox_reg_classes > 1 else torch.zeros_like(cand_classes)
    cand_boxes = boxes[candidates[:, 0], reg_class]
    cand_scores = scores[candidates[:, 0], cand_classes]

    keep = batched_nms(cand_boxes, cand_scores, cand_classes, nms_thresh)
    if topk >= 0:
        keep = keep[:topk]
    kept_classes = cand_classes[keep]
    overlap = pairwise_iou(Boxes(cand_boxes[keep]), Boxes(cand_boxes))
    votes = (overlap >= vote_iou) & (kept_classes[:, None] == cand_classes[None, :])
    weights = votes.to(cand_scores.dtype) * cand_scores[None, :]
    # Each kept box overlaps itself (IoU 1), so every row has a positive weight.
    voted = weights @ cand_boxes / weights.sum(dim=1, keepdim=True)

    result = Instances(image_shape)
    result.pred_boxes = Boxes(voted)
    result.scores = cand_scores[keep]
    result.pred_classes = kept_classes
    return result
