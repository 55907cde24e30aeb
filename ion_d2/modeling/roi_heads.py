"""ION's ROI heads: skip pooling from several layers plus the context features (section 3.1)."""

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads import build_box_head
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from torch import nn

from .box_voting import box_voting_inference
from .enlarged_boxes import enlarged_feature_name
from .local_context import build_ion_local_context, local_context_loss, matched_objects
from .skip_pooling import IONSkipPooler

__all__ = ["IONROIHeads", "RESCORE_MODES", "build_ion_skip_pooler", "skip_pool_inputs"]


# Which regressed boxes the second round of box voting scores (MODEL.ION.BOX_VOTING.RESCORE).
RESCORE_MODES = ("top_class", "per_class")


def skip_pool_inputs(cfg) -> Tuple[List[str], List[float]]:
    """
    The features the skip pooler reads, in order: ``MODEL.ROI_HEADS.IN_FEATURES`` over the
    boxes, then ``MODEL.ION.SKIP_POOL.ENLARGED.IN_FEATURES`` over the boxes enlarged
    ``ENLARGED.FACTOR`` times (context just outside the box); and each one's box factor.
    """
    in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    enlarged = cfg.MODEL.ION.SKIP_POOL.ENLARGED
    extra = list(enlarged.IN_FEATURES)
    if extra and not enlarged.FACTOR > 1.0:
        raise ValueError(
            f"MODEL.ION.SKIP_POOL.ENLARGED.FACTOR={enlarged.FACTOR} must be > 1 when "
            f"ENLARGED.IN_FEATURES is set ({extra}): the boxes are enlarged that many times "
            "around their centres (3: one box side on every side)."
        )
    return in_features + extra, [1.0] * len(in_features) + [float(enlarged.FACTOR)] * len(extra)


def build_ion_skip_pooler(
    cfg, input_shape: Dict[str, ShapeSpec], out_channels: int = None
) -> IONSkipPooler:
    """
    The :class:`IONSkipPooler` of ``MODEL.ION.SKIP_POOL`` and ``MODEL.ROI_BOX_HEAD``'s pooler
    keys over :func:`skip_pool_inputs`; ``out_channels`` (default ``SKIP_POOL.REDUCE_DIM``) for
    heads whose input width is fixed (res5 in :class:`IONRes5ROIHeads`).
    """
    features, factors = skip_pool_inputs(cfg)
    missing = [f for f in features if f not in input_shape]
    if missing:
        raise ValueError(
            f"MODEL.ROI_HEADS.IN_FEATURES or MODEL.ION.SKIP_POOL.ENLARGED.IN_FEATURES name "
            f"{missing}, which the model does not produce; available features: "
            f"{sorted(input_shape)} (\"context\" needs MODEL.META_ARCHITECTURE 'IONRCNN' with "
            "MODEL.ION.CONTEXT.NAME set)."
        )
    skip = cfg.MODEL.ION.SKIP_POOL
    return IONSkipPooler(
        input_shapes=[input_shape[f] for f in features],
        output_size=cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION,
        sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
        pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
        norm=skip.NORM,
        scale=skip.SCALE,
        scale_init=skip.SCALE_INIT,
        out_channels=skip.REDUCE_DIM if out_channels is None else out_channels,
        dropout=skip.CONCAT_DROPOUT,
        feature_names=[
            f if k == 1.0 else enlarged_feature_name(f, k) for f, k in zip(features, factors)
        ],
        scale_reference=cfg.MODEL.ION.CONTEXT.IN_FEATURE,
        box_factors=factors,
    )


