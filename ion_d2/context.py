"""
ION's context modules (section 3.2, Figure 3; alternatives of Table 7).

A context module reads one backbone feature and returns a feature named ``"context"`` with the
same stride, from which the ROI heads pool like from any backbone feature. The paper's model is
the 2x stacked 4-direction IRNN (:class:`IRNN`); :class:`StackedConv` and :class:`GlobalAvgPool`
are the alternatives compared in Table 7.

The directional recurrences are the module-level functions :func:`irnn_scan` (learned recurrent
transition ``Whh``) and :func:`irnn_scan_identity` (``Whh = I``, closed form, no step loop).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from torch import Tensor, nn

__all__ = [
    "ION_CONTEXT_REGISTRY",
    "build_ion_context",
    "irnn_scan",
    "irnn_scan_identity",
    "IRNN_DIRECTIONS",
    "IRNN",
    "StackedConv",
    "GlobalAvgPool",
]

ION_CONTEXT_REGISTRY = Registry("ION_CONTEXT")
ION_CONTEXT_REGISTRY.__doc__ = """
Registry for ION's context modules (section 3.2, Table 7), selected by
``cfg.MODEL.ION.CONTEXT.NAME``.

The registered object is called with ``(cfg, input_shape)``, where ``input_shape`` is a
``dict[str, ShapeSpec]`` of the backbone's features, and must return an ``nn.Module`` that reads
``cfg.MODEL.ION.CONTEXT.IN_FEATURE`` and has:

