"""VGG16 trunk of Fast R-CNN (conv1_1 ... conv5_3, no pool5) as a Detectron2 backbone.

ION (section 3) builds on Fast R-CNN's VGG16: 13 3x3 convolutions with ReLU and a 2x2 stride-2
max-pool after conv1_2, conv2_2, conv3_3 and conv4_3. pool5 is left out because the ROI pooling
layer takes its place.
"""

from typing import Dict, List, Sequence

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["IONVGG16", "build_ion_vgg16_backbone"]

# (stage name, VGG16 channels, number of 3x3 convs) for conv1 ... conv5.
_VGG16_STAGES = (
    ("conv1", 64, 2),
    ("conv2", 128, 2),
    ("conv3", 256, 3),
    ("conv4", 512, 3),
    ("conv5", 512, 3),
)
_STAGE_NAMES = tuple(name for name, _, _ in _VGG16_STAGES)


class IONVGG16(Backbone):
    """
    VGG16's convolutional trunk as used by Fast R-CNN and ION, without pool5.

    The features "conv1" ... "conv5" are the ReLU outputs of conv1_2, conv2_2, conv3_3, conv4_3
    and conv5_3, at strides 1, 2, 4, 8 and 16. The convolutions are attributes named
    ``conv1_1`` ... ``conv5_3``, so checkpoint keys read ``backbone.conv4_3.weight``.

    Stages after the last requested feature are not built (like Detectron2's ResNet), so they
    cost neither compute nor unused parameters.

    Max-pooling rounds the output size down, as torchvision's VGG16 does; Caffe's pooling
    rounds up, which only differs for odd input sizes and does not change the strides.
    """

    def __init__(
        self,
        in_channels: int = 3,
        *,
        out_features: Sequence[str],
        width_mult: float = 1.0,
        norm: str = "",
        freeze_at: int = 0,
    ):
        """
        Args:
            in_channels (int): channels of the input image.
            out_features (list[str]): features to return, any of "conv1" ... "conv5".
            width_mult (float): multiplier on VGG16's channels (64, 128, 256, 512, 512); each
                stage gets ``max(1, round(c * width_mult))`` channels. 1.0 is VGG16 itself.
            norm (str): normalization after each conv, see :func:`detectron2.layers.get_norm`;
                "" for none (VGG16).
            freeze_at (int): K in 0..5; the convs of conv1 ... convK get ``requires_grad=False``
                and their BatchNorm layers become :class:`FrozenBatchNorm2d`. 0 freezes
                nothing.
        """
        super().__init__()
        out_features = list(out_features)
        if len(out_features) == 0:
            raise ValueError(
                f"IONVGG16 needs at least one out feature; accepted: {list(_STAGE_NAMES)}."
            )
        unknown = [f for f in out_features if f not in _STAGE_NAMES]
        if unknown:
            raise ValueError(
                f"IONVGG16 got unknown out features {unknown}; accepted: {list(_STAGE_NAMES)}."
            )
        if not width_mult > 0:
            raise ValueError(f"IONVGG16 needs width_mult > 0, got {width_mult}.")
        if not 0 <= freeze_at <= len(_VGG16_STAGES):
            raise ValueError(
                f"IONVGG16 needs freeze_at in 0..{len(_VGG16_STAGES)} (K freezes conv1..convK), "
                f"got {freeze_at}."
            )
        if in_channels is None or in_channels < 1:
            raise ValueError(f"IONVGG16 needs in_channels >= 1, got {in_channels}.")

        self._out_features = out_features
        self._out_feature_channels: Dict[str, int] = {}
        self._out_feature_strides: Dict[str, int] = {}
        num_stages = max(_STAGE_NAMES.index(f) for f in out_features) + 1
        # Per built stage: the names of its conv submodules, in order.
        self._stage_convs: List[List[str]] = []

        channels = in_channels
        for stage_idx, (stage_name, base_channels, num_convs) in enumerate(
            _VGG16_STAGES[:num_stages]
        ):
            out_channels = max(1, int(round(base_channels * width_mult)))
            conv_names = []
            for conv_idx in range(1, num_convs + 1):
                conv = Conv2d(
                    channels,
                    out_channels,
                    kernel_size=3,
                    padding=1,
                    bias=not norm,
                    norm=get_norm(norm, out_channels),
                    activation=F.relu,
                )
                weight_init.c2_msra_fill(conv)
                conv_name = f"{stage_name}_{conv_idx}"
                self.add_module(conv_name, conv)
                conv_names.append(conv_name)
                channels = out_channels
            self._stage_convs.append(conv_names)
            self._out_feature_channels[stage_name] = out_channels
            self._out_feature_strides[stage_name] = 2**stage_idx

        self.freeze(freeze_at)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x (Tensor): images of shape (N, C, H, W).

        Returns:
            dict[str, Tensor]: the requested features, by name.
        """
        if x.dim() != 4:
            raise ValueError(
                f"IONVGG16 takes an input of shape (N, C, H, W), got {tuple(x.shape)}."
            )
        outputs = {}
        for stage_idx, conv_names in enumerate(self._stage_convs):
            if stage_idx > 0:
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            for conv_name in conv_names:
                x = getattr(self, conv_name)(x)
            stage_name = _STAGE_NAMES[stage_idx]
            if stage_name in self._out_features:
                outputs[stage_name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        """
        Inputs are padded to a multiple of the deepest built stride, so every feature map is
        exactly the input size divided by its stride (pooling never drops a row or column).
        """
        return max(self._out_feature_strides.values())

    def freeze(self, freeze_at: int = 0) -> "IONVGG16":
        """
        Freeze conv1 ... conv{freeze_at}, like :meth:`detectron2.modeling.ResNet.freeze`.

        Args:
            freeze_at (int): number of stages to freeze, 0 (none) to 5 (the whole trunk).

        Returns:
            IONVGG16: this backbone.
        """
        for conv_names in self._stage_convs[:freeze_at]:
            for conv_name in conv_names:
                conv = getattr(self, conv_name)
                for p in conv.parameters():
                    p.requires_grad = False
                FrozenBatchNorm2d.convert_frozen_batchnorm(conv)
        return self


@BACKBONE_REGISTRY.register()
def build_ion_vgg16_backbone(cfg, input_shape: ShapeSpec) -> IONVGG16:
    """
    Build :class:`IONVGG16` from ``cfg.MODEL.ION.VGG16`` and ``cfg.MODEL.BACKBONE.FREEZE_AT``.

    Args:
        cfg (CfgNode): a config with :func:`ion_d2.config.add_ion_config` applied.
        input_shape (ShapeSpec): the input image shape; its ``channels`` are used.

    Returns:
        IONVGG16: the backbone.
    """
    return IONVGG16(
        input_shape.channels,
        out_features=cfg.MODEL.ION.VGG16.OUT_FEATURES,
        width_mult=cfg.MODEL.ION.VGG16.WIDTH_MULT,
        norm=cfg.MODEL.ION.VGG16.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
    )
