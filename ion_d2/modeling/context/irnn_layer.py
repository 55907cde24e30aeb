"""
One layer of the IRNN context module (:class:`~ion_d2.modeling.context.irnn.IRNN`): the
input-to-hidden 1x1 conv, the 4-direction scans (:mod:`.irnn_scan`) and their concat, and the
memory-format helpers the scans' channels-last layout needs.
"""

from typing import Dict, Optional, Sequence

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dropout import IONDropout
from ..padding import zero_outside_valid_cells
from .irnn_scan import irnn_scans

__all__ = ["IRNNLayer", "in_contiguous_memory"]


class IRNNLayer(nn.Module):
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
            self.dropout = IONDropout(concat_dropout) if concat_dropout > 0 else nn.Identity()
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
        self, x: Tensor, valid_counts: Optional[Tensor] = None
    ) -> Dict[str, Tensor]:
        """
        The hidden maps of each direction (Figure 4: what each cell summarises of the cells to
        its left, right, above or below).

        Args:
            x (Tensor): (N, C, H, W) layer input.
            valid_counts (Tensor or None): (N, 2) valid rows and columns of each image (see
                :func:`irnn_scans`); None: the whole map.

        Returns:
            dict[str, Tensor]: direction name -> (N, hidden_dim, H, W), in scan order; 0
            outside the valid cells.
        """
        states = self._scans(_in_channels_last_memory(x), valid_counts)
        return {d: states[:, :, :, i].permute(0, 3, 1, 2) for i, d in enumerate(self.directions)}

    def _scans(self, x: Tensor, valid_counts: Optional[Tensor]) -> Tensor:
        """(N, H, W, D, hidden_dim): the directions' states of ``x`` (channels_last memory)."""
        hidden = self.input_to_hidden(x)
        n, channels, height, width = hidden.shape
        hidden = _in_channels_last_memory(hidden).permute(0, 2, 3, 1)
        # Shared, one input-to-hidden map feeds every direction (K = 1); else K = D blocks.
        k = 1 if self.shared_input_to_hidden else len(self.directions)
        hidden = hidden.view(n, height, width, k, channels // k)
        return irnn_scans(hidden, self.directions, self.whh, self.first_step_bias, valid_counts)

    def concat(self, x: Tensor, valid_counts: Optional[Tensor] = None) -> Tensor:
        """
        The IRNN's output as section 3.2 defines it: "concatenating the hidden state from the
        four directions at each spatial location".

        Args:
            x (Tensor): (N, C, H, W) layer input, in any memory format.
            valid_counts (Tensor or None): see :meth:`direction_states`.

        Returns:
            Tensor: (N, D * hidden_dim, H, W), directions in the order right, left, down, up,
            in channels_last memory format; 0 outside the valid cells.
        """
        states = self._scans(_in_channels_last_memory(x), valid_counts)
        n, height, width, _, _ = states.shape
        # The states already lie side by side, channels last: the directions' concatenation,
        # read by the next 1x1 conv without copying.
        return states.view(n, height, width, -1).permute(0, 3, 1, 2)

    def forward(self, x: Tensor, valid_counts: Optional[Tensor] = None) -> Tensor:
        """
        The "per_layer" wiring's layer.

        Args:
            x (Tensor): (N, C, H, W) layer input, in any memory format.
            valid_counts (Tensor or None): see :meth:`direction_states`.

        Returns:
            Tensor: (N, C, H, W) in channels_last memory format (the layout the scans work in;
            the next layer reads it as is).
        """
        # IONDropout draws the mask in this channels_last concatenation's memory order, so the
        # product is one in-order pass over memory, forward and backward.
        concat = self.dropout(self.concat(x, valid_counts))
        out = self.hidden_to_output(concat)
        return F.relu(zero_outside_valid_cells(out, valid_counts, inplace=True))


def _in_channels_last_memory(x: Tensor) -> Tensor:
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


def in_contiguous_memory(x: Tensor) -> Tensor:
    """(N, C, H, W) ``x`` in contiguous (NCHW) memory format; see
    :func:`_in_channels_last_memory`."""
    if x.is_contiguous():
        return x
    n, c, height, width = x.shape
    out = x.new_empty((n, c, height, width))
    for i in range(n):
        out[i].view(c, height * width).copy_(x[i].permute(1, 2, 0).reshape(height * width, c).t())
    return out
