"""ION's semantic segmentation regularizer (section 3.2, Figure 3, Table 6).

During training ION adds a per-pixel softmax loss on the context features: "we add the
deconvolution and crop layer as implemented by Long et al. The deconvolution upsamples by 16x
with a 32x32 kernel, and we add an extra softmax loss layer with a weight of 1". The head is
dropped at test time, so it changes no detection output and costs no inference time.
"""

from typing import Dict, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .padding import valid_cell_counts, zero_outside_valid_cells

__all__ = [
    "IONSegRegularizerHead",
    "bilinear_tent",
    "bilinear_upsampling_kernel",
    "pixel_cross_entropy",
    "tent_matrix",
]


def bilinear_tent(kernel_size: int) -> torch.Tensor:
    """
    The 1D tent ``1 - |k - center| / factor`` of FCN's ``upsample_filt`` (Caffe's "bilinear"
    filler), of which :func:`bilinear_upsampling_kernel` is the outer product.

    Args:
        kernel_size (int): length of the tent; 2 * stride for an upsampling by ``stride``.

    Returns:
        Tensor: (kernel_size,) float32.
    """
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    k = torch.arange(kernel_size, dtype=torch.float32)
    return 1 - (k - center).abs() / factor


def bilinear_upsampling_kernel(kernel_size: int) -> torch.Tensor:
    """
    The 2D bilinear interpolation kernel of FCN's ``upsample_filt`` (Caffe's "bilinear" filler).

    Args:
        kernel_size (int): side of the square kernel; 2 * stride for an upsampling by ``stride``.

    Returns:
        Tensor: (kernel_size, kernel_size) float32 kernel, the outer product of the 1D tent
        ``1 - |k - center| / factor`` (:func:`bilinear_tent`).
    """
    tent = bilinear_tent(kernel_size)
    return tent[:, None] * tent[None, :]


def tent_matrix(
    length: int, cells: int, stride: int, offset: int, tent: torch.Tensor
) -> torch.Tensor:
    """
    The deconvolution with a separable kernel along one axis, as a matrix: a transposed conv
    with stride ``stride`` and padding ``offset`` writes cell ``y`` times ``tent[k]`` to output
    ``stride * y + k - offset``, so output ``i`` is ``sum_y M[i, y] * x[y]`` with
    ``M[i, y] = tent[i + offset - stride * y]`` where that index lies in the tent, else 0.

    Returns:
        Tensor: (length, cells), ``tent``'s dtype and device.
    """
    i = torch.arange(length, device=tent.device)[:, None]
    k = i + offset - stride * torch.arange(cells, device=tent.device)[None, :]
    inside = (k >= 0) & (k < tent.numel())
    return torch.where(inside, tent[k.clamp(0, tent.numel() - 1)], tent.new_zeros(()))


def pixel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_value: int):
    """
    ``F.cross_entropy(logits, targets, reduction="none", ignore_index=ignore_value)``: each
    pixel's softmax loss over the K classes of (N, K, H, W) ``logits``, 0 where the (N, H, W)
    ``targets`` hold ``ignore_value``; equal up to float rounding (tests/test_seg_head.py).

    Computed one class plane at a time (:class:`_PixelCrossEntropy`): no (N, K, H, W) temporary
    in the forward pass and only the logits' gradient in the backward, where ``cross_entropy``
    allocates log_softmax's output and two gradients of that size and fills one with zeros (at
    the paper's scale, 21 x 608 x 1008 logits: 31-41 against 54-66 ms forward and backward on
    the project's 2-core Xeon, issue 27).

    Raises:
        ValueError: a target that is neither ``ignore_value`` nor in ``[0, K)``.
    """
    labelled = targets != ignore_value
    picks = torch.where(labelled, targets, torch.zeros_like(targets))
    if picks.numel() and not torch.jit.is_tracing():
        low, high = int(picks.min()), int(picks.max())
        if low < 0 or high >= logits.shape[1]:
            bad = low if low < 0 else high
            raise ValueError(
                f"Segmentation target {bad} is not a class index in [0, {logits.shape[1] - 1}] "
                f"nor the ignore value {ignore_value}."
            )
    return _PixelCrossEntropy.apply(logits, picks.unsqueeze(1), labelled)


