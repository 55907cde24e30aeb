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
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from ..dropout import IONDropout
from ..padding import zero_outside_valid_cells
from .build import ION_CONTEXT_REGISTRY, IONContextModule, context_input_shape
from .irnn_layer import IRNNLayer, in_contiguous_memory
from .irnn_scan import IRNN_DIRECTIONS

__all__ = ["IRNN", "IRNN_WIRINGS"]

_IRNN_RECURRENT = ("learned", "removed")
_IRNN_DIRECTION_MODES = ("all", "lr_then_ud")
IRNN_WIRINGS = ("paper", "per_layer")


@ION_CONTEXT_REGISTRY.register()
class IRNN(IONContextModule):
    """
    Stacked 4-direction IRNN context module (section 3.2, Figure 3, Tables 8-10).

    An IRNN layer is an input-to-hidden 1x1 conv (with bias) shared by the directions (or one per
    direction); per direction ``d`` the recurrence of :mod:`ion_d2.modeling.context.irnn_scan` with
    its own ``Whh_d`` (or ``Whh = I`` when removed) moving right, left, down or up
    (:func:`irnn_scans`, all directions at once); and the directions' hidden maps concatenated on
    channels in the order right, left, down, up. How layers connect is ``wiring`` (the module
    docstring states both and the paper's sentences they rest on):

    - "paper": ``x -> L_1 -> dropout -> L_2 -> ... -> L_n -> dropout -> conv1x1`` where ``L_k``
      is a layer's concat; layer ``k > 1``'s input-to-hidden conv reads layer ``k - 1``'s concat
      and the one hidden-to-output conv maps the top concat back to the input's channels, with
      no ReLU after it.
    - "per_layer": ``x -> ReLU(conv1x1(dropout(L_k(x))))`` for each layer in turn.

    Either way the output ("context") has the input feature's channels and spatial size.
    Between the convs the maps are channels last, so the scans' steps and the concatenation
    need no layout change.

    Given the images' sizes, every layer works on each image's valid cells only
    (:mod:`ion_d2.modeling.padding`): the scans start at the image's own edges and the padding
    stays 0, so an image's context does not depend on the rest of its batch.
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
        wiring: str = "paper",
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
        super().__init__(in_feature=in_feature, stride=stride, out_channels=in_channels)
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

        self.output_all_layers = output_all_layers
        self.wiring = wiring
        # What rewired() rebuilds the stack from.
        self._init_args = dict(
            in_feature=in_feature,
            in_channels=in_channels,
            stride=stride,
            hidden_dim=hidden_dim,
            num_layers=num_layers,
            recurrent=recurrent,
            directions=directions,
            first_step_bias=first_step_bias,
            output_all_layers=output_all_layers,
            shared_input_to_hidden=shared_input_to_hidden,
            concat_dropout=concat_dropout,
        )
        per_layer = wiring == "per_layer"
        layers = []
        layer_in = in_channels
        for i in range(num_layers):
            if directions == "all":
                layer_dirs = IRNN_DIRECTIONS
            else:
                layer_dirs = ("right", "left") if i % 2 == 0 else ("down", "up")
            layer = IRNNLayer(
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
            self.dropout = IONDropout(concat_dropout) if concat_dropout > 0 else nn.Identity()

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
        x, valid_counts = self.input_and_valid_counts(features, image_sizes)
        outputs = []
        if self.hidden_to_output is None:
            for layer in self.layers:
                x = layer(x, valid_counts)
                outputs.append(x)
        else:
            # Dropout on the channels_last concats draws each mask in its concat's memory order
            # (IONDropout), so the products run in order over memory.
            for i, layer in enumerate(self.layers):
                if i > 0:
                    x = self.dropout(x)
                x = layer.concat(x, valid_counts)
                outputs.append(x)
            x = self.dropout(x)
            out = self.hidden_to_output(x)
            outputs[-1] = zero_outside_valid_cells(out, valid_counts, inplace=True)
        if not self.output_all_layers:
            outputs = outputs[-1:]
        # The layers pass channels_last maps to each other; the outputs are contiguous, as the
        # backbone's features are.
        return dict(zip(self._output_names(), map(in_contiguous_memory, outputs)))

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

    @staticmethod
    def wiring_of(state_dict, prefix: str = "") -> Optional[str]:
        """The wiring of the IRNN whose weights are ``state_dict``'s keys under ``prefix``, as
        its keys tell (None: no IRNN there)."""
        if f"{prefix}layers.0.hidden_to_output.weight" in state_dict:
            return "per_layer"
        if f"{prefix}hidden_to_output.weight" in state_dict:
            return "paper"
        return None

    def rewire(self, wiring: str) -> None:
        """
        Rebuild the stack with another ``wiring`` (new, untrained weights on the same device),
        everything else as built; the random generators are left as they were. For loading a
        checkpoint of the other wiring into a model built for inference
        (:class:`ion_d2.engine.checkpoint.IONCheckpointer`). With ``output_all_layers`` the
        wirings' outputs differ in channels, so the heads reading them would not fit: refused.
        """
        if wiring == self.wiring:
            return
        if self.output_all_layers:
            raise ValueError(
                f"Cannot rewire an IRNN with output_all_layers from {self.wiring!r} to "
                f"{wiring!r}: its lower layers' outputs change channels. Set "
                f"MODEL.ION.CONTEXT.IRNN.WIRING {wiring!r} in the config."
            )
        device = next(self.parameters()).device
        with torch.random.fork_rng(devices=[]):
            other = IRNN(**self._init_args, wiring=wiring).to(device)
        self.layers, self.dropout = other.layers, other.dropout
        self.hidden_to_output = other.hidden_to_output
        self.wiring = wiring
        self.train(self.training)

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
