"""
Selective-search object proposals (Uijlings et al., IJCV 2013) for any registered dataset, written
in Detectron2's precomputed-proposal file format.

Section 4.1 of the paper: "For PASCAL VOC we use the same pre-computed selective search boxes
from Fast R-CNN, and for COCO we use the boxes precomputed by Hosang et al." Section 4.5: "For all
experiments, we are using selective search for object proposals". Those files are not
distributed with ion_d2; :func:`compute_selective_search_proposals` recomputes such boxes with
OpenCV's implementation (``cv2.ximgproc.segmentation``, in the ``opencv-contrib`` wheels) and
post-processes them as py-faster-rcnn loads proposal files: duplicates removed, boxes narrower or
lower than ``min_size`` pixels removed, the first ``top_k`` kept. OpenCV's implementation is not
the original MATLAB code of those files (its fast mode uses k = 150, 300, 450 for the initial
segmentation, for one), so the boxes are of the same kind but not the same boxes.

The file is a pickle that ``detectron2.data.load_proposals_into_dataset`` reads
(``DATASETS.PROPOSAL_FILES_TRAIN/TEST`` with ``MODEL.LOAD_PROPOSALS``)::

    {"ids": [image_id, ...],                  # each dataset dict's "image_id", in dataset order
     "boxes": [float32 array (N_i, 4), ...],  # XYXY_ABS in the image's own pixels
     "objectness_logits": [float32 array (N_i,), ...],
     "bbox_mode": BoxMode.XYXY_ABS.value,
     "ion_d2_selective_search": {...}}        # how the file was made (Detectron2 ignores it)

Detectron2 matches proposals to images by ``str(image_id)``, so one file serves every dataset
registered over the same images (e.g. "voc_2007_trainval" and a copy of it with segmentation
labels). Selective search ranks its boxes (hierarchy level times a random number, as the paper
of Uijlings et al.); Detectron2 sorts each image's boxes by decreasing objectness logit and keeps
the first ``DATASETS.PRECOMPUTED_PROPOSAL_TOPK_*``, so the logit of the box of rank r is ``-r``.

OpenCV draws that ranking from the C library's ``rand()``; each image re-seeds it
(``srand``) from ``seed`` and its ``image_id``, so a file does not depend on the number of
worker processes or on the order in which images are processed.
"""

import ctypes
import ctypes.util
import json
import logging
import multiprocessing
import os
import pickle
import re
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode
from tqdm import tqdm

__all__ = [
    "OPENCV_CONTRIB_INSTALL",
    "SelectiveSearchConfig",
    "require_ximgproc",
    "selective_search_boxes",
    "rank_logits",
    "compute_selective_search_proposals",
    "default_proposal_file",
]

logger = logging.getLogger(__name__)

#: How to get ``cv2.ximgproc``: the contrib wheel replaces the plain one (both provide ``cv2``).
OPENCV_CONTRIB_INSTALL = (
    "pip uninstall -y opencv-python-headless && "
    'pip install "opencv-contrib-python-headless<4.12"'
)

_MODES = ("fast", "quality")
_FILE_FORMAT = 1


@dataclass(frozen=True)
class SelectiveSearchConfig:
    """
    How proposals are computed; stored in the output file and in the work folder, so that a
    resumed run never mixes boxes computed with different settings.

    Attributes:
        mode (str): "fast" (``switchToSelectiveSearchFast``: HSV and Lab, 3 values of k, 2
            similarity strategies; R-CNN's boxes, which Fast R-CNN reused, came from the fast
            mode of the original code) or
            "quality" (``switchToSelectiveSearchQuality``: 5 colour spaces, 5 values of k, 4
            strategies; slower and more boxes).
        top_k (int): boxes kept per image, in selective search's rank order (the paper:
            "evaluate 2000 proposed regions of interest"; py-faster-rcnn keeps 2000).
        max_size (int): if > 0, images whose longer side exceeds it are downscaled to it before
            selective search (which is slow on large images) and the boxes scaled back to the
            image's own pixels; 0 runs on the original image.
        min_size (float): boxes narrower or lower than this many pixels of the original image
            are dropped (py-faster-rcnn drops proposals under 2 px).
        seed (int): seed of selective search's random ranking, combined with each image id.
    """

    mode: str = "fast"
    top_k: int = 2000
    max_size: int = 0
    min_size: float = 2.0
    seed: int = 0

    def __post_init__(self):
        if self.mode not in _MODES:
            raise ValueError(f"mode={self.mode!r}; expected one of {_MODES}.")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}; expected a positive number of boxes.")
        if self.max_size < 0:
            raise ValueError(f"max_size={self.max_size}; expected 0 (no resizing) or > 0 px.")
        if self.min_size < 0:
            raise ValueError(f"min_size={self.min_size}; expected >= 0 px.")


