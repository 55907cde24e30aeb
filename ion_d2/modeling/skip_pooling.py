"""Skip pooling: ION's multi-layer ROI descriptor (section 3.1, Figure 1, Tables 4-5)."""

import logging
from typing import List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, cat
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from torch import nn

from .dropout import IONDropout
from .enlarged_boxes import check_box_factors, enlarge_boxes
from .feature_order import (
    check_stored_feature_order,
    decode_feature_order,
    encode_feature_order,
)
from .init_stream import own_init_stream
from .l2_normalize import NORM_EPS, NORM_MODES, inverse_l2_norms, l2_normalize_rois
from .roi_pool import IONROIPool
from .vgg16 import IONVGG16

__all__ = [
    "IONSkipPooler",
    "encode_feature_order",
    "decode_feature_order",
    "SCALE_MODES",
    "MEASURE_SCALE",
    "PENDING_SCALE_FIX",
    "check_scale_init",
    "find_skip_pooler",
]

logger = logging.getLogger(__name__)

SCALE_MODES = ("learned", "fixed")
# Mean norms of conv5 features pooled by Fast R-CNN on the training set (section 5.2).
_DEFAULT_SCALE = {"roi": 1000.0, "location": 130.0}
# scale_init asking for the scale to be measured (MODEL.ION.SKIP_POOL.SCALE_INIT -1).
MEASURE_SCALE = -1.0


# What a trainer other than IONTrainer and tools/lazyconfig_train_net.py adds to measure a
# pending scale (section 5.2) before the first step: docs/USAGE.md, "Which trainer".
PENDING_SCALE_FIX = "trainer.register_hooks([ion_d2.engine.SkipPoolScaleHook(cfg)])"


def find_skip_pooler(roi_heads: Optional[nn.Module]) -> Optional["IONSkipPooler"]:
    """
    The :class:`IONSkipPooler` of ``roi_heads``: :class:`StandardROIHeads`' ``box_pooler``
    (:class:`IONROIHeads`) or :class:`Res5ROIHeads`' ``pooler`` (:class:`IONRes5ROIHeads`, C4);
    None when they pool otherwise.
    """
    for name in ("box_pooler", "pooler"):
        pooler = getattr(roi_heads, name, None)
        if isinstance(pooler, IONSkipPooler):
            return pooler
    return None


def check_scale_init(roi_heads: nn.Module, backbone: nn.Module) -> None:
    """
    Refuse a skip pooler of ``roi_heads`` whose ``scale_init`` is 0 (the paper's 1000 / 130,
    measured on Caffe VGG16's conv5, section 5.2) when ``backbone`` is not ion_d2's
    :class:`IONVGG16`, where that constant has no meaning. :class:`IONRCNN` calls it, so the
    YAML and the shape-inferring builder (:func:`ion_d2.modeling.builder.build_ion_rcnn`) both
    get it.
    """
    pooler = find_skip_pooler(roi_heads)
    if pooler is None or pooler.scale is None or pooler.scale_init != 0:
        return
    if isinstance(backbone, IONVGG16):
        return
    raise ValueError(
        f"The skip pooler's scale_init (MODEL.ION.SKIP_POOL.SCALE_INIT) is 0, the paper's "
        f"constant {_DEFAULT_SCALE[pooler.norm]} measured on Caffe VGG16's conv5 (section 5.2), "
        f"but the backbone is {type(backbone).__name__} (MODEL.BACKBONE.NAME). Set it to -1 "
        "(measure the mean pooled norm of MODEL.ION.CONTEXT.IN_FEATURE on the training set) or "
        "to a value > 0 measured for these features (tools/measure_roi_norms.py)."
    )


