"""
Measuring the skip-pooling scale on the training set (section 5.2, ``SKIP_POOL.SCALE_INIT -1``):
"To determine the initial scale, we measure the mean scale of features pooled from conv5 on the
training set, and use that as the fixed scale."

The model runs without gradients, in eval mode but with BatchNorm on batch statistics (as the
first training step would see them), up to its proposals (``IONRCNN.features_and_proposals``);
each pooled feature's mean L2 norm (per ROI for ``SKIP_POOL.NORM`` "roi", per location for
"location") is logged, and every channel of the scale takes the reference feature's (conv5: the
amplitude fc6 was trained on). One scale for all layers, as the paper: after L2 normalisation
they have equal amplitude (Table 4's point), which per-layer norms would undo.

:class:`SkipPoolScaleHook` is the one procedure that does it, before the first step, under every
trainer: :class:`IONTrainer` and tools/lazyconfig_train_net.py register it; under another
trainer, ``trainer.register_hooks([ion_d2.engine.SkipPoolScaleHook(cfg)])`` (docs/USAGE.md,
"Which trainer"). A model whose scale is still pending refuses to run
(:meth:`IONSkipPooler.forward`, naming that line).
"""

import contextlib
import logging
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional

import torch
from detectron2.config import CfgNode, instantiate
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn

from ..data.loader import load_train_dicts
from ..data.mapper import IONDatasetMapper
from ..modeling.skip_pooling import IONSkipPooler, find_skip_pooler
from .launch import unwrap_ddp

__all__ = [
    "PooledNorms",
    "SkipPoolScaleHook",
    "measure_pooled_norms",
    "measure_skip_pool_scale",
    "skip_pooler",
    "training_batches",
]

logger = logging.getLogger(__name__)

# Normalisation layers whose training-mode output uses the batch's statistics.
_BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# ROIs pooled at once, to bound memory (2000 proposals x 2048 context channels x 7 x 7).
_ROI_CHUNK = 512


class PooledNorms(NamedTuple):
    """Mean L2 norms of ROI-pooled features, one entry per pooled feature name."""

    per_roi: Dict[str, float]
    """over all C x H x W entries of each ROI ("roi" normalisation)"""
    per_location: Dict[str, float]
    """over the C channels of each pooled cell ("location" normalisation)"""
    num_rois: int
    num_images: int


