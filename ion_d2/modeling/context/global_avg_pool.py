"""Global average pooling as context (Table 7c, ParseNet)."""

from typing import Dict, Optional, Sequence, Tuple

from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from torch import Tensor

from ..padding import zero_outside_valid_cells
from .build import ION_CONTEXT_REGISTRY, IONContextModule, context_input_shape

__all__ = ["GlobalAvgPool"]


@ION_CONTEXT_REGISTRY.register()
class GlobalAvgPool(IONContextModule):
    """
    Global average pooling as context (Table 7c, ParseNet): the feature is averaged over H and W
    and tiled ("unpooled") back to H x W. No parameters. Given the images' sizes, each image is
    averaged over its valid cells and its average tiled over them (0 elsewhere).
    """

    @configurable
    def __init__(self, *, in_feature: str, in_channels: int, stride: int):
        """
        Args:
            in_feature (str): name of the feature to read.
            in_channels (int): channels of that feature; also the output channels.
            stride (int): stride of that feature; also the output stride.
        """
        super().__init__(in_feature=in_feature, stride=stride, out_channels=in_channels)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict:
        in_feature, shape = context_input_shape(cfg, input_shape)
        return {"in_feature": in_feature, "in_channels": shape.channels, "stride": shape.stride}

    def forward(
        self,
        features: Dict[str, Tensor],
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Dict[str, Tensor]:
        """See :class:`IRNN.forward`; returns ``{"context": (N, C, H, W)}``."""
        x, valid_counts = self.input_and_valid_counts(features, image_sizes)
        if valid_counts is None:
            pooled = x.mean(dim=(2, 3), keepdim=True)
        else:
            area = valid_counts.prod(dim=1).to(x.dtype).view(-1, 1, 1, 1)
            pooled = zero_outside_valid_cells(x, valid_counts).sum(dim=(2, 3), keepdim=True) / area
        # A real (contiguous) tile rather than a stride-0 view, so that consumers may write to
        # it or hand it to kernels that assume dense storage.
        return {"context": zero_outside_valid_cells(pooled.expand_as(x).contiguous(), valid_counts)}
