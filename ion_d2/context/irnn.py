"""
The paper's context module: a stack of 4-direction IRNN layers (section 3.2, Figure 3).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from ..irnn_scan import IRNN_DIRECTIONS, irnn_scans
from ..padding import valid_cell_mask, valid_cells_of
from .build import ION_CONTEXT_REGISTRY, context_input, context_input_shape

__all__ = ["IRNN"]

_IRNN_RECURRENT = ("learned", "removed")
_IRNN_DIRECTION_MODES = ("all", "lr_then_ud")


class _IRNNLayer(nn.Module):
    """One layer of :class:`IRNN` (Figure 3)."""

    def __init__(
        self,
        in_channels: int,
        hidden_dim: int,
        directions: Sequence[str],
        learned_recurrent: bool,
        first_step_bias: bool,
        shared_input_to_hidden: bool = True,
        concat_dropout: float = 0.0,
    ):
        super().__init__()
        self.directions = tuple(directions)
        self.shared_input_to_hidden = shared_input_to_hidden
        num_dirs = len(self.directions)
        # Unshared, the directions' 1x1 convs are stacked on the output channels of one conv
        # (direction d owns channels d * hidden_dim ... (d + 1) * hidden_dim - 1): the same
        # parameters and outputs as separate convs, in one call.
        self.input_to_hidden = nn.Conv2d(
            in_channels, hidden_dim * (1 if shared_input_to_hidden else num_dirs), kernel_size=1
        )
        self.dropout = nn.Dropout(concat_dropout) if concat_dropout > 0 else nn.Identity()
        self.hidden_to_output = nn.Conv2d(num_dirs * hidden_dim, in_channels, kernel_size=1)
        # Caffe's "xavier" filler (uniform, variance 1/fan_in, zero bias): fan_in grows with the
        # number of concatenated directions, so the output conv starts correspondingly smaller
        # (the same reasoning as section 3.1's 1x1 conv after the skip-pool concat).
        weight_init.c2_xavier_fill(self.input_to_hidden)
        weight_init.c2_xavier_fill(self.hidden_to_output)
        if learned_recurrent:
            # IRNN (Le et al.): the recurrent matrix starts at the identity so that gradients
            # initially flow back along the scan with full strength.
            eye = torch.eye(hidden_dim).expand(num_dirs, hidden_dim, hidden_dim)
            self.whh: Optional[nn.Parameter] = nn.Parameter(eye.clone())
        else:
            self.register_parameter("whh", None)
        if first_step_bias:
            self.first_step_bias: Optional[nn.Parameter] = nn.Parameter(
                torch.zeros(num_dirs, hidden_dim)
            )
        else:
            self.register_parameter("first_step_bias", None)

    def direction_states(
        self, x: Tensor, valid_cells: Optional[Tensor] = None
    ) -> Dict[str, Tensor]:
        """
        The hidden maps of each direction (Figure 4: what each cell summarises of the cells to
        its left, right, above or below).

        Args:
            x (Tensor): (N, C, H, W) layer input.
            valid_cells (Tensor or None): (N, 2) valid rows and columns of each image (see
                :func:`irnn_scans`); None: the whole map.

        Returns:
            dict[str, Tensor]: direction name -> (N, hidden_dim, H, W), in scan order; 0
            outside the valid cells.
        """
        states = self._scans(_to_channels_last(x), valid_cells)
        return {d: states[:, :, :, i].permute(0, 3, 1, 2) for i, d in enumerate(self.directions)}

    def _scans(self, x: Tensor, valid_cells: Optional[Tensor]) -> Tensor:
        """(N, H, W, D, hidden_dim): the directions' states of ``x`` (channels_last memory)."""
        hidden = self.input_to_hidden(x)
        n, channels, height, width = hidden.shape
        hidden = _to_channels_last(hidden).permute(0, 2, 3, 1)
        # Shared, one input-to-hidden map feeds every direction (K = 1); else K = D blocks.
        k = 1 if self.shared_input_to_hidden else len(self.directions)
        hidden = hidden.view(n, height, width, k, channels // k)
        return irnn_scans(hidden, self.directions, self.whh, self.first_step_bias, valid_cells)

    def forward(self, x: Tensor, valid_cells: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            x (Tensor): (N, C, H, W) layer input, in any memory format.
            valid_cells (Tensor or None): see :meth:`direction_states`.

        Returns:
            Tensor: (N, C, H, W) in channels_last memory format (the layout the scans work in;
            the next layer reads it as is).
        """
        states = self._scans(_to_channels_last(x), valid_cells)
        n, height, width, _, _ = states.shape
        # The states already lie side by side, channels last: the directions' concatenation
        # (right, left, down, up), read by the 1x1 conv without copying.
        concat = states.view(n, height, width, -1).permute(0, 3, 1, 2)
        if self.training and not isinstance(self.dropout, nn.Identity):
            # Dropout draws its mask in its input's memory order: drawn on a contiguous map,
            # a seed gives the mask a contiguous concatenation got. (concat * keep stays
            # channels_last: a product takes its first operand's memory format.)
            concat = concat * self.dropout(concat.new_ones(concat.shape))
        out = self.hidden_to_output(concat)
        # The output conv's bias must not reach the padding (the next layer, the ROI pooler or
        # the seg head would see it). Zeroed before the ReLU, in place (the conv's backward does
        # not need its output).
        if valid_cells is not None:
            out.masked_fill_(~valid_cell_mask(valid_cells, height, width), 0.0)
        return F.relu(out)


def _to_channels_last(x: Tensor) -> Tensor:
    """
    (N, C, H, W) ``x`` in channels_last memory format (``x`` itself when it already is).

    One 2-D transpose per image: ``x.contiguous(memory_format=...)`` on CPU moves the same data
    several times slower.
    """
    if x.is_contiguous(memory_format=torch.channels_last):
        return x
    n, c, height, width = x.shape
    out = x.new_empty((n, height, width, c))
    for i in range(n):
        out[i].view(height * width, c).copy_(x[i].reshape(c, height * width).t())
    return out.permute(0, 3, 1, 2)


def _to_contiguous(x: Tensor) -> Tensor:
    """(N, C, H, W) ``x`` in contiguous (NCHW) memory format; see :func:`_to_channels_last`."""
    if x.is_contiguous():
        return x
    n, c, height, width = x.shape
    out = x.new_empty((n, c, height, width))
    for i in range(n):
        out[i].view(c, height * width).copy_(x[i].permute(1, 2, 0).reshape(height * width, c).t())
    return out


@ION_CONTEXT_REGISTRY.register()
class IRNN(nn.Module):
    """
    Stacked 4-direction IRNN context module (section 3.2, Figure 3, Tables 8-10).

    Each layer computes ``x -> ReLU(conv1x1(dropout(concat_d(scan_d(conv1x1(x))))))``: an
    input-to-hidden 1x1 conv (with bias) shared by the directions (or one per direction); per
    direction ``d`` the recurrence of :mod:`ion_d2.irnn_scan` with its own ``Whh_d`` (or
    ``Whh = I`` when removed) moving right, left, down or up (:func:`irnn_scans`, all directions
    at once); the directions' hidden maps concatenated on channels in the order right, left,
    down, up; dropout (training only); and a 1x1 hidden-to-output conv back to the layer's input
    channels, followed by ReLU. The output thus has the input feature's channels and spatial size.
    Between the convs the maps are channels last, so the scans' steps and the concatenation
    need no layout change.

    Given the images' sizes, every layer works on each image's valid cells only
    (:mod:`ion_d2.padding`): the scans start at the image's own edges and the padding stays 0,
    so an image's context does not depend on the rest of its batch.
    """

    @configurable
    def __init__(
        self,
        *,
        in_feature: str,
        in_channels: int,
        stride: int,
        hidden_dim: int = 512,
        num_layers: int = 2,
        recurrent: str = "learned",
        directions: str = "all",
        first_step_bias: bool = False,
        output_all_layers: bool = False,
        shared_input_to_hidden: bool = True,
        concat_dropout: float = 0.25,
    ):
        """
        Args:
            in_feature (str): name of the feature to read (e.g. "conv5").
            in_channels (int): channels of that feature; also the output channels.
            stride (int): stride of that feature; also the output stride.
            hidden_dim (int): hidden units per direction (Table 9).
            num_layers (int): number of stacked IRNN layers (Table 8).
            recurrent (str): "learned" (per-direction ``Whh`` initialised to the identity) or
                "removed" (``Whh = I`` fixed, no parameter) (Table 9).
            directions (str): "all" (right, left, down, up in every layer) or "lr_then_ud"
                (odd layers right/left, even layers down/up; Table 10a).
            first_step_bias (bool): learn a bias ``b0`` per direction, initialised to 0, added
                at the first step of each scan (section 3.2 item 3).
            output_all_layers (bool): also return layer ``i < num_layers`` as
                ``"context_{i}"`` (Table 10b); the top layer is always ``"context"``.
            shared_input_to_hidden (bool): one input-to-hidden 1x1 conv for all directions
                (section 3.2), or one per direction.
            concat_dropout (float): dropout probability in [0, 1) between each layer's concat
                and its hidden-to-output conv (section 3.2 item 2: 0.25); 0 removes it.
        """
        super().__init__()
        if recurrent not in _IRNN_RECURRENT:
            raise ValueError(
                f"IRNN recurrent={recurrent!r} is not supported; expected one of "
                f"{_IRNN_RECURRENT}."
            )
        if directions not in _IRNN_DIRECTION_MODES:
            raise ValueError(
                f"IRNN directions={directions!r} is not supported; expected one of "
                f"{_IRNN_DIRECTION_MODES}."
            )
        if num_layers < 1:
            raise ValueError(f"IRNN num_layers={num_layers} is invalid; expected an int >= 1.")
        if hidden_dim < 1:
            raise ValueError(f"IRNN hidden_dim={hidden_dim} is invalid; expected an int >= 1.")
        if in_channels < 1:
            raise ValueError(f"IRNN in_channels={in_channels} is invalid; expected an int >= 1.")
        if not 0.0 <= concat_dropout < 1.0:
            raise ValueError(
                f"IRNN concat_dropout={concat_dropout} is invalid; expected a float in [0, 1)."
            )

        self.in_feature = in_feature
        self._out_channels = in_channels
        self._stride = stride
        self.output_all_layers = output_all_layers
        layers = []
        for i in range(num_layers):
            if directions == "all":
                layer_dirs = IRNN_DIRECTIONS
            else:
                layer_dirs = ("right", "left") if i % 2 == 0 else ("down", "up")
            layers.append(
                _IRNNLayer(
                    in_channels,
                    hidden_dim,
                    layer_dirs,
                    learned_recurrent=recurrent == "learned",
                    first_step_bias=first_step_bias,
                    shared_input_to_hidden=shared_input_to_hidden,
                    concat_dropout=concat_dropout,
                )
            )
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict:
        in_feature, shape = context_input_shape(cfg, input_shape)
        irnn = cfg.MODEL.ION.CONTEXT.IRNN
        # fmt: off
        return {
            "in_feature":             in_feature,
            "in_channels":            shape.channels,
            "stride":                 shape.stride,
            "hidden_dim":             irnn.HIDDEN_DIM,
            "num_layers":             irnn.NUM_LAYERS,
            "recurrent":              irnn.RECURRENT,
            "directions":             irnn.DIRECTIONS,
            "first_step_bias":        irnn.FIRST_STEP_BIAS,
            "output_all_layers":      irnn.OUTPUT_ALL_LAYERS,
            "shared_input_to_hidden": irnn.SHARED_INPUT_TO_HIDDEN,
            "concat_dropout":         irnn.CONCAT_DROPOUT,
        }
        # fmt: on

    def _output_names(self) -> List[str]:
        names = []
        if self.output_all_layers:
            names = [f"context_{i}" for i in range(1, len(self.layers))]
        return names + ["context"]

    def forward(
        self,
        features: Dict[str, Tensor],
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Dict[str, Tensor]:
        """
        Args:
            features (dict[str, Tensor]): backbone features; reads ``features[in_feature]``
                of shape (N, C, H, W).
            image_sizes (list[tuple[int, int]] or None): (h, w) of each image before padding
                (``ImageList.image_sizes``); None: every image fills the whole map.

        Returns:
            dict[str, Tensor]: ``{"context": (N, C, H, W)}``, plus ``"context_1"``, ...,
            ``"context_{L-1}"`` for the intermediate layers when ``output_all_layers``; 0
            outside each image's valid cells.
        """
        x = context_input(features, self.in_feature)
        valid_cells = valid_cells_of(image_sizes, self._stride, x)
        outputs = []
        for layer in self.layers:
            x = layer(x, valid_cells)
            outputs.append(x)
        if not self.output_all_layers:
            outputs = outputs[-1:]
        # The layers pass channels_last maps to each other; the outputs are contiguous, as the
        # backbone's features are.
        return dict(zip(self._output_names(), map(_to_contiguous, outputs)))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_channels, stride=self._stride)
            for name in self._output_names()
        }
