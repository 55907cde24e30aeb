"""Table 10c's context: an IRNN and stacked convolutions side by side."""

from typing import Dict, Optional, Sequence, Tuple

from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from .build import ION_CONTEXT_REGISTRY
from .irnn import IRNN
from .stacked_conv import StackedConv

__all__ = ["IRNNAndStackedConv"]


@ION_CONTEXT_REGISTRY.register()
class IRNNAndStackedConv(nn.Module):
    """
    Table 10c: an :class:`IRNN` and a :class:`StackedConv` side by side on the same input
    feature, so the ROI heads can pool from both: the IRNN's output is "context" (plus its
    intermediate layers with ``IRNN.OUTPUT_ALL_LAYERS``), the convs' output "context_conv".
    """

    @configurable
    def __init__(self, *, irnn: nn.Module, stacked_conv: nn.Module):
        """
        Args:
            irnn (IRNN): the recurrent context branch.
            stacked_conv (StackedConv): the convolutional branch.
        """
        super().__init__()
        self.irnn = irnn
        self.stacked_conv = stacked_conv

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict:
        return {"irnn": IRNN(cfg, input_shape), "stacked_conv": StackedConv(cfg, input_shape)}

    def forward(
        self,
        features: Dict[str, Tensor],
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Dict[str, Tensor]:
        """
        See :meth:`IRNN.forward`.

        Returns:
            dict[str, Tensor]: the IRNN's outputs and ``"context_conv"``.
        """
        out = self.irnn(features, image_sizes)
        out["context_conv"] = self.stacked_conv(features, image_sizes)["context"]
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        shapes = self.irnn.output_shape()
        shapes["context_conv"] = self.stacked_conv.output_shape()["context"]
        return shapes
