"""VGG16's fc6/fc7 as Fast R-CNN's (and ION's) box head."""

from typing import List, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_BOX_HEAD_REGISTRY
from detectron2.modeling.roi_heads import FastRCNNConvFCHead
from torch import nn

from .dropout import ion_dropout
from .fc_svd import FC_SVD_RANKS_KEY, IONFactoredLinear, check_fc_svd_ranks

__all__ = ["IONFCHead"]


@ROI_BOX_HEAD_REGISTRY.register()
class IONFCHead(FastRCNNConvFCHead):
    """
    :class:`FastRCNNConvFCHead` without convs whose fc layers are each followed by ReLU and
    dropout: VGG16's fc6 and fc7 with Fast R-CNN's dropout (ION section 3; "D" in Tables 1-3
    removes the dropout). Its parameters are the parent's (``fc1``, ``fc2``, ...), so
    checkpoints of the two heads are interchangeable.

    With ``fc_svd_ranks`` (``MODEL.ION.FC_SVD_RANKS``) an fc layer of rank r > 0 is an
    :class:`IONFactoredLinear` (Fast R-CNN's truncated SVD) under the same name (``fc1.svd_v``,
    ``fc1.svd_u``); an unfactored checkpoint's ``fc1.weight`` is factored as it loads.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        fc_dims: List[int],
        dropout: float,
        fc_svd_ranks: Sequence[int] = (),
    ):
        """
        Args:
            input_shape (ShapeSpec): shape of the pooled region features; ``channels * height *
                width`` inputs per region (a missing height or width counts as 1).
            fc_dims (list[int]): output dimension of each fc layer, e.g. [4096, 4096].
            dropout (float): dropout probability after every fc layer's ReLU, in [0, 1);
                0 disables dropout.
            fc_svd_ranks (list[int]): [] or one rank per fc layer: r > 0 factors that layer at
                rank r, 0 keeps it (:func:`ion_d2.modeling.fc_svd.check_fc_svd_ranks`).
        """
        if len(fc_dims) == 0:
            raise ValueError("IONFCHead needs at least one fc layer; got fc_dims=[].")
        if any(d < 1 for d in fc_dims):
            raise ValueError(f"IONFCHead needs positive fc_dims, got {list(fc_dims)}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"IONFCHead needs dropout in [0, 1), got {dropout}.")
        input_shape = ShapeSpec(
            channels=input_shape.channels,
            height=input_shape.height or 1,
            width=input_shape.width or 1,
        )
        super().__init__(input_shape, conv_dims=[], fc_dims=list(fc_dims))
        self.dropout = float(dropout)
        shapes = [(fc.in_features, fc.out_features) for fc in self.fcs]
        for k, rank in enumerate(check_fc_svd_ranks(fc_svd_ranks, shapes)):
            if rank > 0:
                # Same child name and position as the parent's nn.Linear, so checkpoint keys stay
                # under "fc<k>." and nn.Sequential's order is kept.
                name = self._child_name(self.fcs[k])
                self.fcs[k] = IONFactoredLinear(*shapes[k], rank)
                setattr(self, name, self.fcs[k])

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        if cfg.MODEL.ROI_BOX_HEAD.NUM_CONV != 0:
            raise ValueError(
                "IONFCHead has no conv layers; MODEL.ROI_BOX_HEAD.NUM_CONV must be 0, got "
                f"{cfg.MODEL.ROI_BOX_HEAD.NUM_CONV}."
            )
        return {
            "input_shape": input_shape,
            "fc_dims": [cfg.MODEL.ROI_BOX_HEAD.FC_DIM] * cfg.MODEL.ROI_BOX_HEAD.NUM_FC,
            "dropout": cfg.MODEL.ION.FC_DROPOUT,
            "fc_svd_ranks": cfg.MODEL.ION.FC_SVD_RANKS,
        }

    def _child_name(self, module: nn.Module) -> str:
        return next(name for name, child in self.named_children() if child is module)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A factored checkpoint into an unfactored layer would otherwise leave that layer at its
        # initialisation, with only a "missing keys" warning from Detectron2's checkpointer.
        for fc in self.fcs:
            key = f"{prefix}{self._child_name(fc)}.svd_v.weight"
            if isinstance(fc, nn.Linear) and key in state_dict:
                raise ValueError(
                    f"The checkpoint's {key} is a factored layer of rank "
                    f"{state_dict[key].shape[0]}, but this model's layer is unfactored. Set "
                    f"{FC_SVD_RANKS_KEY} to the ranks the checkpoint was factored at."
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (Tensor): pooled region features of shape (R, C, H, W), or (R, C*H*W).

        Returns:
            Tensor: region features of shape (R, fc_dims[-1]).
        """
        x = torch.flatten(x, start_dim=1)
        for fc in self.fcs:
            x = F.relu(fc(x))
            if self.dropout > 0:
                x = ion_dropout(x, self.dropout, self.training)
        return x