def _logsumexp_over_classes(logits: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(logits, dim=1)`` of (N, K, H, W) ``logits``, one class plane at a
    time: no (N, K, H, W) temporary (torch.logsumexp makes two; 40 against 17 ms at the
    paper's scale)."""
    top = logits[:, 0].clone()
    for c in range(1, logits.shape[1]):
        torch.maximum(top, logits[:, c], out=top)
    total = torch.zeros_like(top)
    term = torch.empty_like(top)
    for c in range(logits.shape[1]):
        torch.sub(logits[:, c], top, out=term)
        total.add_(term.exp_())
    return total.log_().add_(top)


class _PixelCrossEntropy(torch.autograd.Function):
    """:func:`pixel_cross_entropy`'s losses (forward) and the logits' gradient (backward):
    ``(softmax(logits) - onehot(target)) * grad`` per pixel, written plane by plane into one
    new tensor."""

    @staticmethod
    def forward(ctx, logits, picks, labelled):
        lse = _logsumexp_over_classes(logits)
        losses = lse - logits.gather(1, picks).squeeze(1)
        losses.masked_fill_(~labelled, 0.0)
        ctx.save_for_backward(logits, lse, picks, labelled)
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_losses):
        logits, lse, picks, labelled = ctx.saved_tensors
        weights = grad_losses * labelled
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for c in range(logits.shape[1]):
            plane = grad[:, c]
            torch.sub(logits[:, c], lse, out=plane)
            plane.exp_().mul_(weights)
        grad.scatter_add_(1, picks, -weights.unsqueeze(1))
        return grad, None, None


@SEM_SEG_HEADS_REGISTRY.register()
class IONSegRegularizerHead(nn.Module):
    """
    FCN-style segmentation head on one feature map (section 3.2, Table 6): a 1x1 score conv to
    ``num_classes`` maps, a deconvolution that upsamples by the feature's stride ``s`` with a
    ``2s x 2s`` bilinear kernel, FCN's crop back to the image, and a per-pixel softmax loss.

    Geometry of the crop. A feature with stride ``s`` (even) made by padded convs and 2x2/2
    poolings has its cell ``x`` centred on image coordinate ``s * x + (s - 1) / 2`` (pixel ``i``
    centred on ``i``). A transposed conv with kernel ``2s``, stride ``s`` and no padding writes
    cell ``x`` centred on output coordinate ``s * x + (2s - 1) / 2``. The two differ by
    ``s / 2``, so cropping the ``(h + 1) * s`` deconv output from offset ``s / 2`` (8 for conv5
    or context; FCN's Crop layer derives its offsets from the same mapping) aligns pixel
    centres. With the bilinear kernel, image
    pixel ``i`` then gets ``sum_x f[x] * max(0, 1 - |i - s * x - (s - 1) / 2| / s)``: linear
    interpolation between cell centres, i.e. ``F.interpolate(..., align_corners=False)``
    wherever a pixel lies between two cell centres. A constant map therefore comes out constant
    on pixels ``s / 2 ... s * (h - 1) + s / 2 - 1``; the outer half cells fade towards zero, as
    in FCN.

    Given the images' sizes, the scores outside each image's valid cells
    (:mod:`ion_d2.modeling.padding`) are set to 0 before upsampling: the score conv's bias at the
    batch's padding would otherwise bleed into the image's border pixels through the 2s-wide
    kernel, while an image alone has nothing beyond its edge.

    The deconvolution is per class (``groups=num_classes``), which equals FCN's initialisation
    of a full deconv with the bilinear kernel on its diagonal. As in FCN, whose final upsampling
    layer is fixed to bilinear interpolation (lr_mult 0), it is not learned unless
    ``learn_upsampling`` is set. The score conv is zero-initialised, as FCN does for its
    class-scoring layer.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_feature: str,
        num_classes: int,
        ignore_value: int = 255,
        loss_weight: float = 1.0,
        learn_upsampling: bool = False,
    ):
        """
        Args:
            input_shape (dict[str, ShapeSpec]): shapes of all available features; only
                ``in_feature`` is read. Its stride must be an even number.
            in_feature (str): the feature to segment from (section 3.2: "context").
            num_classes (int): number of labels, background included (K + 1 for K object
                categories).
            ignore_value (int): label of pixels with no loss (crowds, padding, unlabelled
                images); must not be a class index.
            loss_weight (float): weight of the loss (section 3.2: 1).
            learn_upsampling (bool): whether the bilinear deconvolution is trained.
        """
        super().__init__()
        if in_feature not in input_shape:
            raise ValueError(
                f"IONSegRegularizerHead: in_feature {in_feature!r} is not an available feature; "
                f"available: {sorted(input_shape)}."
            )
        if num_classes < 1:
            raise ValueError(f"IONSegRegularizerHead: num_classes must be >= 1, got {num_classes}.")
        if 0 <= ignore_value < num_classes:
            raise ValueError(
                f"IONSegRegularizerHead: ignore_value {ignore_value} is a class index; use a "
                f"value outside [0, {num_classes - 1}] (e.g. 255)."
            )
        shape = input_shape[in_feature]
        stride = shape.stride
        if stride is None or stride < 2 or stride % 2 != 0:
            raise ValueError(
                f"IONSegRegularizerHead: feature {in_feature!r} has stride {stride}; the "
                "deconvolution and crop need an even stride >= 2 (e.g. 16 for conv5 / context)."
            )

        self.in_feature = in_feature
        self.stride = stride
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight

        self.score = Conv2d(shape.channels, num_classes, kernel_size=1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

        self.upsample = nn.ConvTranspose2d(
            num_classes,
            num_classes,
            kernel_size=2 * stride,
            stride=stride,
            groups=num_classes,
            bias=False,
        )
        with torch.no_grad():
            self.upsample.weight.copy_(
                bilinear_upsampling_kernel(2 * stride).expand_as(self.upsample.weight)
            )
        self.upsample.weight.requires_grad_(learn_upsampling)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        in_features = list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES)
        if len(in_features) != 1:
            raise ValueError(
                "IONSegRegularizerHead reads exactly one feature; MODEL.SEM_SEG_HEAD.IN_FEATURES "
                f"is {in_features}. Set it to one of {sorted(input_shape)} (e.g. ['context'])."
            )
        return {
            "input_shape": input_shape,
            "in_feature": in_features[0],
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
        }

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        targets: Optional[torch.Tensor] = None,
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """
        Args:
            features (dict[str, Tensor]): feature maps; ``features[in_feature]`` is (N, C, h, w).
            targets (Tensor or None): (N, H, W) long labels of the padded images, padded with
                ``ignore_value`` (``ImageList.from_tensors(..., pad_value=ignore_value)``).
                Required in training. Pixels of an unlabelled image are all ``ignore_value``.
            image_sizes (list[tuple[int, int]] or None): (h, w) of each image before padding
                (``ImageList.image_sizes``); None: every image fills the whole feature map.

        Returns:
            In training, ``(None, {"loss_sem_seg": loss})``; the loss is 0, with a gradient
            path, when every pixel is ignored. In inference, ``(logits, {})`` with (N, K, H, W)
            logits for the targets' size when targets are given, else for (h * s, w * s).
        """
        x = self.score(features[self.in_feature])
        if image_sizes is not None:
            counts = valid_cell_counts(image_sizes, self.stride, x.shape[-2], x.shape[-1], x.device)
            x = zero_outside_valid_cells(x, counts)
        if self.training:
            if targets is None:
                raise ValueError(
                    "IONSegRegularizerHead needs targets in training; give unlabelled images "
                    f"targets filled with ignore_value ({self.ignore_value})."
                )
            return None, self.losses(x, targets)

        if targets is not None:
            height, width = targets.shape[-2:]
        else:
            height, width = x.shape[-2] * self.stride, x.shape[-1] * self.stride
        logits = self.upsample_and_crop(x, height, width)
        # Pixels beyond the deconvolution's reach (only when the image is larger than the
        # feature map covers) get zero logits, i.e. a uniform prediction.
        pad_h, pad_w = height - logits.shape[-2], width - logits.shape[-1]
        if pad_h > 0 or pad_w > 0:
            logits = F.pad(logits, (0, max(pad_w, 0), 0, max(pad_h, 0)))
        return logits, {}

    def upsample_and_crop(self, scores: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """
        Upsample class scores to image resolution with the bilinear deconvolution and FCN's crop.

        Args:
            scores (Tensor): (N, K, h, w) scores at the feature's stride s.
            height, width (int): size of the (padded) image.

        Returns:
            Tensor: (N, K, H', W') with H' = min(height, h * s + s / 2) and likewise W'; the
            deconvolution reaches no further.
        """
        offset = self.stride // 2
        if height <= scores.shape[-2] * self.stride and width <= scores.shape[-1] * self.stride:
            tent = self._fixed_bilinear_tent(scores)
            if tent is not None:
                # The fixed bilinear kernel is the outer product of a tent, so the
                # deconvolution and its crop are a matrix product along each axis: about 5x
                # faster, forward and backward (docs/BENCHMARKS.md, "A training step at the
                # paper's scale"); equal up to float rounding (tests/test_seg_head.py).
                rows = tent_matrix(height, scores.shape[-2], self.stride, offset, tent)
                cols = tent_matrix(width, scores.shape[-1], self.stride, offset, tent)
                return torch.matmul(rows, torch.matmul(scores, cols.t()))
            # The crop within the deconvolution: its padding leaves out the first and last
            # `offset` rows and columns, so it neither computes them nor, backward, builds the
            # zero-filled gradient of a slice (the same values: tests/test_seg_head.py).
            x = F.conv_transpose2d(
                scores,
                self.upsample.weight,
                stride=self.stride,
                padding=offset,
                groups=self.num_classes,
            )
            if x.shape[-2] == height and x.shape[-1] == width:
                return x
            return x[:, :, :height, :width]
        x = self.upsample(scores)
        return x[:, :, offset : offset + height, offset : offset + width]

    def _fixed_bilinear_tent(self, scores: torch.Tensor) -> Optional[torch.Tensor]:
        """
        The 1D tent of the deconvolution's kernel, in ``scores``' dtype, when the kernel is the
        fixed bilinear one (not learned, and every class's kernel the tent's outer product);
        None otherwise, and while tracing (the axis matrices are built from the traced sizes,
        which a trace would keep as constants).
        """
        weight = self.upsample.weight
        if torch.jit.is_tracing() or weight.requires_grad:
            return None
        tent = bilinear_tent(2 * self.stride).to(device=weight.device)
        if not bool((weight == (tent[:, None] * tent[None, :]).to(weight.dtype)).all()):
            return None  # e.g. a learned kernel loaded into a fixed one
        return tent.to(scores.dtype)

    def losses(self, scores: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Per-pixel softmax cross-entropy, averaged over each image's labelled pixels, then over
        the images of the batch.

        The paper's Caffe setup passed one image at a time (``iter_size`` averaging the passes)
        through a softmax loss normalised by that image's labelled pixels, so every image weighs
        the same whatever its size; an image without labelled pixels adds 0 (Caffe divides by
        ``max(count, 1)``) and still counts in the average over the batch.

        Args:
            scores (Tensor): (N, K, h, w) scores at the feature's stride.
            targets (Tensor): (N, H, W) long labels, ``ignore_value`` where unlabelled
                (padding included).

        Returns:
            dict[str, Tensor]: ``{"loss_sem_seg": loss * loss_weight}``.
        """
        scores = scores.float()  # https://github.com/pytorch/pytorch/issues/48163
        logits = self.upsample_and_crop(scores, targets.shape[-2], targets.shape[-1])
        # Target pixels the deconvolution does not reach count as ignored: dropping them
        # equals padding the logits with an ignored area.
        targets = targets[:, : logits.shape[-2], : logits.shape[-1]]
        pixel_losses = pixel_cross_entropy(logits, targets, self.ignore_value)  # 0 where ignored
        loss_sum = pixel_losses.flatten(1).sum(dim=1)
        num_labelled = (targets != self.ignore_value).flatten(1).sum(dim=1).clamp(min=1)
        return {"loss_sem_seg": (loss_sum / num_labelled).mean() * self.loss_weight}