class IONSkipPooler(nn.Module):
    """
    Pools each ROI from several feature maps and fuses the results into one descriptor:
    one single-scale ROI pooler per feature (Detectron2's multi-level :class:`ROIPooler` assigns
    each box to ONE level instead), per-feature L2 normalisation, concatenation along channels,
    re-scaling, dropout and a 1x1 convolution (Xavier init) to ``out_channels``.

    It has :class:`ROIPooler`'s call signature, so :class:`StandardROIHeads` uses it as its
    ``box_pooler`` unchanged.
    """

    def __init__(
        self,
        *,
        input_shapes: List[ShapeSpec],
        output_size: int,
        sampling_ratio: int,
        pooler_type: str,
        norm: str = "roi",
        scale: str = "learned",
        scale_init: float = 0.0,
        out_channels: int = 512,
        dropout: float = 0.25,
        feature_names: Optional[List[str]] = None,
        scale_reference: Optional[str] = None,
        box_factors: Optional[Sequence[float]] = None,
    ):
        """
        Args:
            input_shapes (list[ShapeSpec]): channels and stride of each pooled feature, in the
                order features are passed to :meth:`forward`.
            output_size (int): ROI pooling resolution (7 for VGG16's fc6).
            sampling_ratio (int), pooler_type (str): see :class:`ROIPooler`.
            norm (str): L2 normalisation mode, one of :data:`NORM_MODES` (Table 5).
            scale (str): "learned" (per-channel, as the paper's scale layer) or "fixed"
                (section 5.2). Unused when ``norm`` is "none".
            scale_init (float): initial or fixed scale; 0 picks 1000 for "roi" and 130 for
                "location" normalisation (section 5.2); :data:`MEASURE_SCALE` (-1) leaves it
                pending (NaN, :attr:`scale_pending`) until loaded weights or
                :meth:`set_scale` set it (section 5.2's measurement before the first step,
                :class:`ion_d2.engine.SkipPoolScaleHook`); :meth:`forward` refuses to run
                with it pending.
            out_channels (int): channels of the 1x1 conv output (512 in the paper); 0 skips
                the conv, so the output has the concatenated channels (with one feature and
                ``norm="none"`` this is plain Fast R-CNN pooling).
            dropout (float): dropout probability after the concat (section 3.2: 0.25).
            feature_names (list[str] or None): the names of the pooled features, in order.
                They are saved with the weights (the buffer "feature_order"), and loading
                weights saved for another order raises: the 1x1 conv's input channels follow
                that order, so reordered features would load without error and detect nothing.
            scale_reference (str or None): the feature of ``feature_names`` whose mean pooled
                norm a measured scale takes (``MODEL.ION.CONTEXT.IN_FEATURE``, conv5). Required
                with ``scale_init`` -1 (unless ``norm`` is "none"); unused otherwise.
            box_factors (list[float] or None): per input shape, the factor (>= 1) its boxes are
                enlarged by around their centres (:mod:`.enlarged_boxes`); None: 1 (the paper).
        """
        super().__init__()
        if not input_shapes:
            raise ValueError("IONSkipPooler needs at least one input feature.")
        if norm not in NORM_MODES:
            raise ValueError(
                f"Unknown L2 normalisation mode {norm!r}; expected one of {NORM_MODES}."
            )
        if norm != "none" and scale not in SCALE_MODES:
            raise ValueError(f"Unknown scale mode {scale!r}; expected one of {SCALE_MODES}.")
        if not (scale_init >= 0 or scale_init == MEASURE_SCALE):
            raise ValueError(
                f"scale_init (MODEL.ION.SKIP_POOL.SCALE_INIT) must be -1 (measure it), 0 (the "
                f"paper's 1000 / 130) or > 0; got {scale_init}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Concat dropout must be in [0, 1); got {dropout}.")
        if out_channels < 0:
            raise ValueError(
                f"out_channels must be >= 0 (0 skips the 1x1 conv); got {out_channels}."
            )

        if scale_init == MEASURE_SCALE and norm != "none":
            if scale_reference is None or scale_reference not in (feature_names or ()):
                raise ValueError(
                    f"scale_init -1 (MODEL.ION.SKIP_POOL.SCALE_INIT) sets the scale from the mean "
                    f"pooled norm of scale_reference {scale_reference!r} "
                    f"(MODEL.ION.CONTEXT.IN_FEATURE), which this pooler does not pool: its "
                    f"feature_names (MODEL.ROI_HEADS.IN_FEATURES) are {feature_names}. Pool it, "
                    "or set scale_init to a value > 0."
                )
        self.box_factors = check_box_factors(box_factors, len(input_shapes))
        self.scale_init = float(scale_init)
        self.scale_reference = scale_reference
        self.feature_names = list(feature_names) if feature_names is not None else None
        if self.feature_names is not None:
            if len(self.feature_names) != len(input_shapes):
                raise ValueError(
                    f"IONSkipPooler got {len(self.feature_names)} feature names "
                    f"{self.feature_names} for {len(input_shapes)} input shapes."
                )
            self.register_buffer("feature_order", encode_feature_order(self.feature_names))
        # Fast R-CNN's max pooling through IONROIPool (same output as Detectron2's, faster on
        # the CPU); the other pooler types through Detectron2's ROIPooler.
        self.poolers = nn.ModuleList(
            (
                IONROIPool(output_size, 1.0 / s.stride)
                if pooler_type == "ROIPool"
                else ROIPooler(
                    output_size=output_size,
                    scales=(1.0 / s.stride,),
                    sampling_ratio=sampling_ratio,
                    pooler_type=pooler_type,
                )
            )
            for s in input_shapes
        )
        self.norm = norm
        self.output_size = output_size
        in_channels = sum(s.channels for s in input_shapes)
        if norm == "none":
            self.scale = None
        else:
            # NaN until measured or loaded (scale_init -1): the scale's only "pending" state.
            init = (
                float("nan")
                if scale_init == MEASURE_SCALE
                else (scale_init or _DEFAULT_SCALE[norm])
            )
            values = torch.full((in_channels,), float(init))
            if scale == "learned":
                self.scale = nn.Parameter(values)
            else:
                self.register_buffer("scale", values)
        self.dropout = IONDropout(dropout) if dropout > 0 else nn.Identity()
        if out_channels > 0:
            # Xavier (Caffe's filler: uniform, fan-in): the more features are concatenated,
            # the smaller the initial weights (section 3.1). Its own random stream: the box head
            # built after it starts as the stock ROI heads' (ion_d2/modeling/init_stream.py).
            with own_init_stream("skip_pool_reduce"):
                self.reduce = Conv2d(in_channels, out_channels, kernel_size=1)
                weight_init.c2_xavier_fill(self.reduce)
            self.out_channels = out_channels
        else:
            self.reduce = None
            self.out_channels = in_channels

    @property
    def scale_pending(self) -> bool:
        """True while the scale is NaN: ``scale_init`` -1 and neither measured nor loaded."""
        return self.scale is not None and bool(torch.isnan(self.scale).any())

    def set_scale(self, value: float) -> None:
        """
        Set every channel of the scale to ``value`` (a measured mean norm, section 5.2).
        """
        if self.scale is None:
            raise ValueError("This IONSkipPooler has no scale (norm 'none').")
        if not value > 0:
            raise ValueError(f"The skip-pooling scale must be > 0; got {value}.")
        with torch.no_grad():
            self.scale.fill_(float(value))

    @torch.no_grad()
    def pooled_norm_sums(
        self,
        x: List[torch.Tensor],
        box_lists: List[Boxes],
        chunk: int = 512,
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """
        Section 5.2's measurement: each feature pooled (before normalisation) over the boxes.

        Args:
            x, box_lists, image_sizes: as :meth:`forward`.
            chunk (int): boxes pooled at once, to bound memory.

        Returns:
            tuple: float64 (F,) sums over the boxes of each feature's per-ROI L2 norm (over all
            C x H x W entries) and of its per-location norm (over the C channels of a cell,
            averaged over the cells), and the number of boxes.
        """
        roi = torch.zeros(len(self.poolers), dtype=torch.float64, device=x[0].device)
        location = torch.zeros_like(roi)
        for i, boxes in enumerate(box_lists):
            for start in range(0, len(boxes), chunk):
                parts = self._enlarged([boxes[start : start + chunk]])
                size = None if image_sizes is None else [image_sizes[i]]
                for k, (pooler, feature, part) in enumerate(zip(self.poolers, x, parts)):
                    pooled = self._pool(pooler, feature[i : i + 1], part, size).double()
                    roi[k] += pooled.flatten(1).norm(dim=1).sum()
                    location[k] += pooled.norm(dim=1).mean(dim=(1, 2)).sum()
        return roi, location, sum(len(b) for b in box_lists)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        if self.feature_names is not None:
            check_stored_feature_order(state_dict, prefix, self.feature_names, self.feature_order)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(
        self,
        x: List[torch.Tensor],
        box_lists: List[Boxes],
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> torch.Tensor:
        """
        Args:
            x (list[Tensor]): one (N, C_i, H_i, W_i) feature map per input shape.
            box_lists (list[Boxes]): the N images' boxes, in input-image coordinates.
            image_sizes (list[tuple[int, int]] or None): (h, w) of each image before padding:
                max pooling (:class:`IONROIPool`) then reads only each image's valid cells, so
                a box's descriptor does not depend on the batch's padding (see
                :meth:`IONROIPool.forward`). IONROIHeads passes them; None (Detectron2's
                callers, e.g. Res5ROIHeads): the whole padded map.

        Returns:
            Tensor: (R, out_channels, output_size, output_size) for the R boxes of all images.
        """
        if len(x) != len(self.poolers):
            raise ValueError(
                f"IONSkipPooler was built for {len(self.poolers)} features but got {len(x)}."
            )
        if self.scale is not None and not torch.jit.is_tracing() and self.scale_pending:
            raise RuntimeError(
                "The skip-pooling scale is not set (MODEL.ION.SKIP_POOL.SCALE_INIT -1: section "
                f"5.2 measures the mean pooled norm of {self.scale_reference!r} on the training "
                "set before the first step). IONTrainer (train_net.py) and "
                "tools/lazyconfig_train_net.py measure it; under another trainer (Detectron2's "
                f"DefaultTrainer, tools/train_net.py) add `{PENDING_SCALE_FIX}` before "
                "`trainer.train()`. For inference, load weights that hold it; or set SCALE_INIT "
                "to a value > 0."
            )
        # Not while tracing: the fused path sizes its buffer from the number of boxes, which a
        # trace would keep as a constant.
        if not self.training and not torch.is_grad_enabled() and not torch.jit.is_tracing():
            return self._fused_inference(x, box_lists, image_sizes)
        pooled = [
            self._pool(pooler, feature, boxes, image_sizes)
            for pooler, feature, boxes in zip(self.poolers, x, self._enlarged(box_lists))
        ]
        if self.reduce is not None:
            return self._reduce_each(pooled)
        out = cat([l2_normalize_rois(p, self.norm) for p in pooled], dim=1)
        if self.scale is not None:
            out = out * self.scale[None, :, None, None]
        return self.dropout(out)

    def _reduce_each(self, pooled: List[torch.Tensor]) -> torch.Tensor:
        """
        :meth:`forward`'s normalisation, concatenation, scale and 1x1 conv without building
        the concatenation. The conv is linear and each descriptor's norm is one number per ROI
        (per cell with "location"), so ``reduce(cat_i(s_i * p_i / n_i))`` is
        ``b + sum_i ((W_i * s_i) p_i) / n_i``, ``W_i`` and ``s_i`` being the conv's input
        channels and the scale of feature i: the element-wise passes of the normalisation and
        the scale, forward and backward, then run over the conv's output channels once per
        feature instead of over the concatenation's channels (docs/BENCHMARKS.md, "A training
        step on the bundled data"). Equal to the concatenation's computation up to float
        rounding, values and gradients (tests/test_skip_pooling.py).

        Dropout after the concatenation (in training) multiplies each feature's part of it by
        that part's own mask (``self.dropout``, drawn feature by feature), which is
        where the conv reads it: ``(W_i * s_i) (m_i p_i) / n_i``, ``n_i`` being the norm of the
        undropped descriptor as before. A feature that needs no gradient (a frozen trunk's)
        then needs none of the conv's input gradients either.
        """
        weight = self.reduce.weight.flatten(1)
        if self.scale is not None:
            weight = weight * self.scale[None, :]
        bias = self.reduce.bias
        out = None if bias is None else bias[None, :, None, None]
        start = 0
        for p in pooled:
            end = start + p.shape[1]
            inv = inverse_l2_norms(p, self.norm)
            part = F.conv2d(self.dropout(p), weight[:, start:end, None, None])
            if inv is None:
                out = part if out is None else out + part
            else:
                out = part * inv if out is None else torch.addcmul(out, part, inv)
            start = end
        return out

    def _enlarged(self, box_lists: List[Boxes]) -> List[List[Boxes]]:
        """Per pooler, ``box_lists`` with its boxes enlarged by that pooler's factor."""
        return [box_lists if f == 1.0 else enlarge_boxes(box_lists, f) for f in self.box_factors]

    @staticmethod
    def _pool(pooler: nn.Module, feature: torch.Tensor, box_lists, image_sizes) -> torch.Tensor:
        if isinstance(pooler, IONROIPool):
            return pooler([feature], box_lists, image_sizes=image_sizes)
        return pooler([feature], box_lists)

    def _fused_inference(
        self, x: List[torch.Tensor], box_lists: List[Boxes], image_sizes=None
    ) -> torch.Tensor:
        """
        :meth:`forward` at inference (eval mode, no gradient: no dropout, outputs written in
        place) in fewer passes over the R x C x 7 x 7 descriptors: each feature is pooled
        straight into its channels of one channels-last concatenation, divided there by its norm
        and multiplied by its scale in one pass, and the 1x1 conv reads that layout (a plain
        matrix product per cell, faster than on channels-first input). Equal to the training
        path's output up to float rounding (``x * (s / n)`` instead of ``(x / n) * s``, norms
        summed in another order).
        """
        num = sum(len(b) for b in box_lists)
        channels = [feature.shape[1] for feature in x]
        size = self.output_size
        concat = x[0].new_empty(num, size, size, sum(channels))
        eps = NORM_EPS
        start = 0
        for pooler, feature, width, boxes in zip(
            self.poolers, x, channels, self._enlarged(box_lists)
        ):
            end = start + width
            target = concat[..., start:end]
            if isinstance(pooler, IONROIPool):
                pooler([feature], boxes, out=target, image_sizes=image_sizes)
            else:
                target.copy_(pooler([feature], boxes).permute(0, 2, 3, 1))
            scale = None if self.scale is None else self.scale[start:end]
            if self.norm == "roi":
                # Per cell, then per ROI: a norm over the strided (1, 2, 3) dims at once is
                # slower and sums less accurately.
                cells = target.view(num * size * size, end - start)
                cell_norms = torch.linalg.vector_norm(cells, dim=1).view(num, size * size)
                inv = cell_norms.square().sum(dim=1).sqrt().clamp(min=eps).reciprocal()
                factor = inv[:, None] if scale is None else inv[:, None] * scale[None, :]
                target.mul_(factor[:, None, None, :])
            elif self.norm == "location":
                target.div_(torch.linalg.vector_norm(target, dim=3, keepdim=True).clamp(min=eps))
                if scale is not None:
                    target.mul_(scale)
            start = end
        out = concat.permute(0, 3, 1, 2)  # (R, C, H, W) in channels-last memory
        if self.reduce is not None:
            out = self.reduce(out)
        return out
