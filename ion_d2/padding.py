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

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["valid_cell_counts", "valid_cells_of", "valid_cell_mask", "zero_outside_valid_cells"]


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
    if torch.jit.is_tracing():
        # The sizes are traced values (ImageList.image_sizes holds tensors then): int() and
        # torch.tensor() would keep the traced image's counts as constants.
        sizes = torch.stack([torch.stack([torch.as_tensor(h), torch.as_tensor(w)]) for h, w in image_sizes])
        limit = torch.stack([torch.as_tensor(height), torch.as_tensor(width)])
        counts = torch.minimum((sizes.to(device).long() + stride - 1) // stride, limit.to(device))
        return counts.view(-1, 2)
    counts = [
        (min(-(-int(h) // stride), height), min(-(-int(w) // stride), width))
        for h, w in image_sizes
    ]
    return torch.tensor(counts, dtype=torch.long, device=device).view(-1, 2)


def valid_cells_of(
    image_sizes: Optional[Sequence[Tuple[int, int]]], stride: int, x: Tensor
) -> Optional[Tensor]:
    """
    Args:
        image_sizes (list[tuple[int, int]] or None): (h, w) of each image before padding.
        stride (int): the feature's stride in pixels.
        x (Tensor): the (N, C, H, W) batched feature.

    Returns:
        Tensor or None: :func:`valid_cell_counts` of ``x``; None without sizes or when every
        image covers the whole map (then there is no padding to ignore, and nothing to pay).
    """
    if image_sizes is None:
        return None
    if len(image_sizes) != x.shape[0]:
        raise ValueError(
            f"Got {len(image_sizes)} image sizes for a batch of {x.shape[0]} feature maps; "
            "expected one (h, w) per image."
        )
    height, width = x.shape[-2:]
    if torch.jit.is_tracing():
        # Whether the image covers the whole map depends on its size: always mask in a trace
        # (the mask of a covering image is all True, so the output is the same).
        return valid_cell_counts(image_sizes, stride, height, width, x.device)
    if all(-(-h // stride) >= height and -(-w // stride) >= width for h, w in image_sizes):
        return None
    return valid_cell_counts(image_sizes, stride, height, width, x.device)


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


def zero_outside_valid_cells(x: Tensor, counts: Optional[Tensor]) -> Tensor:
    """
    Args:
        x (Tensor): (N, C, H, W) batched feature map.
        counts (Tensor or None): (N, 2) valid rows and columns per image
            (:func:`valid_cell_counts`); None: every cell is valid.

    Returns:
        Tensor: ``x`` with 0 outside each image's valid cells (``x`` itself when ``counts`` is
        None).
    """
    if counts is None:
        return x
    return x.masked_fill(~valid_cell_mask(counts, x.shape[-2], x.shape[-1]), 0.0)