def require_ximgproc():
    """
    Returns:
        module: ``cv2``, checked to have ``cv2.ximgproc.segmentation``.

    Raises:
        ImportError: naming the wheel that provides it and the command that installs it.
    """
    import cv2

    if not hasattr(getattr(cv2, "ximgproc", None), "segmentation"):
        raise ImportError(
            f"Selective search needs cv2.ximgproc, which OpenCV's contrib wheels provide; the "
            f"installed cv2 {cv2.__version__} ({cv2.__file__}) has none. Replace the plain wheel "
            f"with the contrib one (both install `cv2`, so keep only one): "
            f"`{OPENCV_CONTRIB_INSTALL}`; to have ion_d2 require it, reinstall ion_d2 with "
            "`ION_D2_OPENCV=contrib pip install -e .` (`make setup` does both)."
        )
    return cv2


_srand = None


def _seed_c_rand(seed: int) -> None:
    """Seed the C library's ``rand()``, which OpenCV's selective search ranks boxes with."""
    global _srand
    if _srand is None:
        candidates = [None, ctypes.util.find_library("c"), ctypes.util.find_library("msvcrt")]
        for name in candidates:
            try:
                _srand = ctypes.CDLL(name).srand
                break
            except (OSError, TypeError, AttributeError):
                continue
        else:
            _srand = False
            logger.warning(
                "Cannot reach the C library's srand(); the order of selective-search boxes "
                "(and so which boxes top_k keeps) may differ from run to run."
            )
    if _srand:
        _srand(ctypes.c_uint(seed))


def _image_seed(seed: int, image_id: Any) -> int:
    return zlib.crc32(f"{seed}/{image_id}".encode("utf-8"))


def rank_logits(num_boxes: int) -> np.ndarray:
    """Objectness logits of ranked boxes: ``-r`` for rank ``r``, so that sorting by decreasing
    logit (as Detectron2 does) keeps the rank order."""
    return np.arange(0, -num_boxes, -1, dtype=np.float32)


def _postprocess(
    rects: np.ndarray, scale: Tuple[float, float], image_size: Tuple[int, int], config
) -> np.ndarray:
    """OpenCV's (x, y, w, h) rects on the resized image -> XYXY boxes on the original image,
    without duplicates and small boxes, at most top_k, in rank order."""
    height, width = image_size
    rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    sx, sy = scale
    boxes = np.stack(
        [
            rects[:, 0] * sx,
            rects[:, 1] * sy,
            (rects[:, 0] + rects[:, 2]) * sx,
            (rects[:, 1] + rects[:, 3]) * sy,
        ],
        axis=1,
    )
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    boxes = boxes.astype(np.float32)
    # Keep the first (best-ranked) copy of each box.
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    sizes = boxes[:, 2:] - boxes[:, :2]
    boxes = boxes[(sizes >= config.min_size).all(axis=1)]
    return np.ascontiguousarray(boxes[: config.top_k])


def selective_search_boxes(
    image: np.ndarray, config: SelectiveSearchConfig, *, image_seed: int = 0
) -> np.ndarray:
    """
    Args:
        image (ndarray): HxWx3 uint8 BGR image.
        config (SelectiveSearchConfig): how to search.
        image_seed (int): seed of the ranking's random numbers.

    Returns:
        ndarray: float32 (N, 4) XYXY_ABS boxes in ``image``'s pixels, best-ranked first, with
        N <= ``config.top_k``.
    """
    cv2 = require_ximgproc()
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"Expected an HxWx3 uint8 BGR image, got shape {image.shape} dtype {image.dtype}."
        )
    height, width = image.shape[:2]
    search_image, scale = image, (1.0, 1.0)
    if config.max_size > 0 and max(height, width) > config.max_size:
        ratio = config.max_size / max(height, width)
        new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
        search_image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
        scale = (width / new_w, height / new_h)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(search_image))
    if config.mode == "fast":
        search.switchToSelectiveSearchFast()
    else:
        search.switchToSelectiveSearchQuality()
    _seed_c_rand(image_seed)
    rects = search.process()
    return _postprocess(rects, scale, (height, width), config)


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
    boxes = selective_search_boxes(image, config, image_seed=_image_seed(config.seed, image_id))
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
