"""
Which cells of a batched feature map belong to each image and which to the batch's padding.

Detectron2 pads the images of a batch to one tensor (:class:`ImageList`). A module that mixes
information across cells (the IRNN's scans, stacked convs, a global average, the seg head's
deconvolution) would carry the padding's activations into the image, so an image's output would
depend on what else is in its batch. The paper has no padding: "We use 4 images per mini-batch,
implemented as 4 forward/backward passes of single image mini-batches" (section 4.1). Such
modules therefore restrict themselves to each image's *valid cells*: at a feature of stride
``s``, image ``i`` of size ``(h_i, w_i)`` before padding covers the top-left
``ceil(h_i / s) x ceil(w_i / s)`` cells (every cell that sees at least one of its pixels).
"""

from typing import Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["valid_cell_counts", "valid_cell_mask"]


def valid_cell_counts(
    image_sizes: Sequence[Tuple[int, int]],
    stride: int,
    height: int,
    width: int,
    device: torch.device,
) -> Tensor:
    """
    Args:
        image_sizes (list[tuple[int, int]]): (h, w) of each image before padding
            (``ImageList.image_sizes``).
        stride (int): the feature's stride in pixels.
        height, width (int): the batched feature map's size; counts are clipped to it.
        device (torch.device): where to put the result.

    Returns:
        Tensor: (N, 2) long, ``(ceil(h_i / stride), ceil(w_i / stride))`` per image.
    """
    if stride < 1:
        raise ValueError(f"valid_cell_counts needs a stride >= 1, got {stride}.")
    counts = [
        (min(-(-int(h) // stride), height), min(-(-int(w) // stride), width))
        for h, w in image_sizes
    ]
    return torch.tensor(counts, dtype=torch.long, device=device).view(-1, 2)


def valid_cell_mask(counts: Tensor, height: int, width: int) -> Tensor:
    """
    Args:
        counts (Tensor): (N, 2) valid rows and columns per image (:func:`valid_cell_counts`).
        height, width (int): the batched feature map's size.

    Returns:
        Tensor: (N, 1, height, width) bool, True on each image's valid cells.
    """
    rows = torch.arange(height, device=counts.device)[None, :] < counts[:, :1]
    cols = torch.arange(width, device=counts.device)[None, :] < counts[:, 1:]
    return (rows[:, :, None] & cols[:, None, :])[:, None]
