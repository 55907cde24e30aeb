"""
The paper's context module: a stack of 4-direction IRNN layers (section 3.2, Figure 3).

Two wirings of the stack (``MODEL.ION.CONTEXT.IRNN.WIRING``), written for 2 layers:

- ``"paper"``, Figure 3 as read from the paper::

      conv5 -> 1x1 (input-to-hidden) -> 4 scans -> concat -> 1x1 (input-to-hidden)
            -> 4 scans -> concat -> 1x1 (hidden-to-output) -> context

  Three 1x1 convolutions. Figure 3 labels two "input-to-hidden transition"s and one
  "hidden-to-output transition"; section 3.2: "The output from the IRNN is computed by
  concatenating the hidden state from the four directions at each spatial location" (an IRNN's
  output is its concat, with no conv of its own), and "The subsequent 1x1 convolution then mixes
  this information together as a dimension reduction" (the one conv between the two IRNNs, from
  4 x hidden to hidden channels: the second IRNN's input-to-hidden transition). The last conv
  maps the top IRNN's concat back to the input's channels: "The RNNs sit on top of conv5 and
  produce an output with the same shape as conv5." The only nonlinearity is the ReLU of each
  recurrent step (Figure 3: "RNNs with ReLU recurrent transitions"); the hidden-to-output
  transition is linear, as no ReLU after it is described. Intermediate outputs (Table 10b,
  ``OUTPUT_ALL_LAYERS``) are the lower IRNNs' concats (4 x hidden channels).
- ``"per_layer"``, ion_d2's wiring before the paper's was settled (kept so that every earlier
  checkpoint loads and gives the same output): each layer is input-to-hidden 1x1 -> scans ->
  concat -> hidden-to-output 1x1 back to the input's channels -> ReLU; 2 layers have four 1x1
  convolutions and a ReLU'd projection between the IRNNs.
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

__all__ = ["IRNN", "IRNN_WIRINGS"]

_IRNN_RECURRENT = ("learned", "removed")
_IRNN_DIRECTION_MODES = ("all", "lr_then_ud")
IRNN_WIRINGS = ("paper", "per_layer")


class _IRNNLayer(nn.Module):
    """
    One layer of :class:`IRNN` (Figure 3): input-to-hidden 1x1 conv, scans, concat, and for
    the "per_layer" wiring (``out_channels`` given) dropout, a hidden-to-output 1x1 conv and ReLU.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_dim: int,
        directions: Sequence[str],
        learned_recurrent: bool,
        first_step_bias: bool,
        shared_input_to_hidden: bool = True,
        concat_dropout: float = 0.0,
        out_channels: Optional[int] = None,
    ):
        """
        Args:
            out_channels (int or None): channels of the layer's hidden-to-output conv
                ("per_layer" wiring); None: the layer has none and outputs its concat
                ("paper" wiring, where :class:`IRNN` owns the one hidden-to-output conv).
            others: see :class:`IRNN`.
        """
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
        self.concat_channels = num_dirs * hidden_dim
        if out_channels is not None:
            self.dropout = nn.Dropout(concat_dropout) if concat_dropout > 0 else nn.Identity()
            self.hidden_to_output = nn.Conv2d(self.concat_channels, out_channels, kernel_size=1)
        else:
            self.dropout = nn.Identity()
            self.hidden_to_output = None
        # Caffe's "xavier" filler (uniform, variance 1/fan_in, zero bias): fan_in grows with the
        # number of concatenated directions, so a conv reading the concat starts correspondingly
        # smaller (the same reasoning as section 3.1's 1x1 conv after the skip-pool concat).
        # (Filled after both convs are built: the random draws, so a seed's weights, are those
        # of the "per_layer" layers before the "paper" wiring existed.)
        weight_init.c2_xavier_fill(self.input_to_hidden)
        if self.hidden_to_output is not None:
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

    def concat(self, x: Tensor, valid_cells: Optional[Tensor] = None) -> Tensor:
        """
        The IRNN's output as section 3.2 defines it: "concatenating the hidden state from the
        four directions at each spatial location".

        Args:
            x (Tensor): (N, C, H, W) layer input, in any memory format.
            valid_cells (Tensor or None): see :meth:`direction_states`.

        Returns:
            Tensor: (N, D * hidden_dim, H, W), directions in the order right, left, down, up,
            in channels_last memory format; 0 outside the valid cells.
        """
        states = self._scans(_to_channels_last(x), valid_cells)
        n, height, width, _, _ = states.shape
        # The states already lie side by side, channels last: the directions' concatenation,
        # read by the next 1x1 conv without copying.
        return states.view(n, height, width, -1).permute(0, 3, 1, 2)

    def forward(self, x: Tensor, valid_cells: Optional[Tensor] = None) -> Tensor:
        """
        The "per_layer" wiring's layer.

        Args:
            x (Tensor): (N, C, H, W) layer input, in any memory format.
            valid_cells (Tensor or None): see :meth:`direction_states`.

        Returns:
            Tensor: (N, C, H, W) in channels_last memory format (the layout the scans work in;
            the next layer reads it as is).
        """
        concat = _concat_dropout(self.dropout, self.concat(x, valid_cells), self.training)
        return F.relu(_zero_padding(self.hidden_to_output(concat), valid_cells))


def _concat_dropout(dropout: nn.Module, concat: Tensor, training: bool) -> Tensor:
    """``dropout`` on a channels_last ``concat``, drawing the mask a contiguous map would get."""
    if training and not isinstance(dropout, nn.Identity):
        # Dropout draws its mask in its input's memory order: drawn on a contiguous map, a seed
        # gives the mask a contiguous concatenation got. (concat * keep stays channels_last: a
        # product takes its first operand's memory format.)
        concat = concat * dropout(concat.new_ones(concat.shape))
    return concat


