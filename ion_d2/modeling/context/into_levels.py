"""
The context added into a feature pyramid's levels (beyond the paper; issue 25).

ION reads its context only in the ROI heads: each ROI pools it beside conv3-conv5 (section 3).
On a feature pyramid, :class:`IONContextIntoLevels` instead adds the context to the levels
themselves, before the proposal generator and the ROI heads read them, as global-context blocks
do on FPN detectors (GCNet, Cao et al., 2019: a context transform added to every position):

    level_l <- level_l + nearest_upsample(LN(conv1x1(context)))

with one 1x1 conv shared by the levels and a layer norm over each cell's channels (GCNet's
transform normalises the same way; per cell, so no statistic mixes an image with the batch's
padding). The norm's scale and shift start at 0, so the model starts as the plain pyramid: the
stock detector's heads, pooling and training, plus the context module (and its segmentation
loss, if on). On the bundled R50-FPN recipe, which clips no gradients, the seg loss made training
diverge: at iteration ~56 with a zero-initialised 1x1 conv instead of the norm, at ~105 with it;
without the seg loss, or with the context's input detached (``detach_input``), it trains
(docs/BENCHMARKS.md, "The context added into the levels", "Where the AP goes").
``MODEL.ION.CONTEXT.ADD_TO_FEATURES`` lists the levels.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
from detectron2.layers import Conv2d, ShapeSpec
from torch import Tensor, nn

from ..padding import valid_cell_counts_of, zero_outside_valid_cells

__all__ = ["IONContextIntoLevels"]


class IONContextIntoLevels(nn.Module):
    """
    Wraps a context module (:data:`ION_CONTEXT_REGISTRY`): returns its outputs and, for each
    feature of ``targets``, that feature plus the projected context, upsampled to its size by
    repeating cells (the context's stride must be a multiple of the feature's).

    The added term is 0 outside each image's valid cells (:mod:`ion_d2.modeling.padding`), so
    it adds nothing that depends on the batch's padding.
    """

    def __init__(
        self,
        context: nn.Module,
        *,
        input_shape: Dict[str, ShapeSpec],
        targets: Sequence[str],
        detach_input: bool = False,
    ):
        """
        Args:
            context (nn.Module): the context module; its output "context" is added.
            input_shape (dict[str, ShapeSpec]): the backbone's features.
            targets (list[str]): the features the context is added to; they must share one
                channel count and have strides dividing the context's.
            detach_input (bool): the context module reads a detached copy of its input
                feature: its gradient trains it and the added term, not the backbone.
        """
        super().__init__()
        if not targets:
            raise ValueError("IONContextIntoLevels needs at least one feature to add to.")
        missing = [t for t in targets if t not in input_shape]
        if missing:
            raise ValueError(
                f"MODEL.ION.CONTEXT.ADD_TO_FEATURES names {missing}, which the backbone does not "
                f"produce; available: {sorted(input_shape)}."
            )
        shape = context.output_shape()["context"]
        channels = {input_shape[t].channels for t in targets}
        if len(channels) != 1:
            raise ValueError(
                f"MODEL.ION.CONTEXT.ADD_TO_FEATURES {list(targets)} have different channel "
                f"counts {sorted(channels)}; the one shared 1x1 conv needs one (a feature "
                "pyramid's levels, e.g. ['p2', 'p3', 'p4', 'p5'])."
            )
        bad = [t for t in targets if shape.stride % input_shape[t].stride != 0]
        if bad:
            raise ValueError(
                f"MODEL.ION.CONTEXT.ADD_TO_FEATURES names {bad}, whose strides "
                f"{[input_shape[t].stride for t in bad]} do not divide the context's "
                f"({shape.stride}, MODEL.ION.CONTEXT.IN_FEATURE); the context is upsampled "
                "to each level, never downsampled. Leave coarser levels out."
            )
        self.context = context
        self.targets = list(targets)
        self.detach_input = detach_input
        self.context_stride = shape.stride
        self._shapes = {t: input_shape[t] for t in targets}
        out_channels = channels.pop()
        self.proj = Conv2d(shape.channels, out_channels, kernel_size=1)
        weight_init.c2_xavier_fill(self.proj)
        self.norm = nn.LayerNorm(out_channels)
        nn.init.zeros_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)

    @property
    def in_feature(self) -> str:
        return self.context.in_feature

    @property
    def features_read_by_self(self) -> List[str]:
        """The wrapped module's "context": read here, whether or not a head pools it."""
        return ["context"]

    def forward(
        self,
        features: Dict[str, Tensor],
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Dict[str, Tensor]:
        inputs = features
        if self.detach_input:
            inputs = dict(features)
            inputs[self.in_feature] = features[self.in_feature].detach()
        out = dict(self.context(inputs, image_sizes))
        added = self.norm(self.proj(out["context"]).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        for name in self.targets:
            feature = features[name]
            stride = self._shapes[name].stride
            factor = self.context_stride // stride
            up = added
            if factor > 1:
                up = up.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
            height, width = feature.shape[-2:]
            if up.shape[-2] < height or up.shape[-1] < width:
                up = nn.functional.pad(up, (0, width - up.shape[-1], 0, height - up.shape[-2]))
            up = up[..., :height, :width]
            counts = valid_cell_counts_of(image_sizes, stride, feature)
            out[name] = feature + zero_outside_valid_cells(up, counts)
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {**self.context.output_shape(), **self._shapes}
