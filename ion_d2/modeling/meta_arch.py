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
import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
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

from ..config import check_proposals
from .context import build_ion_context, check_context_outputs_read
from .init_stream import own_init_stream
from .local_context import IMAGE_FEATURE
from .padding import backbone_per_size, proposals_per_size
from .skip_pooling import MEASURE_SCALE, check_scale_init, find_skip_pooler

__all__ = ["IONRCNN", "build_ion_heads"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class IONRCNN(GeneralizedRCNN):
    """
    Figure 1's data flow: backbone; a context module (``MODEL.ION.CONTEXT``, e.g. the 2x stacked
    4-direction IRNN on conv5) adding the feature "context"; the proposal generator (RPN, or the
    paper's precomputed proposals); ROI heads that may pool "context" (:class:`IONROIHeads`); in
    training only, a segmentation loss on the context (``MODEL.ION.SEG_LOSS_ON``, section 3.2).
    As in the paper's single-image passes, an image's outputs do not depend on its batch.
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
            context (nn.Module or None): adds features every head sees (``ION_CONTEXT_REGISTRY``).
            sem_seg_head (nn.Module or None): the training-only segmentation regularizer
                (``SEM_SEG_HEADS_REGISTRY``); its ``ignore_value`` fills images without "sem_seg".
            sem_seg_ignore_value (int or None): for callers of 0.1.0; must equal the head's.
            backbone_per_image (bool): at inference, one trunk pass per padded image size
                (:func:`backbone_per_size`); False: one pass over the padded batch.
            backbone_per_image_train (bool): the same in training (False: BatchNorm's training
                statistics come from the whole batch).
            unresized_test_max_size (int or None): ``INPUT.MAX_SIZE_TEST`` when
                ``INPUT.MIN_SIZE_TEST`` is 0: a larger input is logged once.
            kwargs: see :class:`GeneralizedRCNN`.

        Raises:
            ValueError: a context output that no head reads (:func:`check_context_outputs_read`),
                or a skip pooler's ``scale_init`` 0 on a backbone other than ion_d2's VGG16
                (:func:`check_scale_init`).
        """
        super().__init__(**kwargs)
        self.context = context
        self.sem_seg_head = sem_seg_head
        self.backbone_per_image = backbone_per_image
        self.backbone_per_image_train = backbone_per_image_train
        self.unresized_test_max_size = unresized_test_max_size
        self._warned_uncapped = False
        self._seg_head_takes_image_sizes = _check_seg_head(sem_seg_head, sem_seg_ignore_value)
        self._roi_heads_read_image = IMAGE_FEATURE in _reader(self.roi_heads, "", "")[1] + [
            getattr(self.roi_heads, "local_context_in_feature", "")
        ]
        # Here, not in a config builder, so that every way of building the model checks them.
        _check_context_outputs_read(context, self.roi_heads, sem_seg_head, self.proposal_generator)
        check_scale_init(self.roi_heads, self.backbone)

    @classmethod
    def from_config(cls, cfg):
        return _from_config(cfg)

    def features_and_proposals(
        self, batched_inputs: List[Dict[str, torch.Tensor]], gt_instances=None
    ) -> Tuple[ImageList, Dict[str, torch.Tensor], List[Instances], Dict[str, torch.Tensor]]:
        """
        The front half of training, inference, box voting and the skip-pooling scale's measurement:
        the padded ``ImageList``, its features (:meth:`extract_features`), per-image proposals
        (:func:`proposals_per_size`, or the inputs' precomputed "proposals") and the proposal
        generator's losses (empty at inference and for precomputed proposals).
        """
        images = self.preprocess_image(batched_inputs)
        features = self.extract_features(images)
        if self.proposal_generator is not None:
            proposals, losses = proposals_per_size(
                self.proposal_generator, self.backbone, images, features, gt_instances
            )
            return images, features, proposals, losses
        return images, features, _precomputed_proposals(batched_inputs, self.device), {}

    def extract_features(self, images: ImageList) -> Dict[str, torch.Tensor]:
        """
        ``self.backbone(images.tensor)`` of :class:`GeneralizedRCNN`, plus the context's, and the
        normalised batch itself as :data:`IMAGE_FEATURE` where the ROI heads read it.
        """
        per_size = self.backbone_per_image_train if self.training else self.backbone_per_image
        features = (
            backbone_per_size(self.backbone, images) if per_size else self.backbone(images.tensor)
        )
        if self.context is not None:
            features.update(self.context(features, images.image_sizes))
        if self._roi_heads_read_image:
            features[IMAGE_FEATURE] = images.tensor
        return features

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """
        See :meth:`GeneralizedRCNN.forward`. In training, the inputs' "sem_seg" ((H, W) long, as
        :class:`DatasetMapper` loads ``sem_seg_file_name``) add "loss_sem_seg".
        """
        if not self.training:
            self._warned_uncapped = self._warned_uncapped or _warn_if_uncapped(
                batched_inputs, self.unresized_test_max_size
            )
            return self.inference(batched_inputs)
        gt_instances = None
        if "instances" in batched_inputs[0]:
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        images, features, proposals, losses = self.features_and_proposals(
            batched_inputs, gt_instances
        )
        losses.update(self.roi_heads(images, features, proposals, gt_instances)[1])
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)
        if self.sem_seg_head is not None:
            targets = _sem_seg_targets(batched_inputs, images, self.sem_seg_head.ignore_value)
            sizes = {"image_sizes": images.image_sizes} if self._seg_head_takes_image_sizes else {}
            losses.update(self.sem_seg_head(features, targets, **sizes)[1])
        return losses

    def inference(
        self,
        batched_inputs: List[Dict[str, torch.Tensor]],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
    ):
        """See :meth:`GeneralizedRCNN.inference`. The segmentation regularizer is not run."""
        assert not self.training
        if detected_instances is None:
            images, features, proposals, _ = self.features_and_proposals(batched_inputs)
            results, _ = self.roi_heads(images, features, proposals, None)
        else:
            images = self.preprocess_image(batched_inputs)
            features = self.extract_features(images)
            detected_instances = [x.to(self.device) for x in detected_instances]
            results = self.roi_heads.forward_with_given_boxes(features, detected_instances)
        if not do_postprocess:
            return results
        return self._postprocess(results, batched_inputs, images.image_sizes)

    def box_voting_candidates(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """
        Inference up to box voting, for :class:`IONRCNNWithTTA`: each input's candidates of
        :meth:`IONROIHeads.box_voting_candidates`, in the input tensor's coordinates (not rescaled).
        """
        assert not self.training
        _check_box_voting_heads(self.roi_heads)
        _, features, proposals, _ = self.features_and_proposals(batched_inputs)
        return self.roi_heads.box_voting_candidates(features, proposals)


HeadBuilder = Callable[[Dict[str, ShapeSpec]], Optional[nn.Module]]


def build_ion_heads(
    backbone: nn.Module,
    *,
    context: HeadBuilder,
    sem_seg_head: HeadBuilder,
    proposal_generator: HeadBuilder,
    roi_heads: HeadBuilder,
    image_channels: int = 3,
) -> Dict[str, Optional[nn.Module]]:
    """
    Build :class:`IONRCNN`'s heads: the context module on the backbone's features, then the
    segmentation head, the proposal generator and the ROI heads on the backbone's and the
    context's together. :meth:`IONRCNN.from_config` and the shape-inferring
    :func:`ion_d2.modeling.builder.build_ion_rcnn` both build through this one order, so a seed
    gives the same initial weights on either. The context module and the segmentation head are
    built in their own random streams (:func:`own_init_stream`), so the proposal generator and
    the ROI heads start from the weights the stock :class:`GeneralizedRCNN` draws.

    Args:
        backbone (nn.Module): the built :class:`Backbone`.
        context, sem_seg_head, proposal_generator, roi_heads (callable): each builds that head
            from the shapes of the features it may read (dict[str, ShapeSpec]), or returns None
            for a model without it ("roi_heads" is required).
        image_channels (int): channels of the input image, which the ROI heads may also read
            as :data:`IMAGE_FEATURE` (stride 1).

    Returns:
        dict[str, nn.Module or None]: :class:`IONRCNN`'s keyword arguments of the same names.
    """
    shapes = dict(backbone.output_shape())
    # ION's own heads draw from their own streams: the proposal generator and the ROI heads
    # start as GeneralizedRCNN's with the same seed (ion_d2/modeling/init_stream.py).
    with own_init_stream("context"):
        built = {"context": context(dict(shapes))}
    if built["context"] is not None:
        shapes.update(built["context"].output_shape())
    with own_init_stream("sem_seg_head"):
        built["sem_seg_head"] = sem_seg_head(dict(shapes))
    built["proposal_generator"] = proposal_generator(dict(shapes))
    built["roi_heads"] = roi_heads(
        {**shapes, IMAGE_FEATURE: ShapeSpec(channels=image_channels, stride=1)}
    )
    return built


def _from_config(cfg) -> Dict[str, Any]:
    """
    :meth:`IONRCNN.from_config`: the config's checks, then the backbone and the heads
    (:func:`build_ion_heads`).
    """
    _check_pixel_std(cfg)
    check_proposals(cfg)
    backbone = build_backbone(cfg)
    _warn_per_image_batch_norm(cfg, backbone)
    seg_on = cfg.MODEL.ION.SEG_LOSS_ON
    heads = build_ion_heads(
        backbone,
        context=lambda shapes: build_ion_context(cfg, shapes),
        sem_seg_head=lambda shapes: build_sem_seg_head(cfg, shapes) if seg_on else None,
        proposal_generator=lambda shapes: build_proposal_generator(cfg, shapes),
        roi_heads=lambda shapes: build_roi_heads(cfg, shapes),
        image_channels=len(cfg.MODEL.PIXEL_MEAN),
    )
    _check_head_options(cfg, heads["roi_heads"])
    return {
        "backbone": backbone,
        **heads,
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


def _precomputed_proposals(batched_inputs, device: torch.device) -> List[Instances]:
    """The inputs' "proposals", for a model without a proposal generator."""
    if "proposals" not in batched_inputs[0]:
        raise ValueError(
            "The model has no proposal generator (MODEL.PROPOSAL_GENERATOR.NAME), so each "
            "input needs precomputed 'proposals' (DATASETS.PROPOSAL_FILES_TRAIN/TEST with "
            "MODEL.LOAD_PROPOSALS True)."
        )
    return [x["proposals"].to(device) for x in batched_inputs]


def _check_box_voting_heads(roi_heads: nn.Module) -> None:
    """Refuse ROI heads without :meth:`IONROIHeads.box_voting_candidates`."""
    if not hasattr(roi_heads, "box_voting_candidates"):
        raise TypeError(
            f"Box voting needs MODEL.ROI_HEADS.NAME 'IONROIHeads'; this model has "
            f"{type(roi_heads).__name__}."
        )


def _check_head_options(cfg, roi_heads: nn.Module) -> None:
    """
    Refuse ION options the ROI heads would ignore: box voting on heads without its second round
    (e.g. C4's IONRes5ROIHeads), enlarged boxes or a scale to measure on heads without ION's
    skip pooler, a local-context branch on heads that do not add its scores.
    """
    name = type(roi_heads).__name__
    if cfg.MODEL.ION.BOX_VOTING.ENABLED and not hasattr(roi_heads, "box_voting_candidates"):
        raise TypeError(
            f"MODEL.ION.BOX_VOTING.ENABLED is True, but the ROI heads ({name}, "
            f"MODEL.ROI_HEADS.NAME) have no second round of box regression to vote with; box "
            "voting needs 'IONROIHeads' (VGG16 and FPN models). Set it False for this model."
        )
    pooler = find_skip_pooler(roi_heads)
    enlarged = list(cfg.MODEL.ION.SKIP_POOL.ENLARGED.IN_FEATURES)
    if enlarged and (pooler is None or max(pooler.box_factors) == 1.0):
        raise TypeError(
            f"MODEL.ION.SKIP_POOL.ENLARGED.IN_FEATURES is {enlarged}, but the ROI heads ({name}, "
            "MODEL.ROI_HEADS.NAME) do not pool with ION's skip pooler; it needs 'IONROIHeads' "
            "or 'IONRes5ROIHeads'. Set it to [] for this model."
        )
    local = cfg.MODEL.ION.LOCAL_CONTEXT.IN_FEATURE
    if local and getattr(roi_heads, "local_context", None) is None:
        raise TypeError(
            f"MODEL.ION.LOCAL_CONTEXT.IN_FEATURE is {local!r}, but the ROI heads ({name}, "
            "MODEL.ROI_HEADS.NAME) have no local-context branch to add its scores to; it needs "
            "'IONROIHeads'. Set it to \"\" for this model."
        )
    if cfg.MODEL.ION.SKIP_POOL.SCALE_INIT == MEASURE_SCALE and pooler is None:
        raise TypeError(
            f"MODEL.ION.SKIP_POOL.SCALE_INIT is -1 (measure the skip-pooling scale), but the ROI "
            f"heads ({name}, MODEL.ROI_HEADS.NAME) do not pool with ION's skip pooler, so there "
            "is no scale to measure; it needs 'IONROIHeads' or 'IONRes5ROIHeads'. Leave it at "
            "its default (0) for this model."
        )


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


def _check_context_outputs_read(
    context: Optional[nn.Module],
    roi_heads: nn.Module,
    sem_seg_head: Optional[nn.Module],
    proposal_generator: Optional[nn.Module],
) -> None:
    """:func:`check_context_outputs_read` with the features the built heads read: the ROI
    heads' (``box_in_features`` of :class:`StandardROIHeads`, ``in_features`` of
    :class:`Res5ROIHeads`), the segmentation head's and the proposal generator's."""
    if context is None:
        return
    # The first reader is where the error suggests adding an output.
    readers = dict(
        [
            _reader(roi_heads, "roi_heads", "MODEL.ROI_HEADS.IN_FEATURES"),
            _reader(sem_seg_head, "sem_seg_head", "MODEL.SEM_SEG_HEAD.IN_FEATURES"),
            _reader(proposal_generator, "proposal_generator", "MODEL.RPN.IN_FEATURES"),
        ]
    )
    readers.pop(None, None)
    note = "" if sem_seg_head is not None else "; no sem_seg_head: MODEL.ION.SEG_LOSS_ON is False"
    name = f"The context module {type(context).__name__} (MODEL.ION.CONTEXT.NAME)"
    check_context_outputs_read(context, readers, name, note)


def _reader(module: Optional[nn.Module], where: str, key: str) -> Tuple[Optional[str], List[str]]:
    """``(what to call it, the features it reads)`` for a head that reads them through one of
    Detectron2's attributes ("box_in_features", "in_features") or ours ("in_feature"), or
    ``(None, [])``."""
    for attr in ("box_in_features", "in_features", "in_feature"):
        value = getattr(module, attr, None)
        if value is not None:
            features = [value] if isinstance(value, str) else list(value)
            return f"{where}.{attr} ({key})", features
    return None, []


def _check_pixel_std(cfg) -> None:
    """
    Refuse a ``MODEL.PIXEL_STD`` with an entry that is zero, negative or not finite: the model
    divides its input by it, so the first loss would be NaN and reported as divergence.

    Raises:
        ValueError: naming the key and its value.
    """
    std = list(cfg.MODEL.PIXEL_STD)
    if not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(
            f"MODEL.PIXEL_STD must hold finite values > 0 (the input is divided by them); got "
            f"{std}. Use e.g. [58.395, 57.12, 57.375] (ImageNet, RGB 0-255) or [1.0, 1.0, 1.0] "
            "(no scaling)."
        )


def _check_seg_head(sem_seg_head: Optional[nn.Module], sem_seg_ignore_value: Optional[int]) -> bool:
    """Whether ``sem_seg_head.forward`` takes ``image_sizes``; refuses a second ignore value."""
    if sem_seg_head is None:
        return False
    if sem_seg_ignore_value not in (None, sem_seg_head.ignore_value):
        raise ValueError(
            f"IONRCNN sem_seg_ignore_value={sem_seg_ignore_value} differs from the seg head's "
            f"ignore_value {sem_seg_head.ignore_value}; leave it out (the head's is used)."
        )
    if "image_sizes" in inspect.signature(sem_seg_head.forward).parameters:
        return True
    logger.warning(
        f"{type(sem_seg_head).__name__}.forward takes no image_sizes: its loss near an image's "
        "border may depend on the batch's padding."
    )
    return False


def _sem_seg_targets(batched_inputs, images: ImageList, ignore_value: int) -> torch.Tensor:
    """
    The inputs' "sem_seg" labels, (N, H, W) as ``images.tensor``, padded with ``ignore_value``;
    an input without labels is all ``ignore_value``.
    """
    num_labelled = sum("sem_seg" in x for x in batched_inputs)
    # How much of the batch the regularizer sees (e.g. COCO images without stuff labels).
    get_event_storage().put_scalar(
        "ion/sem_seg_labelled_fraction", num_labelled / len(batched_inputs)
    )
    height, width = images.tensor.shape[-2:]
    targets = torch.full(
        (len(batched_inputs), height, width), ignore_value, dtype=torch.long, device=images.device
    )
    for target, x in zip(targets, batched_inputs):
        if "sem_seg" in x:
            h, w = x["sem_seg"].shape
            target[:h, :w] = x["sem_seg"]
    return targets


def _warn_if_uncapped(batched_inputs, cap: Optional[int]) -> bool:
    """
    Warn (and return True) when an input is larger than ``cap``, the ``INPUT.MAX_SIZE_TEST`` of
    a config whose test images keep their own size (``INPUT.MIN_SIZE_TEST`` 0): Detectron2's
    stock ``DefaultPredictor`` does not resize for 0.
    """
    if cap is None:
        return False
    big = [x["image"].shape[-2:] for x in batched_inputs if max(x["image"].shape[-2:]) > cap]
    if big:
        logger.warning(
            f"An input image of {big[0][0]}x{big[0][1]} (HxW) runs at full size: it is larger "
            f"than INPUT.MAX_SIZE_TEST ({cap}), which this config (INPUT.MIN_SIZE_TEST 0) applies "
            "as a cap, but Detectron2's DefaultPredictor does not resize for MIN_SIZE_TEST 0. Use "
            "ion_d2.IONPredictor, which caps it as evaluation does."
        )
    return bool(big)
