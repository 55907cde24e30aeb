"""
Selective-search object proposals (Uijlings et al., IJCV 2013) of one image.

Section 4.1 of the paper: "For PASCAL VOC we use the same pre-computed selective search boxes
from Fast R-CNN, and for COCO we use the boxes precomputed by Hosang et al." Section 4.5: "For all
experiments, we are using selective search for object proposals". Those files are not
distributed with ion_d2; :func:`selective_search_boxes` recomputes such boxes with OpenCV's
implementation (``cv2.ximgproc.segmentation``, in the ``opencv-contrib`` wheels) and
post-processes them as py-faster-rcnn loads proposal files: duplicates removed, boxes narrower or
lower than ``min_size`` pixels removed, the first ``top_k`` kept. OpenCV's implementation is not
the original MATLAB code of those files (its fast mode uses k = 150, 300, 450 for the initial
segmentation, for one), so the boxes are of the same kind but not the same boxes.
:mod:`ion_d2.data.selective_search_proposals` writes them for a whole dataset.

Selective search ranks its boxes (hierarchy level times a random number, as the paper of
Uijlings et al.); Detectron2 sorts each image's boxes by decreasing objectness logit and keeps
the first ``DATASETS.PRECOMPUTED_PROPOSAL_TOPK_*``, so the logit of the box of rank r is ``-r``
(:func:`rank_logits`). OpenCV draws that ranking from the C library's ``rand()``, which
:func:`selective_search_boxes` seeds (``srand``) with its ``image_seed``.
"""

import ctypes
import ctypes.util
import logging
import zlib
from dataclasses import dataclass
from typing import Any, Tuple

import numpy as np

__all__ = [
    "OPENCV_CONTRIB_INSTALL",
    "SelectiveSearchConfig",
    "require_ximgproc",
    "selective_search_boxes",
    "image_seed",
    "rank_logits",
]

logger = logging.getLogger(__name__)

#: How to get ``cv2.ximgproc``: the contrib wheel replaces the plain one (both provide ``cv2``).
OPENCV_CONTRIB_INSTALL = (
    "pip uninstall -y opencv-python-headless && "
    'pip install "opencv-contrib-python-headless<4.12"'
)

_MODES = ("fast", "quality")


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


def image_seed(seed: int, image_id: Any) -> int:
    """The ranking's seed for one image: a file then does not depend on the number of worker
    processes or on the order in which images are processed."""
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
