"""
Selective-search proposals for every image of a registered dataset, written in Detectron2's
precomputed-proposal file format; the search itself is :mod:`ion_d2.data.selective_search`.

The file is a pickle that ``detectron2.data.load_proposals_into_dataset`` reads
(``DATASETS.PROPOSAL_FILES_TRAIN/TEST`` with ``MODEL.LOAD_PROPOSALS``)::

    {"ids": [image_id, ...],                  # each dataset dict's "image_id", in dataset order
     "boxes": [float32 array (N_i, 4), ...],  # XYXY_ABS in the image's own pixels
     "objectness_logits": [float32 array (N_i,), ...],
     "bbox_mode": BoxMode.XYXY_ABS.value,
     "ion_d2_selective_search": {...}}        # how the file was made (Detectron2 ignores it)

Detectron2 matches proposals to images by ``str(image_id)``, so one file serves every dataset
registered over the same images (e.g. "voc_2007_trainval" and a copy of it with segmentation
labels). Each image is searched with its own seed (:func:`image_seed`) in one of several worker
processes, its boxes cached as they come, so that an interrupted run resumes where it stopped.
"""

import json
import logging
import multiprocessing
import os
import pickle
import re
import time
import zlib
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode
from tqdm import tqdm

from .selective_search import (
    SelectiveSearchConfig,
    image_seed,
    rank_logits,
    require_ximgproc,
    selective_search_boxes,
)

__all__ = ["compute_selective_search_proposals", "default_proposal_file"]

logger = logging.getLogger(__name__)

_FILE_FORMAT = 1


def _cache_path(work_dir: str, image_id: Any) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(image_id))[:80]
    return os.path.join(work_dir, f"{safe}-{zlib.crc32(str(image_id).encode()):08x}.npy")


def _atomic_save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _process_image(task: Tuple[Any, str, str, Dict[str, Any]]) -> int:
    """Worker: search one image and cache its boxes. Returns the number of boxes."""
    image_id, file_name, cache_file, config_dict = task
    config = SelectiveSearchConfig(**config_dict)
    image = np.ascontiguousarray(read_image(file_name, format="BGR"))
    boxes = selective_search_boxes(image, config, image_seed=image_seed(config.seed, image_id))
    _atomic_save(cache_file, boxes)
    return len(boxes)


def _init_worker() -> None:
    # One thread per process: the processes are the parallelism.
    require_ximgproc().setNumThreads(1)


def _check_work_dir(work_dir: str, params: Dict[str, Any]) -> None:
    os.makedirs(work_dir, exist_ok=True)
    params_file = os.path.join(work_dir, "params.json")
    if os.path.exists(params_file):
        with open(params_file) as f:
            previous = json.load(f)
        if previous != params:
            raise ValueError(
                f"The work folder {work_dir} holds boxes computed with {previous}, not {params}; "
                "delete it or pass another work folder."
            )
    else:
        with open(params_file, "w") as f:
            json.dump(params, f, indent=2)


def _run_tasks(tasks: Sequence[tuple], workers: int, progress: bool, total: int) -> None:
    bar = tqdm(
        total=total,
        initial=total - len(tasks),
        desc="selective search",
        unit="img",
        disable=not progress,
    )
    try:
        if workers <= 1 or len(tasks) <= 1:
            cv2 = require_ximgproc()
            threads = cv2.getNumThreads()
            cv2.setNumThreads(1)
            try:
                for task in tasks:
                    _process_image(task)
                    bar.update(1)
            finally:
                cv2.setNumThreads(threads)
        else:
            with multiprocessing.get_context().Pool(workers, initializer=_init_worker) as pool:
                for _ in pool.imap_unordered(_process_image, tasks):
                    bar.update(1)
    finally:
        bar.close()


def _read_existing(output_file: str) -> Optional[Dict[str, Any]]:
    with open(output_file, "rb") as f:
        data = pickle.load(f)
    return data.get("ion_d2_selective_search") if isinstance(data, dict) else None


def default_proposal_file(dataset_name: str) -> str:
    """``$DETECTRON2_DATASETS/ss_proposals/<dataset_name>.pkl`` (``$DETECTRON2_DATASETS``
    defaults to "datasets", as for Detectron2's builtin datasets); the paper's configs read
    these paths."""
    root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    return os.path.join(root, "ss_proposals", f"{dataset_name}.pkl")


