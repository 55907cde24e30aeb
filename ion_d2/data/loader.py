"""
A training data loader whose batch for iteration ``i`` depends only on ``(seed, i)``, so a run
resumed at iteration ``k`` sees exactly the batches the uninterrupted run saw from ``k`` on.

Detectron2's loader (an infinite shuffled sampler, aspect-ratio buckets filled as images arrive,
augmentations drawn from each worker's global RNG) restarts from its first batch when a run is
resumed, and its batches depend on the number of workers.
"""

import contextlib
import itertools
import logging
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .file_check import UnreadableImage

__all__ = ["IterationBatches", "IONTrainLoader", "build_ion_train_loader", "seeded_rngs"]

logger = logging.getLogger(__name__)

# Domain tags keep the streams derived from one seed apart.
_PERMUTATION, _SAMPLE = 0, 1


def _derive_seed(*entropy: int) -> int:
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rngs(seed: int):
    """
    Seed Python's, NumPy's and torch's global RNGs (which Detectron2's augmentations draw from)
    for the body, and put back their previous states afterwards.
    """
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class IterationBatches:
    """
    The dataset indices of the global batch of any iteration, as a pure function of
    ``(seed, iteration)``.

    Epoch ``e`` is a permutation of the dataset drawn from ``(seed, e)``. Without grouping,
    iteration ``i`` takes positions ``[i * B, (i + 1) * B)`` of the concatenated epochs. With
    aspect-ratio grouping (as ``DATALOADER.ASPECT_RATIO_GROUPING``: no batch mixes landscape and
    portrait images), each epoch's landscape and portrait images form batches of ``B`` in
    permutation order (each group's remainder under ``B`` sits that epoch out) and the epoch's
    batches are shuffled; when neither group fills a batch, batches mix both.
    """

    def __init__(self, num_images: int, batch_size: int, seed: int, groups: Optional[np.ndarray]):
        """
        Args:
            num_images (int): dataset size.
            batch_size (int): global batch size (all processes together).
            seed (int): the seed every batch derives from.
            groups (ndarray or None): per image, 0 (landscape) or 1 (portrait) for aspect-ratio
                grouping; None for none.
        """
        if num_images <= 0 or batch_size <= 0:
            raise ValueError(
                f"IterationBatches needs images and a batch size; got {num_images} images and "
                f"batch size {batch_size}."
            )
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.groups = groups
        self._cache: Dict[int, object] = {}
        self.batches_per_epoch = 0
        if groups is not None:
            self.batches_per_epoch = sum(int((groups == g).sum()) // batch_size for g in (0, 1))
        if groups is not None and self.batches_per_epoch == 0:
            logger.info("Fewer images than one batch per aspect ratio: batches mix both.")
            self.groups = None

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(_derive_seed(self.seed, _PERMUTATION, epoch))
        return rng.permutation(self.num_images)

    def _epoch_batches(self, epoch: int) -> List[np.ndarray]:
        if epoch not in self._cache:
            perm, b = self._permutation(epoch), self.batch_size
            batches = []
            for g in (0, 1):
                members = perm[self.groups[perm] == g]
                batches += [members[i : i + b] for i in range(0, len(members) // b * b, b)]
            order = np.random.default_rng(_derive_seed(self.seed, _PERMUTATION, epoch, 1))
            self._cache = {epoch: [batches[i] for i in order.permutation(len(batches))]}
        return self._cache[epoch]

    def __call__(self, iteration: int) -> List[int]:
        if self.groups is not None:
            epoch, index = divmod(iteration, self.batches_per_epoch)
            return self._epoch_batches(epoch)[index].tolist()
        start = iteration * self.batch_size
        out = []
        for position in range(start, start + self.batch_size):
            epoch, index = divmod(position, self.num_images)
            if epoch not in self._cache:
                self._cache = {epoch: self._permutation(epoch)}
            out.append(int(self._cache[epoch][index]))
        return out


class _IterationDataset(IterableDataset):
    """
    This process's share of each iteration's batch, mapped, from ``start_iter`` on; with
    ``skip_unreadable``, an image the mapper cannot read (:class:`UnreadableImage`) is replaced
    by the next readable one in dataset order, mapped with the same random draws.
    """

    def __init__(
        self, dataset, mapper, batches: IterationBatches, start_iter: int, skip_unreadable: bool
    ):
        self.dataset, self.mapper, self.batches = dataset, mapper, batches
        self.start_iter, self.skip_unreadable = start_iter, skip_unreadable
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self._unreadable: set = set()

    def __iter__(self):
        worker = get_worker_info()
        first, step = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        share = self.batches.batch_size // self.world_size
        # DataLoader takes its workers' outputs round-robin: worker w makes every step-th batch.
        for iteration in itertools.count(self.start_iter + first, step):
            indices = self.batches(iteration)
            mine = range(self.rank * share, (self.rank + 1) * share)
            yield [self._map(iteration, slot, indices[slot]) for slot in mine]

    def _map(self, iteration: int, slot: int, index: int):
        # The augmentations' random draws depend on (seed, iteration, slot) only.
        seed = _derive_seed(self.batches.seed, _SAMPLE, iteration, slot)
        for step in range(len(self.dataset)):
            candidate = (index + step) % len(self.dataset)
            if candidate in self._unreadable:
                continue
            try:
                with seeded_rngs(seed):
                    return self.mapper(self.dataset[candidate])
            except UnreadableImage as e:
                if not self.skip_unreadable:
                    raise
                self._unreadable.add(candidate)
                logger.warning(
                    f"{str(e).rstrip('.')}; training on the next readable image in its place "
                    "from now on (DATALOADER.ION_SKIP_UNREADABLE_IMAGES True)."
                )
        raise UnreadableImage("No image of the training set can be read.")


def _collate(batch):
    return batch


class IONTrainLoader:
    """
    An iterable over per-iteration training batches (lists of mapped dataset dicts) that starts
    at :attr:`start_iter`, set by :meth:`set_start_iter` before iteration begins.

    Its workers start lazily, at the first batch, so that a trainer can build the loader before
    it knows (from a checkpoint) where training resumes.
    """

    def __init__(
        self,
        dataset: Sequence,
        mapper: Callable,
        *,
        batches,
        num_workers: int,
        skip_unreadable: bool = False,
    ):
        self.dataset, self.mapper, self.batches = dataset, mapper, batches
        self.num_workers, self.skip_unreadable = num_workers, skip_unreadable
        self.start_iter = 0
        self._started = False

    def set_start_iter(self, start_iter: int) -> None:
        if self._started:
            raise RuntimeError("IONTrainLoader.set_start_iter() after iteration has started.")
        self.start_iter = start_iter

    @property
    def seed(self) -> int:
        return self.batches.seed

    def state_dict(self) -> dict:
        """The loader's position is the iteration; only the seed is state."""
        return {"seed": self.batches.seed}

    def load_state_dict(self, state: dict) -> None:
        if self._started:
            raise RuntimeError("IONTrainLoader.load_state_dict() after iteration has started.")
        self.batches = IterationBatches(
            self.batches.num_images, self.batches.batch_size, state["seed"], self.batches.groups
        )

    def __iter__(self) -> Iterator[List[dict]]:
        return self._generate()

    def _generate(self):
        self._started = True
        dataset = _IterationDataset(
            self.dataset, self.mapper, self.batches, self.start_iter, self.skip_unreadable
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_collate,
            # Its own generator: creating the iterator must not draw from torch's global RNG.
            generator=torch.Generator().manual_seed(self.batches.seed),
        )
        yield from loader


def _aspect_groups(dicts: List[dict]) -> Optional[np.ndarray]:
    if not all("width" in d and "height" in d for d in dicts):
        logger.warning(
            "Some dataset dicts have no 'width'/'height': training batches are not grouped by "
            "aspect ratio (DATALOADER.ASPECT_RATIO_GROUPING)."
        )
        return None
    return np.array([0 if d["width"] > d["height"] else 1 for d in dicts])


def load_train_dicts(cfg) -> List[dict]:
    """
    The training images' dataset dicts, as :func:`build_detection_train_loader` loads them (the
    datasets of ``DATASETS.TRAIN``, filtered, with precomputed proposals when
    ``MODEL.LOAD_PROPOSALS``).

    Raises:
        ValueError: no training dataset.
    """
    if not cfg.DATASETS.TRAIN:
        raise ValueError("DATASETS.TRAIN is empty: the config names no training dataset.")
    return get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )


def build_ion_train_loader(
    cfg, mapper: Callable, dicts: Optional[List[dict]] = None
) -> IONTrainLoader:
    """
    Build :class:`IONTrainLoader` from a config, as :func:`build_detection_train_loader` would
    (the same datasets, filtering, batch size, grouping and workers), with ``cfg.SEED`` as the
    data seed (a seed shared by all processes when ``SEED`` < 0) and
    ``DATALOADER.ION_SKIP_UNREADABLE_IMAGES``.

    Args:
        cfg (CfgNode): the config.
        mapper (callable): maps a dataset dict to the model's input.
        dicts (list[dict] or None): the training images' dicts; None loads them
            (:func:`load_train_dicts`).

    Raises:
        ValueError: no training dataset, or a sampler other than "TrainingSampler".
    """
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r} is not supported by "
            "ion_d2's resumable train loader; use 'TrainingSampler'."
        )
    if dicts is None:
        dicts = load_train_dicts(cfg)
    world_size = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world_size != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by the number "
            f"of processes ({world_size})."
        )
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    groups = _aspect_groups(dicts) if cfg.DATALOADER.ASPECT_RATIO_GROUPING else None
    batches = IterationBatches(len(dicts), cfg.SOLVER.IMS_PER_BATCH, seed, groups)
    dataset = DatasetFromList(dicts, copy=False)
    return IONTrainLoader(
        dataset,
        mapper,
        batches=batches,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        skip_unreadable=cfg.DATALOADER.ION_SKIP_UNREADABLE_IMAGES,
    )