def _zero_padding(out: Tensor, valid_cells: Optional[Tensor]) -> Tensor:
    """
    ``out`` (a conv's output) with every cell outside the valid cells set to 0, in place: the
    conv's bias must not reach the padding (the next layer, the ROI pooler or the seg head would
    see it). The conv's backward does not need its output.
    """
    if valid_cells is not None:
        out.masked_fill_(~valid_cell_mask(valid_cells, out.shape[2], out.shape[3]), 0.0)
    return out


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

    An IRNN layer is an input-to-hidden 1x1 conv (with bias) shared by the directions (or one
    per direction); per direction ``d`` the recurrence of :mod:`ion_d2.irnn_scan` with its own
    ``Whh_d`` (or ``Whh = I`` when removed) moving right, left, down or up (:func:`irnn_scans`,
    all directions at once); and the directions' hidden maps concatenated on channels in the
    order right, left, down, up. How layers connect is ``wiring`` (the module docstring states
    both and the paper's sentences they rest on):

    - "paper": ``x -> L_1 -> dropout -> L_2 -> ... -> L_n -> dropout -> conv1x1`` where ``L_k``
      is a layer's concat; layer ``k > 1``'s input-to-hidden conv reads layer ``k - 1``'s concat
      and the one hidden-to-output conv maps the top concat back to the input's channels, with
      no ReLU after it.
    - "per_layer": ``x -> ReLU(conv1x1(dropout(L_k(x))))`` for each layer in turn.

    Either way the output ("context") has the input feature's channels and spatial size.
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
        wiring: str = "per_layer",
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
            concat_dropout (float): dropout probability in [0, 1) after each layer's concat
                (section 3.2 item 2: 0.25); 0 removes it.
            wiring (str): "paper" (Figure 3: one hidden-to-output conv on the top IRNN) or
                "per_layer" (a hidden-to-output conv and ReLU in every layer); see the module
                docstring.
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
        if wiring not in IRNN_WIRINGS:
            raise ValueError(
                f"IRNN wiring={wiring!r} is not supported; expected one of {IRNN_WIRINGS}."
            )
        if not 0.0 <= concat_dropout < 1.0:
            raise ValueError(
                f"IRNN concat_dropout={concat_dropout} is invalid; expected a float in [0, 1)."
            )

        self.in_feature = in_feature
        self._out_channels = in_channels
        self._stride = stride
        self.output_all_layers = output_all_layers
        self.wiring = wiring
        per_layer = wiring == "per_layer"
        layers = []
        layer_in = in_channels
        for i in range(num_layers):
            if directions == "all":
                layer_dirs = IRNN_DIRECTIONS
            else:
                layer_dirs = ("right", "left") if i % 2 == 0 else ("down", "up")
            layer = _IRNNLayer(
                layer_in,
                hidden_dim,
                layer_dirs,
                learned_recurrent=recurrent == "learned",
                first_step_bias=first_step_bias,
                shared_input_to_hidden=shared_input_to_hidden,
                concat_dropout=concat_dropout,
                out_channels=in_channels if per_layer else None,
            )
            layers.append(layer)
            if not per_layer:
                layer_in = layer.concat_channels
        self.layers = nn.ModuleList(layers)
        if per_layer:
            self.register_module("hidden_to_output", None)
            self.dropout = nn.Identity()
        else:
            self.hidden_to_output = nn.Conv2d(layer_in, in_channels, kernel_size=1)
            weight_init.c2_xavier_fill(self.hidden_to_output)
            self.dropout = nn.Dropout(concat_dropout) if concat_dropout > 0 else nn.Identity()

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
            "wiring":                 irnn.WIRING,
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
        if self.hidden_to_output is None:
            for layer in self.layers:
                x = layer(x, valid_cells)
                outputs.append(x)
        else:
            for i, layer in enumerate(self.layers):
                if i > 0:
                    x = _concat_dropout(self.dropout, x, self.training)
                x = layer.concat(x, valid_cells)
                outputs.append(x)
            x = _concat_dropout(self.dropout, x, self.training)
            outputs[-1] = _zero_padding(self.hidden_to_output(x), valid_cells)
        if not self.output_all_layers:
            outputs = outputs[-1:]
        # The layers pass channels_last maps to each other; the outputs are contiguous, as the
        # backbone's features are.
        return dict(zip(self._output_names(), map(_to_contiguous, outputs)))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        channels = [self._out_channels] * len(self.layers)
        if self.hidden_to_output is not None:
            # The paper's lower IRNNs output their concat (Table 10b pools it).
            channels = [layer.concat_channels for layer in self.layers[:-1]] + channels[-1:]
        if not self.output_all_layers:
            channels = channels[-1:]
        return {
            name: ShapeSpec(channels=c, stride=self._stride)
            for name, c in zip(self._output_names(), channels)
        }

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of the other wiring would load around the missing convs with only a
        # warning (Detectron2 loads non-strictly) and leave them at their random init.
        per_layer_keys = f"{prefix}layers.0.hidden_to_output.weight" in state_dict
        paper_keys = f"{prefix}hidden_to_output.weight" in state_dict
        if (per_layer_keys and self.hidden_to_output is not None) or (
            paper_keys and self.hidden_to_output is None
        ):
            found = "per_layer" if per_layer_keys else "paper"
            raise ValueError(
                f"The checkpoint's IRNN context ({prefix!r}) has the {found!r} wiring, but the "
                f"model was built with MODEL.ION.CONTEXT.IRNN.WIRING {self.wiring!r}; set "
                f"WIRING to {found!r} to load it (accepted: {IRNN_WIRINGS})."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
