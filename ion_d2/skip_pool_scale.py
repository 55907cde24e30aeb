"""
Measuring the skip-pooling scale on the training set (section 5.2, ``SKIP_POOL.SCALE_INIT -1``):
"To determine the initial scale, we measure the mean scale of features pooled from conv5 on the
training set, and use that as the fixed scale."
"""

import contextlib
import logging
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional

import torch
from detectron2.structures import Boxes
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .data.loader import load_train_dicts
from .data.mapper import IONDatasetMapper
from .skip_pooling import MEASURE_SCALE, IONSkipPooler

__all__ = ["PooledNorms", "measure_pooled_norms", "measure_skip_pool_scale", "training_batches"]

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


def training_batches(cfg, num_images: int) -> List[List[dict]]:
    """
    The first ``num_images`` images of ``cfg.DATASETS.TRAIN`` (with precomputed proposals when
    ``MODEL.LOAD_PROPOSALS``), mapped as for training by :class:`IONDatasetMapper`, in batches of
    the per-process training batch size (``SOLVER.IMS_PER_BATCH`` / number of processes).
    """
    if num_images < 1:
        raise ValueError(
            f"MODEL.ION.SKIP_POOL.SCALE_MEASURE_IMAGES must be >= 1; got {num_images}."
        )
    dicts = load_train_dicts(cfg)[:num_images]
    mapper = IONDatasetMapper(cfg, True)
    batch_size = max(cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(), 1)
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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _skip_pooler(model: nn.Module) -> Optional[IONSkipPooler]:
    pooler = getattr(getattr(model, "roi_heads", None), "box_pooler", None)
    return pooler if isinstance(pooler, IONSkipPooler) else None


def _proposal_boxes(model: nn.Module, batch: List[dict], images, features) -> List[Boxes]:
    if model.proposal_generator is not None:
        proposals, _ = model.proposal_generator(images, features, None)
    elif "proposals" in batch[0]:
        proposals = [x["proposals"].to(model.device) for x in batch]
    else:
        raise ValueError(
            "Measuring the skip-pooling scale needs proposals: the model has no proposal "
            "generator and the inputs no precomputed 'proposals' (MODEL.LOAD_PROPOSALS True "
            "with DATASETS.PROPOSAL_FILES_TRAIN)."
        )
    return [p.proposal_boxes for p in proposals]


@torch.no_grad()
def measure_pooled_norms(model: nn.Module, batches: Iterable[List[dict]]) -> PooledNorms:
    """
    Run ``model`` (an R-CNN whose ``roi_heads.box_pooler`` is :class:`IONSkipPooler`, possibly
    wrapped in DDP) without gradients on ``batches``, pool each image's proposals (from the
    model's proposal generator, or the inputs' precomputed "proposals") from every feature of
    ``roi_heads.box_in_features`` with the box pooler's own per-feature poolers, before any
    normalisation, and return the mean L2 norms.

    The model runs in eval mode (no dropout; the proposal generator's test-time settings),
    except that BatchNorm layers normalise with each batch's statistics, as in training,
    without updating their running estimates. The model's modes are restored afterwards.
    """
    model = _unwrap(model)
    pooler = _skip_pooler(model)
    if pooler is None:
        raise ValueError(
            "measure_pooled_norms needs a model whose roi_heads.box_pooler is an IONSkipPooler "
            "(MODEL.ROI_HEADS.NAME 'IONROIHeads')."
        )
    names = list(model.roi_heads.box_in_features)
    roi_sums = {n: torch.zeros((), dtype=torch.float64, device=model.device) for n in names}
    location_sums = {n: torch.zeros_like(roi_sums[n]) for n in names}
    num_rois = num_images = 0
    was_training = model.training
    model.eval()
    try:
        with _batch_statistics(model):
            for batch in batches:
                images = model.preprocess_image(batch)
                if hasattr(model, "extract_features"):
                    features = model.extract_features(images)
                else:
                    features = model.backbone(images.tensor)
                boxes = _proposal_boxes(model, batch, images, features)
                for i, b in enumerate(boxes):
                    for start in range(0, len(b), _ROI_CHUNK):
                        chunk = [b[start : start + _ROI_CHUNK]]
                        for name, roi_pooler in zip(names, pooler.poolers):
                            pooled = roi_pooler([features[name][i : i + 1]], chunk).double()
                            roi_sums[name] += pooled.flatten(1).norm(dim=1).sum()
                            location_sums[name] += pooled.norm(dim=1).mean(dim=(1, 2)).sum()
                    num_rois += len(b)
                num_images += len(batch)
    finally:
        model.train(was_training)
    if num_rois == 0:
        raise RuntimeError(f"No proposals to measure the pooled norms on ({num_images} images).")
    return PooledNorms(
        per_roi={n: roi_sums[n].item() / num_rois for n in names},
        per_location={n: location_sums[n].item() / num_rois for n in names},
        num_rois=num_rois,
        num_images=num_images,
    )