@ROI_HEADS_REGISTRY.register()
class IONROIHeads(StandardROIHeads):
    """
    :class:`StandardROIHeads` whose box pooler is :class:`IONSkipPooler`: every ROI is pooled
    from each feature in ``MODEL.ROI_HEADS.IN_FEATURES`` (any backbone features, plus
    "context" from an ION context module), L2-normalised, concatenated, re-scaled and reduced
    by a 1x1 conv to a 512x7x7 descriptor for fc6/fc7 (``MODEL.ROI_BOX_HEAD``) and
    :class:`FastRCNNOutputLayers`. Works with VGG16, ResNet-C4 or FPN features.

    At inference it can add two rounds of box regression and weighted box voting
    (``MODEL.ION.BOX_VOTING``, section 4.2). With ``MODEL.ION.LOCAL_CONTEXT`` (beyond the
    paper), the scores of :class:`IONLocalContextHead` on a fine feature are added to the class
    scores.
    """

    @configurable
    def __init__(
        self,
        *,
        box_voting: bool = False,
        box_voting_iou: float = 0.5,
        box_voting_rescore: str = "top_class",
        box_voting_rescore_topk: int = 0,
        box_voting_rescore_min_score: float = 0.0,
        local_context: Optional[nn.Module] = None,
        local_context_in_feature: str = "",
        local_context_loss_weight: float = 0.0,
        **kwargs,
    ):
        """
        Args:
            box_voting (bool): at inference, score the regressed boxes a second time and vote
                after NMS (section 4.2).
            box_voting_iou (float): IoU in [0, 1] from which a box votes on a kept box.
            box_voting_rescore (str): which regressed boxes the second round scores, one of
                :data:`RESCORE_MODES` (see :meth:`box_voting_candidates`).
            box_voting_rescore_topk (int): the second round scores only the k proposals per
                image with the highest first-round class score; 0: all of them (the paper).
            box_voting_rescore_min_score (float): the second round scores only the proposals
                whose best first-round class score is at least this; 0: all of them (the
                paper). With ``box_voting_rescore_topk``, the top k of those.
            local_context (nn.Module or None): called as ``local_context(feature, boxes,
                image_sizes)`` on ``local_context_in_feature``, it returns scores added to the
                class scores (:class:`IONLocalContextHead`); None: nothing added (the paper).
            local_context_in_feature (str): the feature ``local_context`` reads.
            local_context_loss_weight (float): weight of ``local_context``'s own loss in
                training, :func:`local_context_loss` of its scores alone (>= 0; 0: none).
            kwargs: see :class:`StandardROIHeads`.
        """
        super().__init__(**kwargs)
        if box_voting_rescore not in RESCORE_MODES:
            raise ValueError(
                f"MODEL.ION.BOX_VOTING.RESCORE={box_voting_rescore!r} is not supported; expected "
                f"one of {RESCORE_MODES}."
            )
        if not 0.0 <= box_voting_iou <= 1.0:
            raise ValueError(
                f"MODEL.ION.BOX_VOTING.IOU_THRESH={box_voting_iou} is not an IoU; expected a "
                "value in [0, 1] (section 4.2: 0.5; 0.85 for COCO, section 4.4)."
            )
        if (
            isinstance(box_voting_rescore_topk, bool)
            or not isinstance(box_voting_rescore_topk, int)
            or box_voting_rescore_topk < 0
        ):
            raise ValueError(
                f"MODEL.ION.BOX_VOTING.RESCORE_TOPK={box_voting_rescore_topk!r} is invalid; "
                "expected an int >= 0 (0: the second round scores every proposal, the paper)."
            )
        if box_voting_rescore_topk and not box_voting:
            raise ValueError(
                f"MODEL.ION.BOX_VOTING.RESCORE_TOPK={box_voting_rescore_topk} only acts with box "
                "voting's second round; set MODEL.ION.BOX_VOTING.ENABLED True, or RESCORE_TOPK 0."
            )
        if not 0.0 <= box_voting_rescore_min_score <= 1.0:
            raise ValueError(
                f"MODEL.ION.BOX_VOTING.RESCORE_MIN_SCORE={box_voting_rescore_min_score!r} is not "
                "a class score; expected a value in [0, 1] (0: the second round scores every "
                "proposal, the paper)."
            )
        if box_voting_rescore_min_score and not box_voting:
            raise ValueError(
                f"MODEL.ION.BOX_VOTING.RESCORE_MIN_SCORE={box_voting_rescore_min_score} only acts "
                "with box voting's second round; set MODEL.ION.BOX_VOTING.ENABLED True, or "
                "RESCORE_MIN_SCORE 0."
            )
        self.box_voting = box_voting
        self.box_voting_rescore_topk = box_voting_rescore_topk
        self.box_voting_rescore_min_score = float(box_voting_rescore_min_score)
        self.box_voting_iou = box_voting_iou
        self.box_voting_rescore = box_voting_rescore
        if local_context is not None and not local_context_in_feature:
            raise ValueError("local_context needs local_context_in_feature, the feature it reads.")
        self.local_context = local_context
        self.local_context_in_feature = local_context_in_feature
        if not local_context_loss_weight >= 0.0:
            raise ValueError(
                f"MODEL.ION.LOCAL_CONTEXT.LOSS_WEIGHT={local_context_loss_weight} must be >= 0."
            )
        self.local_context_loss_weight = float(local_context_loss_weight)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        voting = cfg.MODEL.ION.BOX_VOTING
        ret["box_voting"] = voting.ENABLED
        ret["box_voting_iou"] = voting.IOU_THRESH
        ret["box_voting_rescore"] = voting.RESCORE
        ret["box_voting_rescore_topk"] = voting.RESCORE_TOPK
        ret["box_voting_rescore_min_score"] = voting.RESCORE_MIN_SCORE
        local_context = build_ion_local_context(cfg, input_shape)
        if local_context is not None:
            ret["local_context"] = local_context
            ret["local_context_in_feature"] = cfg.MODEL.ION.LOCAL_CONTEXT.IN_FEATURE
            ret["local_context_loss_weight"] = cfg.MODEL.ION.LOCAL_CONTEXT.LOSS_WEIGHT
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        box_pooler = build_ion_skip_pooler(cfg, input_shape)
        box_head = build_box_head(
            cfg,
            ShapeSpec(channels=box_pooler.out_channels, height=resolution, width=resolution),
        )
        box_predictor = FastRCNNOutputLayers(cfg, box_head.output_shape)
        return {
            "box_in_features": skip_pool_inputs(cfg)[0],
            "box_pooler": box_pooler,
            "box_head": box_head,
            "box_predictor": box_predictor,
        }

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """
        See :meth:`StandardROIHeads._forward_box`. With box voting enabled, inference scores
        the candidates of :meth:`box_voting_candidates` and votes after NMS
        (:func:`box_voting_inference`).
        """
        if self.training or not self.box_voting:
            return self._forward_box_standard(features, proposals)
        boxes, scores = self.box_voting_candidates(features, proposals)
        predictor = self.box_predictor
        return box_voting_inference(
            boxes,
            scores,
            [p.image_size for p in proposals],
            score_thresh=predictor.test_score_thresh,
            nms_thresh=predictor.test_nms_thresh,
            topk_per_image=predictor.test_topk_per_image,
            vote_iou=self.box_voting_iou,
        )

    def _forward_box_standard(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """:meth:`StandardROIHeads._forward_box` with each image's size given to the pooler."""
        predictions, local_scores = self._box_predictions(
            self._box_head_inputs(features), proposals
        )
        if not self.training:
            return self.box_predictor.inference(predictions, proposals)[0]
        losses = self.box_predictor.losses(predictions, proposals)
        if local_scores is not None and self.local_context_loss_weight > 0:
            losses["loss_local_context"] = self.local_context_loss_weight * local_context_loss(
                local_scores, cat([p.gt_classes for p in proposals]), matched_objects(proposals)
            )
        # proposals is modified in place below, so the losses are computed first.
        if self.train_on_pred_boxes:
            with torch.no_grad():
                pred_boxes = self.box_predictor.predict_boxes_for_gt_classes(predictions, proposals)
                for proposals_per_image, pred_boxes_per_image in zip(proposals, pred_boxes):
                    proposals_per_image.proposal_boxes = Boxes(pred_boxes_per_image)
        return losses

    def box_voting_candidates(
        self, features: Dict[str, torch.Tensor], proposals: List[Instances]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        Section 4.2's two rounds of box regression, before NMS: the proposals are scored and
        regressed (round 1), the regressed boxes are clipped to the image and scored and
        regressed again (round 2). Round 2 takes every proposal, or only those whose best
        round-1 class score (background excluded) is at least ``box_voting_rescore_min_score``
        and, with ``box_voting_rescore_topk`` k > 0, of those the k per image where it is
        highest. Which of their regressed boxes it scores is ``box_voting_rescore``:

        * "top_class": each proposal's box for its top-scoring class, with that pass's scores
          and regressions for every class (R boxes per image).
        * "per_class": for every proposal and class c, the box regressed for c, keeping only its
          score and regression for c, as MR-CNN's iterative localisation (R x K boxes, pooled
          one class at a time; the same as "top_class" with class-agnostic regression).

        Args:
            features (dict[str, Tensor]): input data as in :meth:`StandardROIHeads.forward`.
            proposals (list[Instances]): per image, the R proposals in "proposal_boxes".

        Returns:
            tuple[list[Tensor], list[Tensor]]: per image, the boxes (R + R2, K * 4) or
            (R + R2, 4) and softmax scores (R + R2, K + 1) of round 1 (first R rows) and round 2
            (R2 = R, or fewer, see above), in the input
            image's coordinates. In "per_class" mode round 2's background column is 0 (each of
            its scores comes from a different box).
        """
        features = self._box_head_inputs(features)
        predictor = self.box_predictor
        predictions = self._run_box_head(features, proposals)
        boxes1 = predictor.predict_boxes(predictions, proposals)
        scores1 = predictor.predict_probs(predictions, proposals)
        image_sizes = [p.image_size for p in proposals]
        num_reg_classes = boxes1[0].shape[1] // 4
        rescored = self._rescored(scores1)
        boxes_in = [b[i] for b, i in zip(boxes1, rescored)]
        if self.box_voting_rescore == "per_class" and num_reg_classes > 1:
            boxes2, scores2 = self._rescore_per_class(features, boxes_in, image_sizes)
        else:
            scores_in = [s[i] for s, i in zip(scores1, rescored)]
            boxes2, scores2 = self._rescore_top_class(features, boxes_in, scores_in, image_sizes)
        return (
            [cat([b1, b2]) for b1, b2 in zip(boxes1, boxes2)],
            [cat([s1, s2]) for s1, s2 in zip(scores1, scores2)],
        )

    def _rescored(self, scores1: List[torch.Tensor]) -> List[torch.Tensor]:
        """
        Per image, the indices of the proposals round 2 scores, in proposal order (so that
        round 2's rows keep round 1's relative order): all, those whose best class score is at
        least the minimum, and the top k of those.
        """
        k = self.box_voting_rescore_topk
        picked = []
        for scores in scores1:
            best = scores[:, :-1].max(dim=1).values
            index = torch.arange(len(scores), device=scores.device)
            if self.box_voting_rescore_min_score > 0:
                index = index[best >= self.box_voting_rescore_min_score]
            if 0 < k < len(index):
                index = index[best[index].topk(k).indices].sort().values
            picked.append(index)
        return picked

    def _box_head_inputs(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """The features :meth:`_run_box_head` takes: the pooled ones, then the local-context one."""
        names = list(self.box_in_features)
        if self.local_context is not None:
            names.append(self.local_context_in_feature)
        return [features[f] for f in names]

    def _run_box_head(self, features: List[torch.Tensor], proposals: List[Instances]):
        """
        The box branch of :meth:`StandardROIHeads._forward_box`, up to the predictions; the
        pooler reads only each image's valid cells (:meth:`IONSkipPooler.forward`). ``features``
        are :meth:`_box_head_inputs`: with a local-context branch, its scores (on the last
        feature) are added to the class scores.
        """
        return self._box_predictions(features, proposals)[0]

    def _box_predictions(self, features: List[torch.Tensor], proposals: List[Instances]):
        """:meth:`_run_box_head`'s predictions and the local-context branch's scores (or None)."""
        boxes = [p.proposal_boxes for p in proposals]
        image_sizes = [p.image_size for p in proposals]
        num_pooled = len(self.box_in_features)
        box_features = self.box_pooler(features[:num_pooled], boxes, image_sizes=image_sizes)
        scores, deltas = self.box_predictor(self.box_head(box_features))
        if self.local_context is None:
            return (scores, deltas), None
        local_scores = self.local_context(features[num_pooled], boxes, image_sizes)
        return (scores + local_scores, deltas), local_scores

    @staticmethod
    def _create_proposals_from_boxes(
        boxes: List[torch.Tensor], image_sizes: List[Tuple[int, int]]
    ) -> List[Instances]:
        """
        :meth:`CascadeROIHeads._create_proposals_from_boxes` at inference: per image, the
        (R, 4) boxes clipped to the image as "proposal_boxes", none dropped (round 2's rows
        line up with round 1's).
        """
        proposals = []
        for boxes_per_image, image_size in zip(boxes, image_sizes):
            # A copy: Boxes.clip works in place, and round 1's boxes are returned unclipped.
            boxes_per_image = Boxes(boxes_per_image.detach().clone())
            boxes_per_image.clip(image_size)
            proposals.append(Instances(image_size, proposal_boxes=boxes_per_image))
        return proposals

    def _score_and_regress(self, features, boxes: List[torch.Tensor], image_sizes):
        """Round 2 on the given (R, 4) boxes per image: their regressed boxes and scores."""
        proposals = self._create_proposals_from_boxes(boxes, image_sizes)
        predictions = self._run_box_head(features, proposals)
        boxes2 = self.box_predictor.predict_boxes(predictions, proposals)
        return boxes2, self.box_predictor.predict_probs(predictions, proposals)

    def _rescore_top_class(self, features, boxes1, scores1, image_sizes):
        top_class_boxes = []
        for boxes, scores in zip(boxes1, scores1):
            boxes = boxes.view(len(boxes), boxes.shape[1] // 4, 4)
            top_class = scores[:, :-1].argmax(dim=1) if boxes.shape[1] > 1 else 0
            top_class_boxes.append(boxes[torch.arange(len(boxes), device=boxes.device), top_class])
        return self._score_and_regress(features, top_class_boxes, image_sizes)

    def _rescore_per_class(self, features, boxes1, image_sizes):
        num_classes = boxes1[0].shape[1] // 4
        boxes2 = [torch.zeros_like(b) for b in boxes1]
        scores2 = [b.new_zeros(len(b), num_classes + 1) for b in boxes1]
        # One class at a time keeps the peak memory of a single round.
        for c in range(num_classes):
            cols = slice(4 * c, 4 * c + 4)
            class_boxes = [b[:, cols] for b in boxes1]
            new_boxes, new_scores = self._score_and_regress(features, class_boxes, image_sizes)
            for b2, s2, nb, ns in zip(boxes2, scores2, new_boxes, new_scores):
                b2[:, cols] = nb[:, cols]
                s2[:, c] = ns[:, c]
        return boxes2, scores2
