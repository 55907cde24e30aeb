"""
Context just outside the box from fine features (beyond the paper; docs/BENCHMARKS.md, "Context
just outside the box").

ION reads outside the box only at conv5's stride, through the IRNN, where a 2-px structure next
to the object is gone. :class:`IONLocalContextHead` is a small learned branch on a fine feature
(the input image itself, :data:`IMAGE_FEATURE`, or e.g. VGG16's conv2): the feature is reduced
by a 1x1 conv, each ROI's box enlarged
``factor`` times around its centre is pooled from it with ROIAlign to ``resolution x
resolution`` cells, a few 3x3 convs (2x2 max pooling between them) and a global max pool find
what is there, and a linear layer turns that into one score per class, which
:class:`~ion_d2.modeling.roi_heads.IONROIHeads` adds to the box predictor's class scores, before
the softmax, in training and at inference. The layer is zero-initialised, so the branch starts
by changing nothing. It is the nearest learned analogue of MR-CNN's contextual regions (Gidaris
and Komodakis, ICCV 2015), which pool fixed features over enlarged boxes.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from fvcore.nn import weight_init
from torch import nn

from .enlarged_boxes import enlarge_boxes
from .padding import valid_cell_counts_of, zero_outside_valid_cells

__all__ = [
    "IMAGE_FEATURE",
    "IONLocalContextHead",
    "build_ion_local_context",
    "local_context_loss",
    "matched_objects",
]

# The name under which IONRCNN gives the ROI heads its normalised, padded input batch (stride 1,
# one channel per MODEL.PIXEL_MEAN entry), when they read it: the finest feature there is.
IMAGE_FEATURE = "image"


class _MaxPool2x2(nn.MaxPool2d):
    """
    2x2/2 max pooling (ceil mode). Without autograd and on even sizes it takes one reshape and
    max, which gives the same values and, at 1000 ROIs, a fraction of the CPU kernel's time.
    """

    def __init__(self):
        super().__init__(kernel_size=2, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if (torch.is_grad_enabled() and x.requires_grad) or height % 2 or width % 2:
            return super().forward(x)
        return x.reshape(-1, x.shape[1], height // 2, 2, width // 2, 2).amax(dim=(3, 5))


class IONLocalContextHead(nn.Module):
    """
    Per-class scores from a fine feature over each box enlarged around its centre (see the
    module docstring). Only each image's valid cells are read (:mod:`ion_d2.modeling.padding`):
    the reduced map is zeroed outside them and followed by one zero row and column, so an
    enlarged box that reaches past its image reads zeros whatever else is in the batch.
    """

    def __init__(
        self,
        *,
        input_shape: ShapeSpec,
        num_classes: int,
        factor: float,
        resolution: int,
        reduce_dim: int,
        conv_dims: Sequence[int],
        norm: str = "",
    ):
        """
        Args:
            input_shape (ShapeSpec): channels and stride of the fine feature.
            num_classes (int): foreground classes; the branch scores num_classes + 1 (the last
                is background, as in :class:`FastRCNNOutputLayers`).
            factor (float): each box is enlarged this many times around its centre (>= 1).
            resolution (int): ROIAlign's output side over the enlarged box (>= 2).
            reduce_dim (int): channels of the 1x1 conv before pooling (>= 1).
            conv_dims (list[int]): output channels of each 3x3 conv after pooling (at least one).
            norm (str): "" (none) or "GN": GroupNorm after every 3x3 conv, in groups of
                ``gcd(32, channels)`` (per ROI, so a ROI's scores do not depend on the others).
        """
        super().__init__()
        conv_dims = list(conv_dims)
        if not factor >= 1.0:
            raise ValueError(
                f"MODEL.ION.LOCAL_CONTEXT.FACTOR={factor} must be >= 1: the boxes are enlarged "
                "that many times around their centres (3: one box side on every side)."
            )
        if resolution < 2 or reduce_dim < 1 or not conv_dims or min(conv_dims) < 1:
            raise ValueError(
                f"MODEL.ION.LOCAL_CONTEXT needs POOLER_RESOLUTION >= 2 (got {resolution}), "
                f"REDUCE_DIM >= 1 (got {reduce_dim}) and CONV_DIMS a non-empty list of "
                f"positive widths (got {conv_dims})."
            )
        if input_shape.stride is None or input_shape.channels is None:
            raise ValueError(
                f"The local-context feature needs a stride and channels: {input_shape}."
            )
        self.factor = float(factor)
        self.stride = int(input_shape.stride)
        if norm not in ("", "GN"):
            raise ValueError(
                f"MODEL.ION.LOCAL_CONTEXT.NORM={norm!r} is not supported; expected '' or 'GN'."
            )
        # No norm on the map-level 1x1 conv: GroupNorm there would average over the image and
        # its padding, so an ROI's scores would depend on the batch and the image's size.
        self.reduce = Conv2d(input_shape.channels, reduce_dim, kernel_size=1, activation=F.relu)
        self.pooler = ROIPooler(
            output_size=resolution,
            scales=(1.0 / self.stride,),
            sampling_ratio=2,
            pooler_type="ROIAlignV2",
        )
        layers = []
        in_dim = reduce_dim
        for k, dim in enumerate(conv_dims):
            if k > 0:
                layers.append(_MaxPool2x2())
            layers.append(
                Conv2d(
                    in_dim,
                    dim,
                    kernel_size=3,
                    padding=1,
                    bias=not norm,
                    norm=_group_norm(norm, dim),
                    activation=F.relu,
                )
            )
            in_dim = dim
        self.convs = nn.Sequential(*layers)
        for m in [self.reduce, *self.convs]:
            if isinstance(m, Conv2d):
                weight_init.c2_msra_fill(m)
        self.cls_score = nn.Linear(in_dim, num_classes + 1)
        nn.init.zeros_(self.cls_score.weight)
        nn.init.zeros_(self.cls_score.bias)

    def forward(
        self,
        feature: torch.Tensor,
        boxes: List[Boxes],
        image_sizes: Optional[List[Tuple[int, int]]] = None,
    ) -> torch.Tensor:
        """
        Args:
            feature (Tensor): (N, C, H, W) batched fine feature.
            boxes (list[Boxes]): per image, its R_i boxes in input-image pixels.
            image_sizes (list[tuple[int, int]] or None): (h, w) of each image before padding;
                None: every cell is valid.

        Returns:
            Tensor: (sum R_i, num_classes + 1) scores, to add to the class scores.
        """
        x = self.reduce(feature)
        counts = valid_cell_counts_of(image_sizes, self.stride, x)
        # Not in place: the ReLU's backward reads its output.
        x = zero_outside_valid_cells(x, counts)
        # One zero row and column after the map: sample points past an image's last valid cell
        # then interpolate towards 0 as they do inside a padded batch.
        x = F.pad(x, (0, 1, 0, 1))
        x = self.pooler([x], enlarge_boxes(boxes, self.factor))
        x = self.convs(x)
        x = torch.amax(x, dim=(2, 3))
        return self.cls_score(x)


def _group_norm(norm: str, channels: int) -> Optional[nn.Module]:
    return nn.GroupNorm(math.gcd(32, channels), channels) if norm == "GN" else None


def local_context_loss(
    scores: torch.Tensor, gt_classes: torch.Tensor, objects: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    The branch's own training signal: cross-entropy of its scores over the foreground classes
    alone, on the foreground ROIs, each object weighted once. The detector's classification
    loss averages over every sampled ROI (background three quarters of them), where a large
    object matches many more proposals than a small one; this one is about which object class
    each object is.

    Args:
        scores (Tensor): (R, K + 1) branch scores, background last.
        gt_classes (Tensor): (R,) each ROI's class, K for background.
        objects (Tensor or None): (R,) long, the object each ROI was matched to (any ids); a
            foreground ROI then weighs 1 / (its object's foreground ROIs), and the loss is the
            mean over objects. None: the mean over foreground ROIs.

    Returns:
        Tensor: scalar loss; 0 (with a gradient) when no ROI is foreground.
    """
    num_classes = scores.shape[1] - 1
    foreground = (gt_classes >= 0) & (gt_classes < num_classes)
    if not bool(foreground.any()):
        return scores.sum() * 0.0
    losses = F.cross_entropy(
        scores[foreground, :num_classes], gt_classes[foreground], reduction="none"
    )
    if objects is None:
        return losses.mean()
    _, which, counts = torch.unique(objects[foreground], return_inverse=True, return_counts=True)
    return (losses / counts[which].to(losses.dtype)).sum() / len(counts)


def matched_objects(proposals) -> torch.Tensor:
    """
    Per sampled ROI of all images, an id of the ground-truth object it was matched to (its
    image and its "gt_boxes" row): the ``objects`` of :func:`local_context_loss`.
    """
    ids = []
    offset = 0
    for p in proposals:
        _, inverse = torch.unique(p.gt_boxes.tensor, dim=0, return_inverse=True)
        ids.append(inverse + offset)
        offset += len(p)
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)