* ``forward(features: dict[str, Tensor]) -> dict[str, Tensor]``: reads
  ``features[in_feature]`` of shape (N, C, H, W) and returns at least ``{"context": Tensor}``
  of shape (N, C', H, W);
* ``output_shape() -> dict[str, ShapeSpec]``: channels and stride (the input feature's) of
  every returned feature.
"""

#: Scan directions of a 4-direction IRNN layer, in the order their hidden maps are concatenated.
IRNN_DIRECTIONS = ("right", "left", "down", "up")

_IRNN_RECURRENT = ("learned", "removed")
_IRNN_DIRECTION_MODES = ("all", "lr_then_ud")


def build_ion_context(cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Optional[nn.Module]:
    """
    Build the context module named by ``cfg.MODEL.ION.CONTEXT.NAME``.

    Args:
        cfg (CfgNode): a config with ION's keys (see :func:`ion_d2.config.add_ion_config`).
        input_shape (dict[str, ShapeSpec]): the backbone's output shapes.

    Returns:
        nn.Module or None: the context module, or None when the name is "" (no context).
    """
    name = cfg.MODEL.ION.CONTEXT.NAME
    if name == "":
        return None
    if name not in ION_CONTEXT_REGISTRY:
        registered = sorted(k for k, _ in ION_CONTEXT_REGISTRY)
        raise KeyError(
            f"cfg.MODEL.ION.CONTEXT.NAME={name!r} is not in the ION_CONTEXT registry; "
            f'registered names: {registered} (or "" for no context module).'
        )
    return ION_CONTEXT_REGISTRY.get(name)(cfg, input_shape)


def _in_feature_shape(cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Tuple[str, ShapeSpec]:
    """Return ``(IN_FEATURE, its ShapeSpec)``, with a clear error when it is missing."""
    in_feature = cfg.MODEL.ION.CONTEXT.IN_FEATURE
    if in_feature not in input_shape:
        raise ValueError(
            f"cfg.MODEL.ION.CONTEXT.IN_FEATURE={in_feature!r} is not among the input features "
            f"{sorted(input_shape)}."
        )
    return in_feature, input_shape[in_feature]


def _get_feature(features: Dict[str, Tensor], in_feature: str) -> Tensor:
    if in_feature not in features:
        raise KeyError(
            f"The context module reads feature {in_feature!r}, which is not among the given "
            f"features {sorted(features)}."
        )
    return features[in_feature]


def _scan_dim(direction: str) -> Tuple[int, bool]:
    """Return (the dim of an (N, C, H, W) tensor a scan moves along, whether it moves backwards)."""
    if direction == "right":
        return 3, False
    if direction == "left":
        return 3, True
    if direction == "down":
        return 2, False
    if direction == "up":
        return 2, True
    raise ValueError(f"Unknown IRNN direction {direction!r}; expected one of {IRNN_DIRECTIONS}.")


def irnn_scan(
    x: Tensor, whh: Tensor, direction: str, first_step_bias: Optional[Tensor] = None
) -> Tensor:
    """
    One direction of an IRNN with a learned recurrent transition:
    ``h_t = ReLU(Whh @ h_{t-1} + x_t)`` with ``h_{-1} = 0``, where ``t`` runs along the
    direction (section 3.2). ``x`` is the output of the shared input-to-hidden 1x1 conv.

    All rows (for "right"/"left") or columns (for "down"/"up") of all images advance together:
    each step is a single ``(N*H, C) x (C, C)`` (or ``(N*W, C) x (C, C)``) matrix multiply, so
    the Python loop has W (or H) iterations, not N*H*W.

    Args:
        x (Tensor): (N, C, H, W) input-to-hidden activations.
        whh (Tensor): (C, C) recurrent transition; the new state is ``whh @ h`` for a column
            vector ``h``.
        direction (str): one of "right" (along W, left to right), "left" (along W, right to
            left), "down" (along H, top to bottom) or "up" (along H, bottom to top).
        first_step_bias (Tensor or None): (C,) bias ``b0`` added to ``x`` at the first step of
            the scan (section 3.2 item 3), or None.

    Returns:
        Tensor: (N, C, H, W) hidden states; at each cell, the state after consuming that cell.
    """
    dim, reverse = _scan_dim(direction)
    n, c, height, width = x.shape
    # Sequence-first, channels-last layout: seq[t] is a contiguous (batch, C) slab, where the
    # batch holds every row (or column) of every image.
    if dim == 3:
        seq = x.permute(3, 0, 2, 1).reshape(width, n * height, c)
    else:
        seq = x.permute(2, 0, 3, 1).reshape(height, n * width, c)
    length = seq.shape[0]
    whh_t = whh.t()
    steps = range(length - 1, -1, -1) if reverse else range(length)
    states: List[Optional[Tensor]] = [None] * length
    h: Optional[Tensor] = None
    for t in steps:
        x_t = seq[t]
        if h is None:
            h = torch.relu(x_t if first_step_bias is None else x_t + first_step_bias)
        else:
            h = torch.relu(torch.addmm(x_t, h, whh_t))
        states[t] = h
    out = torch.stack(states, dim=0)  # (L, batch, C)
    if dim == 3:
        return out.view(width, n, height, c).permute(1, 3, 2, 0)
    return out.view(height, n, width, c).permute(1, 3, 0, 2)


def irnn_scan_identity(
    x: Tensor, direction: str, first_step_bias: Optional[Tensor] = None
) -> Tensor:
    """
    One direction of an IRNN with the recurrent transition removed (``Whh = I``, section 3.2
    item 1, Table 9): ``h_t = max(0, h_{t-1} + x_t)`` with ``h_{-1} = 0``.

    This is Lindley's recursion, whose closed form is
    ``h_t = S_t - min(0, min_{k <= t} S_k)`` with ``S_t = x_0 + ... + x_t`` the prefix sum along
    the direction (``h_t`` restarts from 0 after the running minimum of ``S``). It is computed
    with ``torch.cumsum`` / ``torch.cummin`` over the whole map at once, without a step loop;
    "left" and "up" scan the flipped map. Gradients equal the step loop's (both are 1 for the
    inputs after the last reset and 0 before). Its rounding error is that of the prefix sums, so
    it grows with the scan length and the magnitude of ``S`` (in float32 on a 38x50 conv5 map,
    about 1e-7 of the largest value; see ``benchmarks/bench_irnn.py``).

    Args:
        x (Tensor): (N, C, H, W) input-to-hidden activations.
        direction (str): "right", "left", "down" or "up" (see :func:`irnn_scan`).
        first_step_bias (Tensor or None): (C,) bias ``b0`` added to ``x`` at the first step of
            the scan, or None.

    Returns:
        Tensor: (N, C, H, W) hidden states.
    """
    dim, reverse = _scan_dim(direction)
    if reverse:
        x = x.flip(dim)
    if first_step_bias is not None:
        first = x.narrow(dim, 0, 1) + first_step_bias.view(1, -1, 1, 1)
        x = torch.cat([first, x.narrow(dim, 1, x.shape[dim] - 1)], dim=dim)
    prefix = torch.cumsum(x, dim=dim)
    running_min = torch.cummin(prefix, dim=dim).values.clamp(max=0)
    h = prefix - running_min
    return h.flip(dim) if reverse else h


class _IRNNLayer(nn.Module):
    """
    One IRNN layer of Figure 3: a 1x1 input-to-hidden conv shared by all directions, one
    recurrence per direction, concatenation of the directions' hidden maps, and a 1x1
    hidden-to-output conv back to the input's channels followed by ReLU.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_dim: int,
        directions: Sequence[str],
        learned_recurrent: bool,
        first_step_bias: bool,
    ):
        super().__init__()
        self.directions = tuple(directions)
        num_dirs = len(self.directions)
        self.input_to_hidden = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
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

    def direction_states(self, x: Tensor) -> Dict[str, Tensor]:
        """
        The hidden maps of each direction (Figure 4: what each cell summarises of the cells to
        its left, right, above or below).

        Args:
            x (Tensor): (N, C, H, W) layer input.

        Returns:
            dict[str, Tensor]: direction name -> (N, hidden_dim, H, W), in scan order.
        """
        hidden = self.input_to_hidden(x)
        states = {}
        for i, direction in enumerate(self.directions):
            b0 = None if self.first_step_bias is None else self.first_step_bias[i]
            if self.whh is None:
                states[direction] = irnn_scan_identity(hidden, direction, b0)
            else:
                states[direction] = irnn_scan(hidden, self.whh[i], direction, b0)
        return states

    def forward(self, x: Tensor) -> Tensor:
        states = self.direction_states(x)
        return F.relu(self.hidden_to_output(torch.cat(list(states.values()), dim=1)))


@ION_CONTEXT_REGISTRY.register()
class IRNN(nn.Module):
    """
    Stacked 4-direction IRNN context module (section 3.2, Figure 3, Tables 8-10).

    Each layer computes ``x -> ReLU(conv1x1(concat_d(scan_d(conv1x1(x)))))``: an input-to-hidden
    1x1 conv (with bias) shared by the directions; per direction ``d`` the recurrence
    ``h_t = ReLU(Whh_d h_{t-1} + x_t)`` moving right, left, down or up
    (:func:`irnn_scan`, or :func:`irnn_scan_identity` when ``Whh`` is removed); the directions'
    hidden maps concatenated on channels in the order right, left, down, up; and a 1x1
    hidden-to-output conv back to the layer's input channels, followed by ReLU. The output thus
    has the input feature's channels and spatial size.
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
    ):
        """
        NOTE: this interface is experimental.

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
                )
            )
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict:
        in_feature, shape = _in_feature_shape(cfg, input_shape)
        irnn = cfg.MODEL.ION.CONTEXT.IRNN
        # fmt: off
        return {
            "in_feature":        in_feature,
            "in_channels":       shape.channels,
            "stride":            shape.stride,
            "hidden_dim":        irnn.HIDDEN_DIM,
            "num_layers":        irnn.NUM_LAYERS,
            "recurrent":         irnn.RECURRENT,
            "directions":        irnn.DIRECTIONS,
            "first_step_bias":   irnn.FIRST_STEP_BIAS,
            "output_all_layers": irnn.OUTPUT_ALL_LAYERS,
        }
        # fmt: on

    def _output_names(self) -> List[str]:
        names = []
        if self.output_all_layers:
            names = [f"context_{i}" for i in range(1, len(self.layers))]
        return names + ["context"]

    def forward(self, features: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """
        Args:
            features (dict[str, Tensor]): backbone features; reads ``features[in_feature]``
                of shape (N, C, H, W).

        Returns:
            dict[str, Tensor]: ``{"context": (N, C, H, W)}``, plus ``"context_1"``, ...,
            ``"context_{L-1}"`` for the intermediate layers when ``output_all_layers``.
        """
        x = _get_feature(features, self.in_feature)
        outputs = []
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        if not self.output_all_layers:
            outputs = outputs[-1:]
        return dict(zip(self._output_names(), outputs))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_channels, stride=self._stride)
            for name in self._output_names()
        }


@ION_CONTEXT_REGISTRY.register()
class StackedConv(nn.Module):
    """
    Stacked convolutions as context (Table 7a: 2 x 512x3x3; Table 7b: 2 x 256x5x5): ``num_layers``
    ``kernel_size`` x ``kernel_size`` convs (same padding), each followed by ReLU.
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
        NOTE: this interface is experimental.

        Args:
            in_feature (str): name of the feature to read.
            in_channels (int): channels of that feature.
            stride (int): stride of that feature; also the output stride.
            num_layers (int): number of convs.
            kernel_size (int): odd kernel size; padding ``kernel_size // 2`` keeps H x W.
            channels (int): output channels of every conv.
        """
        super().__init__()
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
        self.in_feature = in_feature
        self._out_channels = channels
        self._stride = stride
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
        in_feature, shape = _in_feature_shape(cfg, input_shape)
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

    def forward(self, features: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """See :class:`IRNN.forward`; returns ``{"context": (N, channels, H, W)}``."""
        x = _get_feature(features, self.in_feature)
        for conv in self.convs:
            x = F.relu(conv(x))
        return {"context": x}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {"context": ShapeSpec(channels=self._out_channels, stride=self._stride)}


@ION_CONTEXT_REGISTRY.register()
class GlobalAvgPool(nn.Module):
    """
    Global average pooling as context (Table 7c, ParseNet): the feature is averaged over H and W
    and tiled ("unpooled") back to H x W. No parameters.
    """

    @configurable
    def __init__(self, *, in_feature: str, in_channels: int, stride: int):
        """
        NOTE: this interface is experimental.

        Args:
            in_feature (str): name of the feature to read.
            in_channels (int): channels of that feature; also the output channels.
            stride (int): stride of that feature; also the output stride.
        """
        super().__init__()
        self.in_feature = in_feature
        self._out_channels = in_channels
        self._stride = stride

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict:
        in_feature, shape = _in_feature_shape(cfg, input_shape)
        return {"in_feature": in_feature, "in_channels": shape.channels, "stride": shape.stride}

    def forward(self, features: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """See :class:`IRNN.forward`; returns ``{"context": (N, C, H, W)}``."""
        x = _get_feature(features, self.in_feature)
        pooled = x.mean(dim=(2, 3), keepdim=True)
        # A real (contiguous) tile rather than a stride-0 view, so that consumers may write to
        # it or hand it to kernels that assume dense storage.
        return {"context": pooled.expand_as(x).contiguous()}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {"context": ShapeSpec(channels=self._out_channels, stride=self._stride)}


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

    @property
    def layers(self) -> nn.ModuleList:
        """The IRNN branch's layers (for inspection, as :attr:`IRNN.layers`)."""
        return self.irnn.layers

    def forward(self, features: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """
        Returns:
            dict[str, Tensor]: the IRNN's outputs and ``"context_conv"``.
        """
        out = self.irnn(features)
        out["context_conv"] = self.stacked_conv(features)["context"]
        return out

    def output_shape(self) -> Dict[str, ShapeSpec]:
        shapes = self.irnn.output_shape()
        shapes["context_conv"] = self.stacked_conv.output_shape()["context"]
        return shapes
