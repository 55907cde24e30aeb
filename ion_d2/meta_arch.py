"""
IONRCNN: Generalized R-CNN with ION's context features and segmentation regularizer.

The context module is a sibling of the backbone, not a :class:`Backbone` wrapper around it (as
:class:`FPN` wraps ``bottom_up``). The wrapper would let :class:`GeneralizedRCNN`'s
``from_config``, ``forward`` and ``inference`` run unchanged, but ``Backbone.forward`` receives
only the padded batch tensor, and ION's features must not depend on the batch: the backbone runs
once per padded size and the context module stops at each image's border, both from
``ImageList.image_sizes``. A wrapper would also move the context's weights under ``backbone.``
and break every checkpoint written so far. So :class:`IONRCNN` replaces the one line of
``forward`` and ``inference`` that runs the backbone (:meth:`IONRCNN.extract_features`), and
builds the heads on the backbone's and the context's shapes together in ``from_config``
(:meth:`GeneralizedRCNN.from_config` builds them on the backbone's alone, which fails for heads
that pool "context"). The rest (preprocessing, visualization, ``_postprocess``) is
:class:`GeneralizedRCNN`'s.
"""

import inspect
import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    GeneralizedRCNN,
    build_backbone,
    build_proposal_generator,
    build_roi_heads,
    build_sem_seg_head,
)
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from .context import build_ion_context
from .model_checks import check_context_outputs_used, check_pixel_std

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
    segmentation loss it is exactly :class:`GeneralizedRCNN` (up to the per-size backbone passes
    of ``MODEL.ION.BACKBONE_PER_IMAGE`` when the batch mixes sizes).

    An image's features do not depend on the rest of its batch, as in the paper's single-image
    passes: the backbone runs once per padded size (``backbone_per_image``) and the context
    module and seg head see each image's size (``ImageList.image_sizes``), ignoring the padding.
    """

    @configurable
    def __init__(
        self,
        *,
        context: Optional[nn.Module] = None,
        sem_seg_head: Optional[nn.Module] = None,
        sem_seg_ignore_value: Optional[int] = None,
        backbone_per_image: bool = True,
        backbone_per_image_train: bool = True,
        unresized_test_max_size: Optional[int] = None,
        **kwargs,
    ):
        """
        Args:
            context (nn.Module or None): maps the backbone's feature dict to extra features
                (see ``ION_CONTEXT_REGISTRY``), merged into the features every head sees.
            sem_seg_head (nn.Module or None): the training-only segmentation regularizer,
                following ``SEM_SEG_HEADS_REGISTRY``'s contract; never run at inference. Its
                ``ignore_value`` labels the pixels of images that have no "sem_seg".
            sem_seg_ignore_value (int or None): kept for callers of 0.1.0; when given it must
                equal ``sem_seg_head.ignore_value``.
            backbone_per_image (bool): at inference, run the backbone once per group of images
                that pad to the same size alone, and zero-pad the features to the batch's size
                (see :meth:`backbone_features`); False: one pass over the padded batch.
            backbone_per_image_train (bool): the same in training. False: one pass over the
                padded batch, so BatchNorm's training statistics come from the whole batch.
            unresized_test_max_size (int or None): for a config whose test images keep their
                own size (``INPUT.MIN_SIZE_TEST`` 0), its ``INPUT.MAX_SIZE_TEST``: an input
                larger than it reached :meth:`forward` uncapped (Detectron2's stock
                ``DefaultPredictor`` does not resize for 0; ion_d2's test loader and
                ``IONPredictor`` cap it), which is logged once as a warning. Nothing changes.
            kwargs: see :class:`GeneralizedRCNN`.
        """
        super().__init__(**kwargs)
        self.context = context
        self.sem_seg_head = sem_seg_head
        self.backbone_per_image = backbone_per_image
        self.backbone_per_image_train = backbone_per_image_train
        self.unresized_test_max_size = unresized_test_max_size
        self._warned_uncapped = False
        if sem_seg_head is not None and sem_seg_ignore_value not in (
            None,
            sem_seg_head.ignore_value,
        ):
            raise ValueError(
                f"IONRCNN sem_seg_ignore_value={sem_seg_ignore_value} differs from the seg "
                f"head's ignore_value {sem_seg_head.ignore_value}; leave it out (the head's is "
                "used)."
            )
        self._seg_head_takes_image_sizes = sem_seg_head is not None and (
            "image_sizes" in inspect.signature(sem_seg_head.forward).parameters
        )
        if sem_seg_head is not None and not self._seg_head_takes_image_sizes:
            logger.warning(
                f"{type(sem_seg_head).__name__}.forward takes no image_sizes: its loss near an "
                "image's border may depend on the batch's padding."
            )

    @classmethod
    def from_config(cls, cfg):
        check_pixel_std(cfg)
        backbone = build_backbone(cfg)
        feature_shapes = dict(backbone.output_shape())
        context = build_ion_context(cfg, feature_shapes)
        check_context_outputs_used(cfg, context)
        if context is not None:
            feature_shapes.update(context.output_shape())
        _warn_per_image_batch_norm(cfg, backbone)
        sem_seg_head = (
            build_sem_seg_head(cfg, feature_shapes) if cfg.MODEL.ION.SEG_LOSS_ON else None
        )
        return {
            "backbone": backbone,
            "context": context,
            "proposal_generator": build_proposal_generator(cfg, feature_shapes),
            "roi_heads": build_roi_heads(cfg, feature_shapes),
            "sem_seg_head": sem_seg_head,
            "backbone_per_image": cfg.MODEL.ION.BACKBONE_PER_IMAGE,
            "backbone_per_image_train": cfg.MODEL.ION.BACKBONE_PER_IMAGE_TRAIN,
            "unresized_test_max_size": (
                cfg.INPUT.MAX_SIZE_TEST if cfg.INPUT.MIN_SIZE_TEST == 0 else None
            ),
            "input_format": cfg.INPUT.FORMAT,
            "vis_period": cfg.VIS_PERIOD,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    def extract_features(self, images: ImageList) -> Dict[str, torch.Tensor]:
        """
        What ``self.backbone(images.tensor)`` is to :class:`GeneralizedRCNN`.

        Returns:
            dict[str, Tensor]: the backbone's features plus the context module's.
        """
        features = self.backbone_features(images)
        if self.context is not None:
            features.update(self.context(features, images.image_sizes))
        return features

    def backbone_features(self, images: ImageList) -> Dict[str, torch.Tensor]:
        """
        The backbone's features of the padded batch. With ``backbone_per_image`` (in training:
        ``backbone_per_image_train``), each group of
        images that pad to the same size alone runs in its own pass, on the crop of
        ``images.tensor`` to that size (what ``ImageList.from_tensors`` of the group gives, as
        the batch is padded with 0), and every feature map is zero-padded to the batch's size:
        an image's features are then those it gets alone, and beyond them lie the zeros that
        a consumer's zero padding would show it alone.

        Args:
            images (ImageList): the normalised, padded batch (:meth:`preprocess_image`).

        Returns:
            dict[str, Tensor]: the backbone's features, of the sizes a single batched pass gives.
        """
        per_size = self.backbone_per_image_train if self.training else self.backbone_per_image
        groups = self._size_groups(images) if per_size else {}
        if len(groups) <= 1:
            return self.backbone(images.tensor)
        per_image: List[Dict[str, torch.Tensor]] = [{} for _ in images.image_sizes]
        for (height, width), indices in groups.items():
            group_features = self.backbone(images.tensor[indices, :, :height, :width])
            for name, feature in group_features.items():
                for k, i in enumerate(indices):
                    per_image[i][name] = feature[k]
        return {name: _zero_pad_and_stack([f[name] for f in per_image]) for name in per_image[0]}

    def _size_groups(self, images: ImageList) -> Dict[Tuple[int, int], List[int]]:
        """
        The batch's images grouped by the size each pads to alone (:meth:`_padded_size`);
        empty for a batch of one (a traced model must not turn its size into ints).
        """
        if len(images.image_sizes) == 1:
            return {}
        groups: Dict[Tuple[int, int], List[int]] = {}
        for i, image_size in enumerate(images.image_sizes):
            groups.setdefault(self._padded_size(image_size), []).append(i)
        return groups

    def _padded_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """The size :meth:`preprocess_image` pads an image to when it is alone in its batch."""
        # Detectron2 after v0.6 also pads to the backbone's padding_constraints.
        constraints = getattr(self.backbone, "padding_constraints", None) or {}
        square_size = constraints.get("square_size", 0)
        if square_size > 0:
            return square_size, square_size
        divisor = constraints.get("size_divisibility", self.backbone.size_divisibility)
        height, width = (int(x) for x in image_size)
        if divisor > 1:
            height, width = (-(-x // divisor) * divisor for x in (height, width))
        return height, width

    def _proposals(self, batched_inputs, images, features, gt_instances):
        """
        :class:`GeneralizedRCNN`'s proposal step, with an error naming the missing input, run
        once per group of images that pad to the same size alone (:meth:`_size_groups`), on
        the crop of the images and features to that size. An image's proposals are then those
        of its own pass: anchors over another image's padding neither take its pre-NMS top-k
        slots nor, in training, its sampled negatives (the paper's single-image passes, section
        4.1). The groups' losses, each a mean over its images, are weighted by their image
        counts, which is the whole batch's mean.
        """
        if self.proposal_generator is None:
            if "proposals" not in batched_inputs[0]:
                raise ValueError(
                    "The model has no proposal generator (MODEL.PROPOSAL_GENERATOR.NAME), so "
                    "each input needs precomputed 'proposals' (DATASETS.PROPOSAL_FILES_TRAIN/TEST "
                    "with MODEL.LOAD_PROPOSALS True)."
                )
            return [x["proposals"].to(self.device) for x in batched_inputs], {}
        groups = self._size_groups(images)
        if len(groups) <= 1:
            return self.proposal_generator(images, features, gt_instances)
        batch_height, batch_width = images.tensor.shape[-2:]
        num_images = len(images.image_sizes)
        proposals: List[Optional[Instances]] = [None] * num_images
        losses: Dict[str, torch.Tensor] = {}
        for (height, width), indices in groups.items():
            group_images = ImageList(
                images.tensor[indices, :, :height, :width],
                [images.image_sizes[i] for i in indices],
            )
            group_features = {}
            for name, x in features.items():
                # The cells of a height x width image on this map: exact for a stride that
                # divides the padded size, as the backbone's size_divisibility makes it.
                rows = -(-height * x.shape[-2] // batch_height)
                cols = -(-width * x.shape[-1] // batch_width)
                group_features[name] = x[indices, :, :rows, :cols]
            group_gt = None if gt_instances is None else [gt_instances[i] for i in indices]
            group_proposals, group_losses = self.proposal_generator(
                group_images, group_features, group_gt
            )
            for i, p in zip(indices, group_proposals):
                proposals[i] = p
            for name, value in group_losses.items():
                weighted = value * (len(indices) / num_images)
                losses[name] = losses[name] + weighted if name in losses else weighted
        return proposals, losses

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """
        See :meth:`GeneralizedRCNN.forward`. Inputs may also hold "sem_seg" (an (H, W) long
        tensor, as :class:`DatasetMapper` loads from ``sem_seg_file_name``); training then adds
        "loss_sem_seg".
        """
        if not self.training:
            self._warn_uncapped(batched_inputs)
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
            losses.update(self._sem_seg_losses(batched_inputs, images, features))
        return losses

    def _warn_uncapped(self, batched_inputs) -> None:
        cap = self.unresized_test_max_size
        if cap is None or self._warned_uncapped:
            return
        sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        big = [s for s in sizes if max(s) > cap]
        if big:
            self._warned_uncapped = True
            logger.warning(
                f"An input image of {big[0][0]}x{big[0][1]} (HxW) runs at full size: it is "
                f"larger than INPUT.MAX_SIZE_TEST ({cap}), which this config (INPUT.MIN_SIZE_TEST "
                "0) applies as a cap, but Detectron2's DefaultPredictor does not resize for "
                "MIN_SIZE_TEST 0. Use ion_d2.IONPredictor, which caps it as evaluation does."
            )

    def _sem_seg_losses(self, batched_inputs, images: ImageList, features) -> Dict:
        num_labelled = sum("sem_seg" in x for x in batched_inputs)
        # How much of the batch the regularizer sees (e.g. COCO images without stuff labels).
        get_event_storage().put_scalar(
            "ion/sem_seg_labelled_fraction", num_labelled / len(batched_inputs)
        )
        ignore_value = self.sem_seg_head.ignore_value
        targets = [
            (
                x["sem_seg"].to(self.device)
                if "sem_seg" in x
                else torch.full((h, w), ignore_value, dtype=torch.long, device=self.device)
            )
            for x, (h, w) in zip(batched_inputs, images.image_sizes)
        ]
        targets = ImageList.from_tensors(
            targets, self.backbone.size_divisibility, pad_value=ignore_value
        ).tensor
        if self._seg_head_takes_image_sizes:
            _, seg_losses = self.sem_seg_head(features, targets, image_sizes=images.image_sizes)
        else:
            _, seg_losses = self.sem_seg_head(features, targets)
        return seg_losses

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
        return self._postprocess(results, batched_inputs, images.image_sizes)


def _warn_per_image_batch_norm(cfg, backbone: nn.Module) -> None:
    """Per-size trunk passes in training give BatchNorm each image's statistics alone."""
    if cfg.MODEL.ION.BACKBONE_PER_IMAGE_TRAIN and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules()
    ):
        logger.warning(
            "MODEL.ION.BACKBONE_PER_IMAGE_TRAIN is True and the backbone has BatchNorm layers: "
            "in training, images of different padded sizes are normalised by their own "
            "statistics (on the bundled data this cost ~5 AP). Set it False for whole-batch "
            "statistics; inference stays per image (MODEL.ION.BACKBONE_PER_IMAGE)."
        )


def _zero_pad_and_stack(maps: List[torch.Tensor]) -> torch.Tensor:
    """Stack (C, H_i, W_i) maps into (N, C, max H_i, max W_i), zero-padded at bottom and right."""
    height = max(m.shape[-2] for m in maps)
    width = max(m.shape[-1] for m in maps)
    return torch.stack([F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in maps])
