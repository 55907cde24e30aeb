"""Weighted box voting after NMS ("W" in Tables 1-3; section 4.2, after MR-CNN)."""

import math
from typing import List, Tuple

import torch
from detectron2.layers import batched_nms
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image
from detectron2.structures import Boxes, Instances, pairwise_iou

__all__ = ["box_voting_inference", "box_voting_single_image"]


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
        box_voting_single_image(
            b,
            s,
            shape,
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            topk_per_image=topk_per_image,
            vote_iou=vote_iou,
        )
        for b, s, shape in zip(boxes, scores, image_shapes)
    ]


def box_voting_single_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image_shape: Tuple[int, int],
    *,
    score_thresh: float,
    nms_thresh: float,
    topk_per_image: int,
    vote_iou: float,
) -> Instances:
    """
    :func:`box_voting_inference` for one image (arguments as there, for that image).
    """
    # Detectron2's own filtering (finite rows, clipping, score threshold) with an NMS that
    # suppresses nothing (no IoU exceeds infinity), at the price of that extra NMS pass: every
    # candidate is kept to vote.
    candidates, _ = fast_rcnn_inference_single_image(
        boxes, scores, image_shape, score_thresh, math.inf, -1
    )
    cand_boxes = candidates.pred_boxes.tensor
    cand_scores = candidates.scores
    cand_classes = candidates.pred_classes

    keep = batched_nms(cand_boxes, cand_scores, cand_classes, nms_thresh)
    if topk_per_image >= 0:
        keep = keep[:topk_per_image]
    kept_boxes = cand_boxes[keep]
    kept_classes = cand_classes[keep]
    overlap = pairwise_iou(Boxes(kept_boxes), candidates.pred_boxes)
    votes = (overlap >= vote_iou) & (kept_classes[:, None] == cand_classes[None, :])
    # A kept box always votes for itself: pairwise_iou gives a zero-area box (e.g. one clipped
    # to the image border) an IoU of 0 with itself.
    votes[torch.arange(len(keep), device=keep.device), keep] = True
    weights = votes.to(cand_scores.dtype) * cand_scores[None, :]
    total = weights.sum(dim=1, keepdim=True)
    # With no positive weight (every voter scored 0, possible only with a negative score
    # threshold), the box stays where NMS left it instead of becoming 0 / 0.
    voted = torch.where(
        total > 0,
        weights @ cand_boxes / total.clamp(min=torch.finfo(total.dtype).tiny),
        kept_boxes,
    )

    result = Instances(image_shape)
    result.pred_boxes = Boxes(voted)
    result.scores = cand_scores[keep]
    result.pred_classes = kept_classes
    return result