def measure_skip_pool_scale(
    cfg,
    model: nn.Module,
    *,
    start_iter: int = 0,
    batches: Optional[Iterable[List[dict]]] = None,
) -> Optional[float]:
    """
    ``MODEL.ION.SKIP_POOL.SCALE_INIT`` -1 (section 5.2): measure the mean norm of proposals
    pooled from each feature on the first ``SCALE_MEASURE_IMAGES`` training images
    (:func:`measure_pooled_norms`; per ROI or per location following ``SKIP_POOL.NORM``), log
    them all, and set every channel of the skip-pooling scale to the mean norm of the reference
    feature ``MODEL.ION.CONTEXT.IN_FEATURE`` (conv5). Does nothing for other SCALE_INIT values,
    for models without a scale, or when the loaded weights hold the scale. With several
    processes, each measures the same images and all take the main process's value, so the
    replicas stay identical.

    Args:
        cfg: the model's config.
        model (nn.Module): the model (or its DDP wrapper).
        start_iter (int): the iteration training starts from (a warning when > 0).
        batches (iterable[list[dict]] or None): model inputs to measure on instead of
            :func:`training_batches` (``cfg``, ``SCALE_MEASURE_IMAGES``).

    Returns:
        float or None: the scale set, or None when nothing was measured.
    """
    skip = cfg.MODEL.ION.SKIP_POOL
    if skip.SCALE_INIT != MEASURE_SCALE:
        return None
    if skip.SCALE_MEASURE_IMAGES < 1:
        raise ValueError(
            "MODEL.ION.SKIP_POOL.SCALE_MEASURE_IMAGES must be >= 1 for SCALE_INIT -1; got "
            f"{skip.SCALE_MEASURE_IMAGES}."
        )
    module = _unwrap(model)
    pooler = _skip_pooler(module)
    if pooler is None or pooler.scale is None:
        logger.info(
            "The model has no skip-pooling scale (SKIP_POOL.NORM 'none'); nothing to measure."
        )
        return None
    if not pooler.scale_pending:
        mean = pooler.scale.mean().item()
        logger.info(
            f"The skip-pooling scale is already set (mean {mean:.4g}; the loaded weights hold it): "
            "not measuring it again (SKIP_POOL.SCALE_INIT -1)."
        )
        return None
    reference = cfg.MODEL.ION.CONTEXT.IN_FEATURE
    names = list(module.roi_heads.box_in_features)
    if reference not in names:
        raise ValueError(
            f"SKIP_POOL.SCALE_INIT -1 sets the scale from the pooled norm of MODEL.ION.CONTEXT."
            f"IN_FEATURE {reference!r}, which MODEL.ROI_HEADS.IN_FEATURES {names} does not pool."
        )
    if start_iter > 0:
        logger.warning(
            f"Resuming at iteration {start_iter} from weights without the skip-pooling scale; "
            "measuring it now."
        )
    if batches is None:
        batches = training_batches(cfg, skip.SCALE_MEASURE_IMAGES)
    norms = measure_pooled_norms(model, batches)
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
