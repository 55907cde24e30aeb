"""Test-time augmentation for ION: Detectron2's GeneralizedRCNNWithTTA, with box voting run once
over the candidates of every augmented pass, and with precomputed proposals."""

from typing import List, Optional, Tuple

import torch
from detectron2.data.transforms import ResizeTransform, Transform
from detectron2.layers import cat
from detectron2.modeling import GeneralizedRCNNWithTTA
from detectron2.structures import Boxes, Instances

from .box_voting import box_voting_single_image
from .meta_arch import IONRCNN

__all__ = ["IONRCNNWithTTA"]


class IONRCNNWithTTA(GeneralizedRCNNWithTTA):
    """
    :class:`GeneralizedRCNNWithTTA` (``cfg.TEST.AUG``: scales ``MIN_SIZES`` / ``MAX_SIZE`` and
    left-right ``FLIP``; section 4.4's post-competition COCO entry added "left-right flipping")
    for :class:`IONRCNN`.

    Without box voting it is exactly Detectron2's: each augmented pass's detections are mapped
    back to the input image, merged and put through per-class NMS again.

    With box voting (``MODEL.ION.BOX_VOTING.ENABLED``) NMS and the vote run once, over the union
    of every pass's candidates from both regression rounds (before NMS) mapped back to the input
    image: section 4.2 votes "over all boxes, including those suppressed", so a kept box is
    averaged over the boxes of all passes rather than over one pass's survivors.

    With precomputed proposals (``MODEL.LOAD_PROPOSALS``, e.g. selective search as the paper),
    which Detectron2's class refuses, each input's ``"proposals"`` (in the input image's
    coordinates, as the test loader's mapper leaves them) go through the same transforms as the
    image: resized with each scale and mirrored with the flip.
    """

    def __init__(self, cfg, model, tta_mapper=None, batch_size: int = 3):
        """
        Args:
            cfg, model, tta_mapper, batch_size: see :class:`GeneralizedRCNNWithTTA`.
        """
        load_proposals = cfg.MODEL.LOAD_PROPOSALS
        if load_proposals:
            # GeneralizedRCNNWithTTA asserts "TTA for pre-computed proposals is not supported
            # yet"; _get_augmented_inputs below supports them.
            cfg = cfg.clone()
            cfg.defrost()
            cfg.MODEL.LOAD_PROPOSALS = False
        super().__init__(cfg, model, tta_mapper=tta_mapper, batch_size=batch_size)
        if load_proposals:
            self.cfg.MODEL.LOAD_PROPOSALS = True
        self.box_voting = bool(getattr(self.model.roi_heads, "box_voting", False))
        if self.box_voting and not isinstance(self.model, IONRCNN):
            raise TypeError(
                "Test-time augmentation with box voting needs an IONRCNN model "
                f"(MODEL.META_ARCHITECTURE 'IONRCNN'); got {type(self.model).__name__}."
            )

    def _get_augmented_inputs(self, input):
        augmented_inputs, tfms = super()._get_augmented_inputs(input)
        if "proposals" in input:
            # Each tfm maps the original image (height x width) to its augmented image;
            # the proposals are in the input image's pixels, as is "image".
            h, w = input["image"].shape[1:3]
            height, width = input["height"], input["width"]
            to_original = ResizeTransform(h, w, height, width)
            for augmented, tfm in zip(augmented_inputs, tfms):
                size = tuple(augmented["image"].shape[1:3])
                augmented["proposals"] = _transform_proposals(
                    input["proposals"], [to_original, tfm], size
                )
        return augmented_inputs, tfms

    # _get_augmented_boxes and _merge_detections are the two steps GeneralizedRCNNWithTTA's
    # _inference_one_image runs (the same in detectron2 v0.6 and upstream main); with box voting
    # the first returns every pass's candidates and the second votes over them.
    def _get_augmented_boxes(self, augmented_inputs, tfms):
        if not self.box_voting:
            return super()._get_augmented_boxes(augmented_inputs, tfms)
        all_boxes, all_scores = [], []
        for start in range(0, len(augmented_inputs), self.batch_size):
            batch = augmented_inputs[start : start + self.batch_size]
            boxes, scores = self.model.box_voting_candidates(batch)
            all_boxes.extend(boxes)
            all_scores.extend(scores)
        # Candidates back to the input image: every class's box, as (N * K, 4) rows.
        original = []
        for boxes, tfm in zip(all_boxes, tfms):
            rows = tfm.inverse().apply_box(boxes.reshape(-1, 4).cpu().numpy())
            rows = torch.as_tensor(rows, dtype=boxes.dtype, device=boxes.device)
            original.append(rows.reshape(boxes.shape))
        return cat(original), cat(all_scores), None

    def _merge_detections(
        self, all_boxes, all_scores, all_classes: Optional[List], shape_hw
    ) -> Instances:
        if not self.box_voting:
            return super()._merge_detections(all_boxes, all_scores, all_classes, shape_hw)
        heads = self.model.roi_heads
        predictor = heads.box_predictor
        return box_voting_single_image(
            all_boxes,
            all_scores,
            shape_hw,
            score_thresh=predictor.test_score_thresh,
            nms_thresh=predictor.test_nms_thresh,
            topk_per_image=predictor.test_topk_per_image,
            vote_iou=heads.box_voting_iou,
        )


def _transform_proposals(
    proposals: Instances, tfms: List[Transform], image_size: Tuple[int, int]
) -> Instances:
    """
    Precomputed proposals moved with their image.

    Args:
        proposals (Instances): ``proposal_boxes`` (XYXY, in the untransformed image's pixels) and
            ``objectness_logits``.
        tfms (list[Transform]): what was applied to the image, in order (e.g. a resize, then a
            flip).
        image_size (tuple[int, int]): (h, w) of the transformed image.

    Returns:
        Instances: the same proposals, in the same order with the same logits, their boxes
        transformed and clipped to ``image_size``.
    """
    boxes = proposals.proposal_boxes.tensor
    moved = boxes.detach().cpu().numpy()
    for tfm in tfms:
        moved = tfm.apply_box(moved)
    moved = Boxes(torch.as_tensor(moved, dtype=boxes.dtype, device=boxes.device))
    moved.clip(image_size)
    out = Instances(image_size)
    out.proposal_boxes = moved
    out.objectness_logits = proposals.objectness_logits
    return out
