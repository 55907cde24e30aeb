"""
The size rule of ion_d2's images: after the resize (``INPUT.MIN_SIZE_*`` / ``MAX_SIZE_*``, with
ion_d2's cap for a shorter edge of 0), an image's shorter side must be at least the trunk's
stride (:func:`ion_d2.data.dataset_check.input_stride`), below which its coarsest feature map
is empty. :class:`ion_d2.engine.IONPredictor` and ``tools/predict.py`` apply it, and so does the
dataset check before training (:mod:`ion_d2.data.dataset_check`) through :func:`resized_sizes`;
``tests/test_predict_inputs.py`` checks that the three agree.
"""

from typing import Optional, Tuple

import numpy as np

__all__ = ["resized_sizes", "size_problem"]


def resized_sizes(heights, widths, short_edge: int, max_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """
    The sizes of images after the resize, without decoding them.

    Args:
        heights, widths (array-like of int): the images' sizes.
        short_edge (int): the shorter edge to resize to (``MIN_SIZE_TEST``, or the smallest of
            ``MIN_SIZE_TRAIN``); 0 keeps an image's size up to ``max_size``.
        max_size (int): the longer-edge cap (``MAX_SIZE_TRAIN`` / ``MAX_SIZE_TEST``).

    Returns:
        (ndarray, ndarray): the resized heights and widths (int64).
    """
    # ResizeShortestEdge.get_output_shape (ion_d2's ResizeLongestEdgeCap for a short edge 0).
    heights = np.asarray(heights, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    short, long = np.minimum(heights, widths), np.maximum(heights, widths)
    if short_edge > 0:
        scale = short_edge / np.maximum(short, 1)
    else:
        scale = np.ones_like(short, dtype=np.float64)
    scale = np.minimum(scale, max_size / np.maximum(long, 1))
    return (
        np.floor(heights * scale + 0.5).astype(np.int64),
        np.floor(widths * scale + 0.5).astype(np.int64),
    )


def size_problem(
    height: int,
    width: int,
    *,
    short_edge: int,
    max_size: int,
    min_side: int,
    size_keys: str = "INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST",
) -> Optional[str]:
    """
    Why an image of ``height`` x ``width`` cannot be run, or None when it can.

    Args:
        height, width (int): the image's size.
        short_edge, max_size (int): the resize, as in :func:`resized_sizes`.
        min_side (int): the trunk's stride.
        size_keys (str): the config keys that set the resize, for the message.

    Returns:
        str or None: e.g. "2x700 (HxW) is 0x128 after resizing (INPUT.MIN_SIZE_TEST /
        MAX_SIZE_TEST), under the trunk's stride (16 px)".
    """
    new_h, new_w = (int(s[()]) for s in resized_sizes(height, width, short_edge, max_size))
    if min(height, width) >= 1 and min(new_h, new_w) >= min_side:
        return None
    return (
        f"{height}x{width} (HxW) is {new_h}x{new_w} after resizing ({size_keys}), under the "
        f"trunk's stride ({min_side} px)"
    )
