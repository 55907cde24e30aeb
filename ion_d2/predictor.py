"""Reading images for inference without silent damage."""

import logging

import numpy as np
from detectron2.data.detection_utils import read_image
from PIL import Image, ImageFile

__all__ = ["read_image_file", "EIGHT_BIT_MODES"]

logger = logging.getLogger(__name__)

# PIL modes whose channels are 8-bit; detectron2's read_image converts them to RGB/BGR exactly.
# Others (16-bit "I;16", 32-bit "I", float "F") would be clipped to 0..255 by that conversion.
EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")


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
        ValueError: the image is not 8-bit (one of :data:`EIGHT_BIT_MODES`).
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
    return read_image(path, format=format)
