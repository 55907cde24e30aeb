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
Modules that cannot stop at a border (the trunk, the RPN) run once per group of images that pad to
the same size alone (:func:`size_groups`, :func:`backbone_per_size`, :func:`proposals_per_size`).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

__all__ = [
    "valid_cell_counts",
    "valid_cell_counts_of",
    "valid_cell_mask",
    "zero_outside_valid_cells",
    "padded_size",
    "size_groups",
    "backbone_per_size",
    "proposals_per_size",
]


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
        sizes = torch.stack(
            [torch.stack([torch.as_tensor(h), torch.as_tensor(w)]) for h, w in image_sizes]
        )
        limit = torch.stack([torch.as_tensor(height), torch.as_tensor(width)])
        counts = torch.minimum((sizes.to(device).long() + stride - 1) // stride, limit.to(device))
        return counts.view(-1, 2)
    counts = [
        (min(-(-int(h) // stride), height), min(-(-int(w) // stride), width))
        for h, w in image_sizes
    ]
    return torch.tensor(counts, dtype=torch.long, device=device).view(-1, 2)


def valid_cell_counts_of(
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


def zero_outside_valid_cells(
    x: Tensor, counts: Optional[Tensor], *, inplace: bool = False
) -> Tensor:
    """
    Zero the batch's padding: what every module that mixes cells does to its input or output.

    Args:
        x (Tensor): (N, C, H, W) batched feature map.
        counts (Tensor or None): (N, 2) valid rows and columns per image
            (:func:`valid_cell_counts`); None: every cell is valid.
        inplace (bool): fill ``x`` itself instead of a copy, e.g. a conv's output (whose bias
            must not reach the padding, and which the conv's backward does not need).

    Returns:
        Tensor: ``x`` with 0 outside each image's valid cells (``x`` itself when ``counts`` is
        None or ``inplace``).
    """
    if counts is None:
        return x
    outside = ~valid_cell_mask(counts, x.shape[-2], x.shape[-1])
    return x.masked_fill_(outside, 0.0) if inplace else x.masked_fill(outside, 0.0)


def padded_size(backbone: nn.Module, image_size: Tuple[int, int]) -> Tuple[int, int]:
    """The size Detectron2's preprocessing pads an image to when it is alone in its batch."""
    # Detectron2 after v0.6 also pads to the backbone's padding_constraints.
    constraints = getattr(backbone, "padding_constraints", None) or {}
    square_size = constraints.get("square_size", 0)
    if square_size > 0:
        return square_size, square_size
    divisor = constraints.get("size_divisibility", backbone.size_divisibility)
    height, width = (int(x) for x in image_size)
    if divisor > 1:
        height, width = (-(-x // divisor) * divisor for x in (height, width))
    return height, width


def size_groups(backbone: nn.Module, images: ImageList) -> Dict[Tuple[int, int], List[int]]:
    """
    The batch's image indices grouped by :func:`padded_size`, in order of first appearance;
    empty for a batch of one (a traced model must not turn its size into ints).
    """
    if len(images.image_sizes) == 1:
        return {}
    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, image_size in enumerate(images.image_sizes):
        groups.setdefault(padded_size(backbone, image_size), []).append(i)
    return groups


def backbone_per_size(backbone: nn.Module, images: ImageList) -> Dict[str, Tensor]:
    """
    ``backbone(images.tensor)``, but each group of :func:`size_groups` runs in its own pass on
    the crop of ``images.tensor`` to its size (what ``ImageList.from_tensors`` of the group
    gives, as the batch is padded with 0), and every feature map is zero-padded to the batch's
    size: an image's features are those it gets alone, and beyond them lie the zeros a
    consumer's zero padding would show it alone.
    """
    groups = size_groups(backbone, images)
    if len(groups) <= 1:
        return backbone(images.tensor)
    per_image: List[Dict[str, Tensor]] = [{} for _ in images.image_sizes]
    for (height, width), indices in groups.items():
        for name, feature in backbone(images.tensor[indices, :, :height, :width]).items():
            for k, i in enumerate(indices):
                per_image[i][name] = feature[k]
    return {name: _zero_pad_and_stack([f[name] for f in per_image]) for name in per_image[0]}


def proposals_per_size(
    proposal_generator: nn.Module,
    backbone: nn.Module,
    images: ImageList,
    features: Dict[str, Tensor],
    gt_instances: Optional[List[Instances]],
) -> Tuple[List[Instances], Dict[str, Tensor]]:
    """
    ``proposal_generator(images, features, gt_instances)``, run once per group of
    :func:`size_groups` on the crop of the images and features to the group's size. An image's
    proposals are then those of its own pass: anchors over another image's padding neither take
    its pre-NMS top-k slots nor, in training, its sampled negatives (the paper's single-image
    passes, section 4.1). Each group's losses are means over its images (Detectron2's RPN
    divides by the number of images); weighted by the groups' image counts they sum to the
    batch's mean.
    """
    groups = size_groups(backbone, images)
    if len(groups) <= 1:
        return proposal_generator(images, features, gt_instances)
    batch_height, batch_width = images.tensor.shape[-2:]
    num_images = len(images.image_sizes)
    proposals: List[Optional[Instances]] = [None] * num_images
    losses: Dict[str, Tensor] = {}
    for (height, width), indices in groups.items():
        group_images = ImageList(
            images.tensor[indices, :, :height, :width], [images.image_sizes[i] for i in indices]
        )
        # The cells of a height x width image on each map: exact for a stride that divides the
        # padded size, as the backbone's size_divisibility makes it.
        group_features = {
            name: x[indices, :, : -(-height * x.shape[-2] // batch_height)][
                ..., : -(-width * x.shape[-1] // batch_width)
            ]
            for name, x in features.items()
        }
        group_gt = None if gt_instances is None else [gt_instances[i] for i in indices]
        group_proposals, group_losses = proposal_generator(group_images, group_features, group_gt)
        for i, p in zip(indices, group_proposals):
            proposals[i] = p
        for name, value in group_losses.items():
            weighted = value * (len(indices) / num_images)
            losses[name] = losses[name] + weighted if name in losses else weighted
    return proposals, losses


def _zero_pad_and_stack(maps: List[Tensor]) -> Tensor:
    """Stack (C, H_i, W_i) maps into (N, C, max H_i, max W_i), zero-padded at bottom and right."""
    height = max(m.shape[-2] for m in maps)
    width = max(m.shape[-1] for m in maps)
    return torch.stack([F.pad(m, (0, width - m.shape[-1], 0, height - m.shape[-2])) for m in maps])