def build_ion_local_context(cfg, input_shape) -> Optional[IONLocalContextHead]:
    """
    The :class:`IONLocalContextHead` of ``MODEL.ION.LOCAL_CONTEXT``, or None when its
    IN_FEATURE is "" (off, the paper).

    Args:
        cfg: the config.
        input_shape (dict[str, ShapeSpec]): the features the ROI heads receive.
    """
    local = cfg.MODEL.ION.LOCAL_CONTEXT
    if not local.IN_FEATURE:
        return None
    if local.IN_FEATURE not in input_shape:
        raise ValueError(
            f"MODEL.ION.LOCAL_CONTEXT.IN_FEATURE={local.IN_FEATURE!r} is not a feature the "
            f"model produces; available: {sorted(input_shape)} ({IMAGE_FEATURE!r}: the input "
            "image, with MODEL.META_ARCHITECTURE 'IONRCNN'; for VGG16's conv2, add it to "
            "MODEL.ION.VGG16.OUT_FEATURES)."
        )
    return IONLocalContextHead(
        input_shape=input_shape[local.IN_FEATURE],
        num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
        factor=local.FACTOR,
        resolution=local.POOLER_RESOLUTION,
        reduce_dim=local.REDUCE_DIM,
        conv_dims=local.CONV_DIMS,
        norm=local.NORM,
    )
