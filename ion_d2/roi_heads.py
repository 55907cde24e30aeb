"""ION's ROI heads: skip pooling from several layers plus the context features (section 3.1)."""

import logging
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads import build_box_head
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances

from .box_voting import box_voting_inference
from .skip_pooling import IONSkipPooler

__all__ = ["IONROIHeads"]

logger = logging.getLogger(__name__)


@ROI_HEADS_REGISTRY.register()
class IONROIHeads(StandardROIHeads):
    """
    :class:`StandardROIHeads` whose box pooler is :class:`IONSkipPooler`: every ROI is pooled
    from each feature in ``MODEL.ROI_HEADS.IN_FEATURES`` (any backbone features, plus
    "context" from an ION context module), L2-normalised, concatenated, re-scaled and reduced
    by a 1x1 conv to a 512x7x7 descriptor for fc6/fc7 (``MODEL.ROI_BOX_HEAD``) and
    :class:`FastRCNNOutputLayers`. Works with VGG16, ResNet-C4 or FPN features.

    At inference it can add two rounds of box regression and weighted box voting
    (``MODEL.ION.BOX_VOTING``, section 4.2).
    """

    @configurable
    def __init__(self, *, box_voting: bool = False, box_voting_iou: float = 0.5, **kwargs):
        """
        Args:
            box_voting (bool): at inference, score the regressed boxes a second time and vote
                after NMS (section 4.2).
            box_voting_iou (float): IoU from which a box votes on a kept box.
            kwargs: see :class:`StandardROIHeads`.
        """
        super().__init__(**kwargs)
        self.box_voting = box_voting
        self.box_voting_iou = box_voting_iou

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["box_voting"] = cfg.MODEL.ION.BOX_VOTING.ENABLED
        ret["box_voting_iou"] = cfg.MODEL.ION.BOX_VOTING.IOU_THRESH
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.ROI_HEADS.IN_FEATURES names {missing}, which the model does not produce; "
                f'available features: {sorted(input_shape)} ("context" needs '
                "MODEL.META_ARCHITECTURE 'IONRCNN' with MODEL.ION.CONTEXT.NAME set)."
            )
        resolution = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        skip = cfg.MODEL.ION.SKIP_POOL
        box_pooler = IONSkipPooler(
            input_shapes=[input_shape[f] for f in in_features],
            output_size=resolution,
            sampling_ratio=cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            pooler_type=cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
            norm=skip.NORM,
            scale=skip.SCALE,
            scale_init=skip.SCALE_INIT,
            out_channels=skip.REDUCE_DIM,
            dropout=skip.CONCAT_DROPOUT,
            feature_names=in_features,
        )
        box_head = build_box_head(
            cfg,
            ShapeSpec(channels=box_pooler.out_channels, height=resolution, width=resolution),
        )
        box_predictor = FastRCNNOutputLayers(cfg, box_head.output_shape)
        return {
            "box_in_features": in_features,
            "box_pooler": box_pooler,
            "box_head": box_head,
            "box_predictor": box_predictor,
        }

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """
        See :meth:`StandardROIHeads._forward_box`. With box voting enabled, inference uses
        :meth:`_forward_box_voting` instead.
        """
        if self.training or not self.box_voting:
            return super()._forward_box(features, proposals)
        return self._forward_box_voting(features, proposals)

    def _predict(self, features: List[torch.Tensor], boxes: List[Boxes]):
        return self.box_predictor(self.box_head(self.box_pooler(features, boxes)))

    def _forward_box_voting(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        """
        Section 4.2: score the proposals, regress them, score the regressed boxes (each
        proposal's box for its top-scoring class) again, then run per-class NMS over both rounds
        and replace each kept box by the score-weighted mean of the boxes overlapping it.
        """
        features = [features[f] for f in self.box_in_features]
        predictor = self.box_predictor
        first = self._predict(features, [p.proposal_boxes for p in proposals])
        boxes1 = predictor.predict_boxes(first, proposals)
        scores1 = predictor.predict_probs(first, proposals)

        regressed = []
        for boxes, scores, p in zip(boxes1, scores1, proposals):
            boxes = boxes.view(len(boxes), boxes.shape[1] // 4, 4)
            top_class = scores[:, :-1].argmax(dim=1) if boxes.shape[1] > 1 else 0
            chosen = Boxes(boxes[torch.arange(len(boxes), device=boxes.device), top_class])
            chosen.clip(p.image_size)
            regressed.append(Instances(p.image_size, proposal_boxes=chosen))
        second = self._predict(features, [r.proposal_boxes for r in regressed])
        boxes2 = predictor.predict_boxes(second, regressed)
        scores2 = predictor.predict_probs(second, regressed)

        return box_voting_inference(
            [cat([b1, b2]) for b1, b2 in zip(boxes1, boxes2)],
            [cat([s1, s2]) for s1, s2 in zip(scores1, scores2)],
            [p.image_size for p in proposals],
            score_thresh=predictor.test_score_thresh,
            nms_thresh=predictor.test_nms_thresh,
            topk_per_image=predictor.test_topk_per_image,
            vote_iou=self.box_voting_iou,
        )
