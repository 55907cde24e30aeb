"""Inference on images without silent damage: IONPredictor and a checked image reader."""

import os
from typing import Optional

import cv2
import numpy as np
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from PIL import Image, ImageFile

from ..data.dataset_check import input_stride
from ..data.file_check import EIGHT_BIT_MODES
from ..data.size_rule import size_problem
from ..data.transforms import cap_unresized_images
from .checkpoint import IONCheckpointer, UnreadableCheckpoint, describe_unreadable_checkpoint

__all__ = ["IONPredictor", "as_bgr_uint8", "read_image_file", "EIGHT_BIT_MODES"]


def read_image_file(path: str, format: str = "BGR") -> np.ndarray:
    """
    Read an image file as :func:`detectron2.data.detection_utils.read_image` does (EXIF
    orientation applied), after checking that the whole file decodes.

    OpenCV and PIL both return an image for a truncated JPEG, its missing part filled grey;
    here PIL decodes the file to its end with ``ImageFile.LOAD_TRUNCATED_IMAGES`` off, which
    raises on a truncated file.

    Args:
        path (str): an image file.
        format (str): "BGR" or "RGB".

    Returns:
        ndarray: (H, W, 3) uint8 image in ``format``.

    Raises:
        OSError: the file cannot be read, is not an image, or is truncated.
        ValueError: the image is not 8-bit (a PIL mode outside :data:`EIGHT_BIT_MODES`, or
            more than 8 bits per channel as OpenCV reads it, e.g. a 16-bit RGB PNG).
    """
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as image:
            if image.mode not in EIGHT_BIT_MODES:
                raise ValueError(
                    f"{path} is a PIL mode {image.mode!r} image; expected an 8-bit image (one of "
                    f"{EIGHT_BIT_MODES}). Convert it to 8-bit RGB first."
                )
            image.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    # PIL opens a 16-bit RGB PNG as 8-bit "RGB" (dropping the low bytes); OpenCV keeps the depth.
    unchanged = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if unchanged is not None and unchanged.dtype != np.uint8:
        raise ValueError(
            f"{path} is a {unchanged.dtype} image ({unchanged.dtype.itemsize * 8}-bit, "
            f"{unchanged.shape[2] if unchanged.ndim == 3 else 1} channels); expected an 8-bit "
            "image. Convert it to 8-bit first."
        )
    return read_image(path, format=format)


def as_bgr_uint8(image) -> np.ndarray:
    """
    Check an image for :class:`DefaultPredictor` (an (H, W, 3) BGR uint8 array, as
    ``cv2.imread`` returns) and make the two unambiguous conversions: a grey (H, W) or
    (H, W, 1) image is repeated to 3 channels, and a 4-channel (H, W, 4) BGRA image (``cv2.imread``
    with ``IMREAD_UNCHANGED``) loses its alpha channel.

    Raises:
        TypeError: ``image`` is None (a failed ``cv2.imread``) or not a numpy array.
        ValueError: it is empty, has another number of channels, or is not uint8 (float images
            in [0, 1] and 16-bit images are refused rather than guessed at).
    """
    if image is None:
        raise TypeError(
            "The image is None; cv2.imread returns None for a file it cannot read. Expected an "
            "(H, W, 3) uint8 BGR numpy array."
        )
    if not isinstance(image, np.ndarray):
        raise TypeError(f"Expected an (H, W, 3) uint8 BGR numpy array; got {type(image).__name__}.")
    if image.ndim not in (2, 3) or image.size == 0:
        raise ValueError(
            f"Expected a non-empty (H, W, 3) uint8 BGR image (or (H, W) grey); got shape "
            f"{image.shape}."
        )
    if image.dtype != np.uint8:
        low, high = (image.min(), image.max()) if image.size else (None, None)
        raise ValueError(
            f"Expected a uint8 image with values 0-255; got dtype {image.dtype} (values "
            f"{low}..{high}). Convert it first, e.g. (image * 255).round().astype(np.uint8) "
            "for a float image in [0, 1], or (image // 257).astype(np.uint8) for 16 bits."
        )
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels == 1:
        return np.repeat(image, 3, axis=2)
    if channels == 4:
        return np.ascontiguousarray(image[:, :, :3])
    if channels != 3:
        raise ValueError(
            f"Expected 3 (BGR), 1 (grey) or 4 (BGRA) channels; got shape {image.shape}."
        )
    return image


class IONPredictor(DefaultPredictor):
    """
    :class:`DefaultPredictor` that checks (and where unambiguous converts) its input with
    :func:`as_bgr_uint8`, and, for a config that keeps test images at their own size
    (``INPUT.MIN_SIZE_TEST: 0``), still caps their longer edge at ``INPUT.MAX_SIZE_TEST`` (the
    stock predictor would run a 4000x6000 photo at full size). An image whose shorter side after
    that resize is under the trunk's stride is refused, as the dataset check refuses it
    (:func:`ion_d2.data.size_rule.size_problem`). A local ``MODEL.WEIGHTS`` that
    is not a checkpoint (empty, truncated, not a torch file) raises
    :class:`UnreadableCheckpoint` naming it; no weights, weights holding NaN or inf, or
    weights that do not match the model (missing, unexpected or mis-shaped keys) raise
    :class:`UnusableWeights` naming them (:class:`IONCheckpointer` with ``strict``), unless
    ``MODEL.ION.ALLOW_PARTIAL_WEIGHTS`` (NaN and inf are refused even then).
    """

    def __init__(self, cfg):
        weights = cfg.MODEL.WEIGHTS
        if weights and "://" not in weights and os.path.exists(weights):
            problem = describe_unreadable_checkpoint(weights)
            if problem is not None:
                raise UnreadableCheckpoint(
                    f"MODEL.WEIGHTS {weights} {problem}; expected a checkpoint written by "
                    "torch.save (.pth) or a Detectron2 model-zoo .pkl."
                )
        # DefaultPredictor builds the model; it would load the weights with Detectron2's
        # checkpointer, which only logs what does not match, so they are loaded here instead.
        unloaded = cfg.clone()
        unloaded.defrost()
        unloaded.MODEL.WEIGHTS = ""
        super().__init__(unloaded)
        self.cfg = cfg.clone()
        strict = not cfg.MODEL.ION.ALLOW_PARTIAL_WEIGHTS
        IONCheckpointer(self.model, strict=strict).load(weights)
        self.aug = cap_unresized_images([self.aug])[0]
        self.min_side = input_stride(self.model.backbone)

    def size_problem(self, height: int, width: int) -> Optional[str]:
        """
        Why an image of ``height`` x ``width`` is too small for the model after this config's
        resize (:func:`ion_d2.data.size_rule.size_problem`), or None when it is not.
        """
        return size_problem(
            height,
            width,
            short_edge=self.cfg.INPUT.MIN_SIZE_TEST,
            max_size=self.cfg.INPUT.MAX_SIZE_TEST,
            min_side=self.min_side,
        )

    def __call__(self, original_image):
        """
        See :meth:`DefaultPredictor.__call__`; the image goes through :func:`as_bgr_uint8`.

        Raises:
            ValueError: the image is too small for the trunk after resizing (:meth:`size_problem`).
        """
        image = as_bgr_uint8(original_image)
        problem = self.size_problem(*image.shape[:2])
        if problem is not None:
            raise ValueError(f"Image too small for the model: {problem}.")
        return super().__call__(image)