def training_batches(cfg, num_images: Optional[int] = None) -> List[List[dict]]:
    """
    The first ``num_images`` training images, mapped as for training, in batches of the
    per-process training batch size, from either kind of config (as Detectron2's
    ``default_setup`` takes either):

    * a YAML config (:class:`CfgNode`): ``DATASETS.TRAIN`` (with precomputed proposals when
      ``MODEL.LOAD_PROPOSALS``) through :class:`IONDatasetMapper`, ``SOLVER.IMS_PER_BATCH``;
      ``num_images`` defaults to ``MODEL.ION.SKIP_POOL.SCALE_MEASURE_IMAGES``;
    * a LazyConfig: ``dataloader.train.dataset`` through ``dataloader.train.mapper``,
      ``dataloader.train.total_batch_size``; ``num_images`` defaults to
      ``train.ion_scale_measure_images`` (100 when the config has no such key).
    """
    yaml = isinstance(cfg, CfgNode)
    if yaml:
        key = "MODEL.ION.SKIP_POOL.SCALE_MEASURE_IMAGES"
        default = cfg.MODEL.ION.SKIP_POOL.SCALE_MEASURE_IMAGES
    else:
        key = "train.ion_scale_measure_images"
        default = cfg.train.get("ion_scale_measure_images", 100)
    num_images = default if num_images is None else num_images
    if num_images < 1:
        raise ValueError(f"{key} must be >= 1; got {num_images}.")
    if yaml:
        dicts = load_train_dicts(cfg)[:num_images]
        mapper = IONDatasetMapper(cfg, True)
        total_batch_size = cfg.SOLVER.IMS_PER_BATCH
    else:
        dicts = instantiate(cfg.dataloader.train.dataset)[:num_images]
        mapper = instantiate(cfg.dataloader.train.mapper)
        total_batch_size = cfg.dataloader.train.total_batch_size
    batch_size = max(total_batch_size // comm.get_world_size(), 1)
    mapped = [mapper(d) for d in dicts]
    return [mapped[i : i + batch_size] for i in range(0, len(mapped), batch_size)]


@contextlib.contextmanager
def _batch_statistics(model: nn.Module) -> Iterator[None]:
    # BatchNorm normalises with the batch's statistics in training, so the pooled amplitudes
    # fc6 sees come from those (a from-scratch BN's running estimates are still mean 0, var 1
    # at iteration 0). Use them here too, but leave the running estimates as they were.
    layers = [m for m in model.modules() if isinstance(m, _BATCH_NORM_TYPES)]
    saved = [
        (m.training, {n: b.clone() for n, b in m.named_buffers(recurse=False)}) for m in layers
    ]
    for m in layers:
        m.train()
    try:
        yield
    finally:
        for m, (training, buffers) in zip(layers, saved):
            for name, value in buffers.items():
                getattr(m, name).copy_(value)
            m.train(training)


def skip_pooler(model: nn.Module) -> Optional[IONSkipPooler]:
    """
    The :class:`IONSkipPooler` of ``model`` (possibly wrapped in DDP): ``roi_heads.box_pooler``
    (:class:`IONROIHeads`) or ``roi_heads.pooler`` (C4's :class:`IONRes5ROIHeads`), or None
    (:func:`find_skip_pooler`).
    """
    return find_skip_pooler(getattr(unwrap_ddp(model), "roi_heads", None))


@torch.no_grad()
def measure_pooled_norms(model: nn.Module, batches: Iterable[List[dict]]) -> PooledNorms:
    """
    Run ``model`` (an :class:`IONRCNN` whose box pooler is :class:`IONSkipPooler`, possibly
    wrapped in DDP) without gradients on ``batches`` up to its proposals
    (:meth:`IONRCNN.features_and_proposals`), and return the mean L2 norms of the proposals
    pooled from every feature of the box pooler, before any normalisation
    (:meth:`IONSkipPooler.pooled_norm_sums`).

    The model runs in eval mode (no dropout; the proposal generator's test-time settings),
    except that BatchNorm layers normalise with each batch's statistics, as in training,
    without updating their running estimates. The model's modes are restored afterwards.
    """
    model = unwrap_ddp(model)
    pooler = skip_pooler(model)
    if pooler is None or not hasattr(model, "features_and_proposals"):
        heads = type(getattr(model, "roi_heads", None)).__name__
        raise ValueError(
            "Measuring the skip-pooling scale needs MODEL.META_ARCHITECTURE 'IONRCNN' with an "
            "IONSkipPooler (MODEL.ROI_HEADS.NAME 'IONROIHeads' or 'IONRes5ROIHeads'); got "
            f"{type(model).__name__} with {heads}."
        )
    # The features the heads pool, in the pooler's order: StandardROIHeads' or Res5ROIHeads'.
    heads = model.roi_heads
    inputs = list(getattr(heads, "box_in_features", None) or heads.in_features)
    # Reported as the pooler names them (an enlarged-box descriptor as "<feature>@x<factor>").
    names = list(pooler.feature_names or inputs)
    roi = torch.zeros(len(names), dtype=torch.float64, device=model.device)
    location = torch.zeros_like(roi)
    num_rois = num_images = 0
    was_training = model.training
    model.eval()
    try:
        with _batch_statistics(model):
            for batch in batches:
                _, features, proposals, _ = model.features_and_proposals(batch)
                boxes = [p.proposal_boxes for p in proposals]
                sums = pooler.pooled_norm_sums(
                    [features[n] for n in inputs],
                    boxes,
                    _ROI_CHUNK,
                    image_sizes=[p.image_size for p in proposals],
                )
                roi += sums[0]
                location += sums[1]
                num_rois += sums[2]
                num_images += len(batch)
    finally:
        model.train(was_training)
    if num_rois == 0:
        raise RuntimeError(f"No proposals to measure the pooled norms on ({num_images} images).")
    return PooledNorms(
        per_roi={n: roi[k].item() / num_rois for k, n in enumerate(names)},
        per_location={n: location[k].item() / num_rois for k, n in enumerate(names)},
        num_rois=num_rois,
        num_images=num_images,
    )


def measure_skip_pool_scale(
    model: nn.Module, batches: Iterable[List[dict]], *, start_iter: int = 0
) -> float:
    """
    Section 5.2 before the first step: set the pending skip-pooling scale
    (:attr:`IONSkipPooler.scale_pending`, ``SKIP_POOL.SCALE_INIT`` -1) to the mean norm of the
    proposals pooled on ``batches`` (:func:`measure_pooled_norms`; per ROI or per location
    following the pooler's normalisation) from its reference feature
    (``MODEL.ION.CONTEXT.IN_FEATURE``), logging every feature's. With several processes, each
    measures the same images and all take the main process's value, so the replicas stay
    identical.

    Args:
        model (nn.Module): an :class:`IONRCNN` (or its DDP wrapper) whose scale is pending.
        batches (iterable[list[dict]]): model inputs, e.g. :func:`training_batches`.
        start_iter (int): the iteration training starts from (a warning when > 0).

    Returns:
        float: the scale set.
    """
    pooler = skip_pooler(model)
    if pooler is None or not pooler.scale_pending:
        raise ValueError(
            "measure_skip_pool_scale needs a model whose skip-pooling scale is pending."
        )
    if start_iter > 0:
        logger.warning(
            f"Resuming at iteration {start_iter} from weights without the skip-pooling scale; "
            "measuring it now."
        )
    norms = measure_pooled_norms(model, batches)
    names = list(norms.per_roi)
    reference = pooler.scale_reference
    per = norms.per_roi if pooler.norm == "roi" else norms.per_location
    table = "\n".join(
        f"  {n:<12}{norms.per_roi[n]:>14.4g}{norms.per_location[n]:>16.4g}" for n in names
    )
    logger.info(
        f"Mean L2 norm of {norms.num_rois} proposals pooled on {norms.num_images} training images "
        f"(section 5.2):\n  {'feature':<12}{'per ROI':>14}{'per location':>16}\n{table}"
    )
    # Every process measured the same images; take the main process's value so that no
    # floating-point difference makes the DDP replicas' scales differ.
    value = comm.all_gather(per[reference])[0]
    pooler.set_scale(value)
    logger.info(
        f"Skip-pooling scale set to {value:.4g}: the mean {pooler.norm!r} norm of {reference!r} "
        "(MODEL.ION.CONTEXT.IN_FEATURE), for every pooled channel."
    )
    return value


class SkipPoolScaleHook(HookBase):
    """
    Section 5.2's procedure, the same under every trainer: before the first step, a pending
    skip-pooling scale (``SKIP_POOL.SCALE_INIT`` -1, not held by the loaded weights) is measured
    on the first training images (:func:`training_batches`) by :func:`measure_skip_pool_scale`.
    :class:`IONTrainer` and tools/lazyconfig_train_net.py register it; with another trainer
    (Detectron2's ``DefaultTrainer``, its tools/train_net.py), add it before ``trainer.train()``::

        trainer.register_hooks([ion_d2.engine.SkipPoolScaleHook(cfg)])

    Without it a pending scale stops the first step with an error naming that line.
    """

    def __init__(self, cfg):
        """
        Args:
            cfg: the training config, YAML (:class:`CfgNode`) or LazyConfig: where the images
                come from (:func:`training_batches`). Nothing is loaded unless the scale is
                pending.
        """
        self._cfg = cfg

    def before_train(self):
        model = self.trainer.model
        pooler = skip_pooler(model)
        if pooler is None or not pooler.scale_pending:
            return
        batches = training_batches(self._cfg)
        measure_skip_pool_scale(model, batches, start_iter=self.trainer.start_iter)
