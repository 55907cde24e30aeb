"""IONRCNN: Generalized R-CNN with ION's context features and segmentation regularizer."""

import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    GeneralizedRCNN,
    build_backbone,
    build_proposal_generator,
    build_roi_heads,
    build_sem_seg_head,
)
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from .context import build_ion_context

__all__ = ["IONRCNN"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class IONRCNN(GeneralizedRCNN):
    """
    Figure 1's data flow: backbone; a context module (``MODEL.ION.CONTEXT``) that adds the
    feature "context" (e.g. the 2x stacked 4-direction IRNN on conv5); the proposal generator
    (RPN, or precomputed proposals as in the paper); ROI heads that may pool "context"
    (:class:`IONROIHeads`); and, in training only, a semantic segmentation loss on the context
    features (``MODEL.ION.SEG_LOSS_ON``, section 3.2, Table 6). With no context module and no
    segmentation loss it is exactly :class:`GeneralizedRCNN`.
    """

    @configurable
    def __init__(
        self,
        *,
        context: Optional[nn.Module] = None,
        sem_seg_head: Optional[nn.Module] = None,
        sem_seg_ignore_value: int = 255,
        **kwargs,
    ):
        """
        Args:
            context (nn.Module or None): maps the backbone's feature dict to extra features
                (see ``ION_CONTEXT_REGISTRY``), merged into the features every head sees.
            sem_seg_head (nn.Module or None): the training-only segmentation regularizer,
                following ``SEM_SEG_HEADS_REGISTRY``'s contract; never run at inference.
            sem_seg_ignore_value (int): label of unlabelled pixels, also used for images that
                have no "sem_seg" (they add no loss).
            kwargs: see :class:`GeneralizedRCNN`.
        """
        super().__init__(**kwargs)
        self.context = context
        self.sem_seg_head = sem_seg_head
        self.sem_seg_ignore_value = sem_seg_ignore_value

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        feature_shapes = dict(backbone.output_shape())
        context = build_ion_context(cfg, feature_shapes)
        if context is not None:
            feature_shapes.update(context.output_shape())
        sem_seg_head = (
            build_sem_seg_head(cfg, feature_shapes) if cfg.MODEL.ION.SEG_LOSS_ON else None
        )
        return {
            "backbone": backbone,
            "context": context,
            "proposal_generator": build_proposal_generator(cfg, feature_shapes),
            "roi_heads": build_roi_heads(cfg, feature_shapes),
            "sem_seg_head": sem_seg_head,
            "sem_seg_ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "input_format": cfg.INPUT.FORMAT,
            "vis_period": cfg.VIS_PERIOD,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def extract_features(self, images: ImageList) -> Dict[str, torch.Tensor]:
        """
        Returns:
            dict[str, Tensor]: the backbone's features plus the context module's.
        """
        features = self.backbone(images.tensor)
        if self.context is not None:
            features.update(self.context(features))
        return features

    def _proposals(self, batched_inputs, images, features, gt_instances):
        if self.proposal_generator is not None:
            return self.proposal_generator(images, features, gt_instances)
        if "proposals" not in batched_inputs[0]:
            raise ValueError(
                "The model has no proposal generator (MODEL.PROPOSAL_GENERATOR.NAME), so each "
                "input needs precomputed 'proposals' (DATASETS.PROPOSAL_FILES_TRAIN/TEST with "
                "MODEL.LOAD_PROPOSALS True)."
            )
        return [x["proposals"].to(self.device) for x in batched_inputs], {}

    def _sem_seg_targets(self, batched_inputs, images: ImageList) -> torch.Tensor:
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            if "sem_seg" in x:
                targets.append(x["sem_seg"].to(self.device))
            else:
                targets.append(
                    torch.full(
                        (h, w), self.sem_seg_ignore_value, dtype=torch.long, device=self.device
                    )
                )
        return ImageList.from_tensors(
            targets, self.backbone.size_divisibility, pad_value=self.sem_seg_ignore_value
        ).tensor

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """
        See :meth:`GeneralizedRCNN.forward`. Inputs may also hold "sem_seg" (an (H, W) long
        tensor, as :class:`DatasetMapper` loads from ``sem_seg_file_name``); training then adds
        "loss_sem_seg".
        """
        if not self.training:
            return self.inference(batched_inputs)

        images = self.preprocess_image(batched_inputs)
        if "instances" in batched_inputs[0]:
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        else:
            gt_instances = None
        features = self.extract_features(images)
        proposals, proposal_losses = self._proposals(batched_inputs, images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        if self.vis_period > 0:
            storage = get_event_storage()
            if storage.iter % self.vis_period == 0:
                self.visualize_training(batched_inputs, proposals)

        losses = {}
        losses.update(detector_losses)
        losses.update(proposal_losses)
        if self.sem_seg_head is not None:
            targets = self._sem_seg_targets(batched_inputs, images)
            _, seg_losses = self.sem_seg_head(features, targets)
            losses.update(seg_losses)
        return losses

    def box_voting_candidates(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """
        Inference up to box voting, for test-time augmentation (:class:`IONRCNNWithTTA`): the
        candidates of :meth:`IONROIHeads.box_voting_candidates` for each input, before NMS, in
        the coordinates of the input image tensor (not rescaled to "height" x "width").

        Returns:
            tuple[list[Tensor], list[Tensor]]: per image, boxes (N, K * 4) and scores (N, K + 1).
        """
        assert not self.training
        if not hasattr(self.roi_heads, "box_voting_candidates"):
            raise TypeError(
                f"Box voting needs MODEL.ROI_HEADS.NAME 'IONROIHeads'; this model has "
                f"{type(self.roi_heads).__name__}."
            )
        images = self.preprocess_image(batched_inputs)
        features = self.extract_features(images)
        proposals, _ = self._proposals(batched_inputs, images, features, None)
        return self.roi_heads.box_voting_candidates(features, proposals)

    def inference(
        self,
        batched_inputs: List[Dict[str, torch.Tensor]],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
    ):
        """
        See :meth:`GeneralizedRCNN.inference`. The segmentation regularizer is not run.
        """
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        features = self.extract_features(images)
        if detected_instances is None:
            proposals, _ = self._proposals(batched_inputs, images, features, None)
            results, _ = self.roi_heads(images, features, proposals, None)
        else:
            detected_instances = [x.to(self.device) for x in detected_instances]
            results = self.roi_heads.forward_with_given_boxes(features, detected_instances)
        if not do_postprocess:
            return results
        processed = []
        for result, inputs, image_size in zip(results, batched_inputs, images.image_sizes):
            height = inputs.get("height", image_size[0])
            width = inputs.get("width", image_size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed
