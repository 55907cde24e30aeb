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

from .padding import valid_cell_counts, valid_cell_mask

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

* ``forward(features: dict[str, Tensor], image_sizes: list[tuple[int, int]] | None = None)
  -> dict[str, Tensor]``: reads ``features[in_feature]`` of shape (N, C, H, W) and returns at
  least ``{"context": Tensor}`` of shape (N, C', H, W). ``image_sizes`` are the images' (h, w)
  before the batch was padded (``ImageList.image_sizes``; None: every image fills the tensor).
  The output must not depend on the batch's padding: at stride ``s`` image ``i`` owns its
  top-left ``ceil(h_i / s) x ceil(w_i / s)`` cells (:mod:`ion_d2.padding`); the module neither
  reads the other cells nor writes anything but 0 there, so an image's context is the same
  alone and in any batch;
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


def _first_cells(direction: str, valid_cells: Tensor, height: int, width: int) -> Tensor:
    """(N, 1, H, W) bool: the first cell of every scan line inside each image's valid cells."""
    dim, reverse = _scan_dim(direction)
    rows = torch.arange(height, device=valid_cells.device)[None, :]
    cols = torch.arange(width, device=valid_cells.device)[None, :]
    valid_h, valid_w = valid_cells[:, :1], valid_cells[:, 1:]
    if dim == 3:
        start = cols == (valid_w - 1 if reverse else 0)
        first = (rows < valid_h)[:, :, None] & start[:, None, :]
    else:
        start = rows == (valid_h - 1 if reverse else 0)
        first = start[:, :, None] & (cols < valid_w)[:, None, :]
    return first[:, None]


def _add_first_step_bias(
    x: Tensor, direction: str, first_step_bias: Optional[Tensor], valid_cells: Optional[Tensor]
) -> Tensor:
    """``x`` plus ``b0`` at each image's own first cell of the scan (None: the map's edge)."""
    if first_step_bias is None:
        return x
    n, _, height, width = x.shape
    if valid_cells is None:
        valid_cells = torch.tensor([[height, width]], device=x.device).expand(n, 2)
    first = _first_cells(direction, valid_cells, height, width)
    return torch.where(first, x + first_step_bias.view(1, -1, 1, 1), x)


def _zero_outside(x: Tensor, valid_cells: Optional[Tensor]) -> Tensor:
    """``x`` with 0 outside each image's valid cells (unchanged when ``valid_cells`` is None)."""
    if valid_cells is None:
        return x
    return x.masked_fill(~valid_cell_mask(valid_cells, x.shape[-2], x.shape[-1]), 0.0)


def _valid_cells_of(
    image_sizes: Optional[Sequence[Tuple[int, int]]], stride: int, x: Tensor
) -> Optional[Tensor]:
    """
    Valid cells of the (N, C, H, W) feature ``x`` at ``stride``; None without sizes or when
    every image covers the whole map (then there is no padding to ignore, and nothing to pay).
    """
    if image_sizes is None:
        return None
    if len(image_sizes) != x.shape[0]:
        raise ValueError(
            f"Got {len(image_sizes)} image sizes for a batch of {x.shape[0]} feature maps; "
            "expected one (h, w) per image."
        )
    height, width = x.shape[-2:]
    if all(-(-h // stride) >= height and -(-w // stride) >= width for h, w in image_sizes):
        return None
    return valid_cell_counts(image_sizes, stride, height, width, x.device)


def irnn_scan(
    x: Tensor,
    whh: Tensor,
    direction: str,
    first_step_bias: Optional[Tensor] = None,
    valid_cells: Optional[Tensor] = None,
) -> Tensor:
    """
    One direction of an IRNN with a learned recurrent transition:
    ``h_t = ReLU(Whh @ h_{t-1} + x_t)`` with ``h_{-1} = 0``, where ``t`` runs along the
    direction (section 3.2). ``x`` is the output of the input-to-hidden 1x1 conv.

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
        valid_cells (Tensor or None): (N, 2) long, the rows and columns of each image's valid
            cells (:func:`ion_d2.padding.valid_cell_counts`); the scan ignores ``x`` outside
            them, starts at each image's own edge (``b0`` at its own first cell, e.g. its last
            valid column for "left") and returns 0 outside them. None: the whole map is valid.

    Returns:
        Tensor: (N, C, H, W) hidden states; at each cell, the state after consuming that cell.
    """
    # Zeroed outside the valid cells, the input keeps h = 0 in the padding before an image
    # (ReLU(Whh @ 0 + 0) = 0), so each image's scan starts at its own edge.
    x = _add_first_step_bias(_zero_outside(x, valid_cells), direction, first_step_bias, valid_cells)
    return _zero_outside(_learned_recurrence(x, whh, direction), valid_cells)


def _learned_recurrence(x: Tensor, whh: Tensor, direction: str) -> Tensor:
    """:func:`irnn_scan` over the whole map, ``b0`` already in ``x``."""
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
        # The first step has h_{-1} = 0, so Whh @ h_{-1} vanishes.
        h = torch.relu(seq[t] if h is None else torch.addmm(seq[t], h, whh_t))
        states[t] = h
    out = torch.stack(states, dim=0)  # (L, batch, C)
    if dim == 3:
        return out.view(width, n, height, c).permute(1, 3, 2, 0)
    return out.view(height, n, width, c).permute(1, 3, 0, 2)


def irnn_scan_identity(
    x: Tensor,
    direction: str,
    first_step_bias: Optional[Tensor] = None,
    valid_cells: Optional[Tensor] = None,
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
        valid_cells (Tensor or None): each image's valid cells, see :func:`irnn_scan`.

    Returns:
        Tensor: (N, C, H, W) hidden states.
    """
    # A reversed scan of an image narrower than the map first crosses the padding: with its
    # input zeroed, S stays 0 there and the recursion enters the image from h = 0.
    x = _add_first_step_bias(_zero_outside(x, valid_cells), direction, first_step_bias, valid_cells)
    return _zero_outside(_identity_recurrence(x, direction), valid_cells)


def _identity_recurrence(x: Tensor, direction: str) -> Tensor:
    """:func:`irnn_scan_identity` over the whole map, ``b0`` already in ``x``."""
    dim, reverse = _scan_dim(direction)
    if reverse:
        x = x.flip(dim)
    prefix = torch.cumsum(x, dim=dim)
    running_min = torch.cummin(prefix, dim=dim).values.clamp(max=0)
    h = prefix - running_min
    return h.flip(dim) if reverse else h


class _IRNNLayer(nn.Module):
    """
    One IRNN layer of Figure 3: a 1x1 input-to-hidden conv (shared by all directions, or one per
    direction), one recurrence per direction, concatenation of the directions' hidden maps,
    dropout, and a 1x1 hidden-to-output conv back to the input's channels followed by ReLU.
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
                :func:`irnn_scan`); None: the whole map.

        Returns:
            dict[str, Tensor]: direction name -> (N, hidden_dim, H, W), in scan order; 0
            outside the valid cells.
        """
        states = self._scans(x, valid_cells)
        return {d: _zero_outside(h, valid_cells) for d, h in states.items()}

    def _scans(self, x: Tensor, valid_cells: Optional[Tensor]) -> Dict[str, Tensor]:
        """
        :meth:`direction_states` (each equal to :func:`irnn_scan` / :func:`irnn_scan_identity`
        of its input-to-hidden map), but with arbitrary values outside the valid cells: the
        padding is zeroed once in the shared input rather than in each scan's input and output.
        """
        hidden = self.input_to_hidden(x)
        if valid_cells is not None:
            # In place: the conv's backward does not need its output.
            hidden.masked_fill_(~valid_cell_mask(valid_cells, x.shape[-2], x.shape[-1]), 0.0)
        if self.shared_input_to_hidden:
            inputs = [hidden] * len(self.directions)
        else:
            inputs = hidden.chunk(len(self.directions), dim=1)
        states = {}
        for i, direction in enumerate(self.directions):
            b0 = None if self.first_step_bias is None else self.first_step_bias[i]
            h = _add_first_step_bias(inputs[i], direction, b0, valid_cells)
            if self.whh is None:
                states[direction] = _identity_recurrence(h, direction)
            else:
                states[direction] = _learned_recurrence(h, self.whh[i], direction)
        return states

    def forward(self, x: Tensor, valid_cells: Optional[Tensor] = None) -> Tensor:
        # The states outside the valid cells only reach the output there (1x1 conv), which is
        # zeroed: the output conv's bias must not reach the next layer, the ROI pooler or the
        # seg head. Zeroed before the ReLU, in place (the conv's backward does not need it).
        concat = self.dropout(torch.cat(list(self._scans(x, valid_cells).values()), dim=1))
        out = self.hidden_to_output(concat)
        if valid_cells is not None:
            out.masked_fill_(~valid_cell_mask(valid_cells, x.shape[-2], x.shape[-1]), 0.0)
        return F.relu(out)


@ION_CONTEXT_REGISTRY.register()
class IRNN(nn.Module):
    """
    Stacked 4-direction IRNN context module (section 3.2, Figure 3, Tables 8-10).

    Each layer computes ``x -> ReLU(conv1x1(dropout(concat_d(scan_d(conv1x1(x))))))``: an
    input-to-hidden 1x1 conv (with bias) shared by the directions (or one per direction); per
    direction ``d`` the recurrence ``h_t = ReLU(Whh_d h_{t-1} + x_t)`` moving right, left, down
    or up (:func:`irnn_scan`, or :func:`irnn_scan_identity` when ``Whh`` is removed); the
    directions' hidden maps concatenated on channels in the order right, left, down, up;
    dropout (training only); and a 1x1 hidden-to-output conv back to the layer's input channels,
    followed by ReLU. The output thus has the input feature's channels and spatial size.

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
        in_feature, shape = _in_feature_shape(cfg, input_shape)
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
        x = _get_feature(features, self.in_feature)
        valid_cells = _valid_cells_of(image_sizes, self._stride, x)
        outputs = []
        for layer in self.layers:
            x = layer(x, valid_cells)
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

    def forward(
        self,
        features: Dict[str, Tensor],
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Dict[str, Tensor]:
        """See :class:`IRNN.forward`; returns ``{"context": (N, channels, H, W)}``."""
        x = _get_feature(features, self.in_feature)
        valid_cells = _valid_cells_of(image_sizes, self._stride, x)
        for conv in self.convs:
            x = F.relu(conv(_zero_outside(x, valid_cells)))
        return {"context": _zero_outside(x, valid_cells)}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {"context": ShapeSpec(channels=self._out_channels, stride=self._stride)}


@ION_CONTEXT_REGISTRY.register()
class GlobalAvgPool(nn.Module):
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
        super().__init__()
        self.in_feature = in_feature
        self._out_channels = in_channels
        self._stride = stride

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> Dict:
        in_feature, shape = _in_feature_shape(cfg, input_shape)
        return {"in_feature": in_feature, "in_channels": shape.channels, "stride": shape.stride}

    def forward(
        self,
        features: Dict[str, Tensor],
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Dict[str, Tensor]:
        """See :class:`IRNN.forward`; returns ``{"context": (N, C, H, W)}``."""
        x = _get_feature(features, self.in_feature)
        valid_cells = _valid_cells_of(image_sizes, self._stride, x)
        if valid_cells is None:
            pooled = x.mean(dim=(2, 3), keepdim=True)
        else:
            area = valid_cells.prod(dim=1).to(x.dtype).view(-1, 1, 1, 1)
            pooled = _zero_outside(x, valid_cells).sum(dim=(2, 3), keepdim=True) / area
        # A real (contiguous) tile rather than a stride-0 view, so that consumers may write to
        # it or hand it to kernels that assume dense storage.
        return {"context": _zero_outside(pooled.expand_as(x).contiguous(), valid_cells)}

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
