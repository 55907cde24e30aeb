"""Stacked convolutions as context (Table 7a, 7b)."""

from typing import Dict, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from ..padding import zero_outside_valid_cells
from .build import ION_CONTEXT_REGISTRY, IONContextModule, context_input_shape

__all__ = ["StackedConv"]


@ION_CONTEXT_REGISTRY.register()
class StackedConv(IONContextModule):
    """
    Stacked convolutions as context (Table 7a: 2 x 512x3x3; Table 7b: 2 x 256x5x5): ``num_layers``
    ``kernel_size`` x ``kernel_size`` convs (same padding), each followed by ReLU. Given the
    images' sizes, the cells outside each image's valid cells are zeroed before every conv and
    at the output, so a conv at an image's border sees the zeros it would see alone.
    """

    @configurable
    def __init__(
        self,
        *,
        in_feature: str,
        in_channels: int,
        stride: int,
        num_layers: int = 2,
        kernel_size: int = 3,
        channels: int = 512,
    ):
        """
        Args:
            in_feature (str): name of the feature to read.
            in_channels (int): channels of that feature.
            stride (int): stride of that feature; also the output stride.
            num_layers (int): number of convs.
            kernel_size (int): odd kernel size; padding ``kernel_size // 2`` keeps H x W.
            channels (int): output channels of every conv.
        """
        super().__init__(in_feature=in_feature, stride=stride, out_channels=channels)
        if num_layers < 1:
            raise ValueError(
                f"StackedConv num_layers={num_layers} is invalid; expected an int >= 1."
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"StackedConv kernel_size={kernel_size} is invalid; expected an odd int >= 1 "
                "(so that padding kernel_size // 2 keeps the spatial size)."
            )
        if channels < 1:
            raise ValueError(f"StackedConv channels={channels} is invalid; expected an int >= 1.")
        convs = []
        for i in range(num_layers):
            conv = nn.Conv2d(
                in_channels if i == 0 else channels,
                channels,
                kernel_size=kernel_size,
                padding=kernel_size // 2,
            )
            # MSRA init suits convs followed by ReLU (Detectron2's default for such convs).
            weight_init.c2_msra_fill(conv)
            convs.append(conv)
        self.convs = nn.ModuleList(convs)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict:
        in_feature, shape = context_input_shape(cfg, input_shape)
        conv = cfg.MODEL.ION.CONTEXT.CONV
        # fmt: off
        return {
            "in_feature":  in_feature,
            "in_channels": shape.channels,
            "stride":      shape.stride,
            "num_layers":  conv.NUM_LAYERS,
            "kernel_size": conv.KERNEL_SIZE,
            "channels":    conv.CHANNELS,
        }
        # fmt: on

    def forward(
        self,
        features: Dict[str, Tensor],
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Dict[str, Tensor]:
        """See :class:`IRNN.forward`; returns ``{"context": (N, channels, H, W)}``."""
        x, valid_counts = self.input_and_valid_counts(features, image_sizes)
        for conv in self.convs:
            x = F.relu(conv(zero_outside_valid_cells(x, valid_counts)))
        return {"context": zero_outside_valid_cells(x, valid_counts)}