def compute_selective_search_proposals(
    dataset_name: str,
    output_file: str,
    *,
    config: SelectiveSearchConfig = SelectiveSearchConfig(),
    work_dir: Optional[str] = None,
    workers: int = 1,
    progress: bool = True,
    keep_work_dir: bool = False,
) -> str:
    """
    Compute selective-search proposals for every image of a registered dataset and write them
    as a Detectron2 proposal file.

    Each image's boxes are cached in ``work_dir`` as they are computed; a run that was
    interrupted continues where it stopped when called again with the same arguments, and the
    file is assembled (atomically) once every image is done. An existing ``output_file`` made
    with the same dataset and config is kept as it is.

    Args:
        dataset_name (str): a name registered in ``DatasetCatalog``.
        output_file (str): the pickle to write.
        config (SelectiveSearchConfig): how to search.
        work_dir (str or None): per-image cache; None means ``output_file + ".work"``.
        workers (int): processes searching images in parallel (each with one OpenCV thread).
        progress (bool): show a tqdm progress bar.
        keep_work_dir (bool): keep the per-image cache after writing the file.

    Returns:
        str: ``output_file``.
    """
    require_ximgproc()
    params = {"format": _FILE_FORMAT, "dataset": dataset_name, "config": asdict(config)}
    if os.path.exists(output_file):
        previous = _read_existing(output_file)
        if previous != params:
            raise ValueError(
                f"{output_file} exists and was made with {previous}, not {params}; delete it or "
                "choose another output file."
            )
        logger.info(f"{output_file} already holds these proposals; not computing them again.")
        return output_file

    dicts = DatasetCatalog.get(dataset_name)
    ids = _image_ids(dicts, dataset_name)
    work_dir = output_file + ".work" if work_dir is None else work_dir
    _check_work_dir(work_dir, params)
    config_dict = asdict(config)
    tasks = [
        (d["image_id"], d["file_name"], _cache_path(work_dir, d["image_id"]), config_dict)
        for d in dicts
        if not os.path.exists(_cache_path(work_dir, d["image_id"]))
    ]
    logger.info(
        f"Selective search ({config.mode}) on {len(tasks)} of {len(dicts)} images of "
        f"{dataset_name!r} with {workers} worker(s); {len(dicts) - len(tasks)} already in "
        f"{work_dir}."
    )
    start = time.perf_counter()
    _run_tasks(tasks, workers, progress, len(dicts))
    if tasks:
        seconds = time.perf_counter() - start
        logger.info(
            f"{len(tasks)} images in {seconds:.1f} s: "
            f"{len(tasks) / seconds / max(1, workers):.2f} images/s per process."
        )
    _write_proposal_file(output_file, ids, [_cache_path(work_dir, i) for i in ids], params)
    if not keep_work_dir:
        for image_id in ids:
            os.remove(_cache_path(work_dir, image_id))
        os.remove(os.path.join(work_dir, "params.json"))
        for name in os.listdir(work_dir):
            if name.endswith(".tmp"):  # left by an interrupted run
                os.remove(os.path.join(work_dir, name))
        if not os.listdir(work_dir):
            os.rmdir(work_dir)
    return output_file


def _image_ids(dicts: List[Dict[str, Any]], dataset_name: str) -> List[Any]:
    ids = [d.get("image_id") for d in dicts]
    if any(i is None for i in ids):
        raise ValueError(
            f"Dataset {dataset_name!r} has dicts without 'image_id'; proposal files are matched "
            "to images by it."
        )
    seen = set()
    for i in ids:
        if str(i) in seen:
            raise ValueError(
                f"Dataset {dataset_name!r} has image_id {i!r} more than once; proposal files "
                "need one entry per image id."
            )
        seen.add(str(i))
    return ids


def _write_proposal_file(
    output_file: str, ids: List[Any], cache_files: List[str], params: Dict[str, Any]
) -> None:
    boxes = [np.load(path) for path in cache_files]
    data = {
        "ids": ids,
        "boxes": boxes,
        "objectness_logits": [rank_logits(len(b)) for b in boxes],
        "bbox_mode": BoxMode.XYXY_ABS.value,
        "ion_d2_selective_search": params,
    }
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    tmp = f"{output_file}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, output_file)
    counts = [len(b) for b in boxes]
    logger.info(
        f"Wrote {output_file}: {len(ids)} images, {np.mean(counts):.0f} boxes per image "
        f"(min {min(counts)}, max {max(counts)})."
    )
