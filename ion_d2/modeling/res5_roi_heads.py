"""ION's skip pooling on ResNet-C4: res5 stays the box head (section 3.1 on a C4 detector)."""

from typing import Dict

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads

from .roi_heads import build_ion_skip_pooler, skip_pool_inputs

__all__ = ["IONRes5ROIHeads"]


@ROI_HEADS_REGISTRY.register()
class IONRes5ROIHeads(Res5ROIHeads):
    """
    :class:`Res5ROIHeads` whose pooler is :class:`IONSkipPooler`: every ROI is pooled from each
    feature in ``MODEL.ROI_HEADS.IN_FEATURES`` (e.g. res2, res3, res4 and "context"),
    L2-normalised, concatenated, re-scaled and reduced by the 1x1 conv to the channels res5
    takes (``RES2_OUT_CHANNELS * 4``, 1024 for R50), so res5 (and its ImageNet weights) is
    the box head as in the stock C4 model. ``MODEL.ION.SKIP_POOL.REDUCE_DIM`` is not used.
    """

    @configurable
    def __init__(self, **kwargs):
        """See :class:`Res5ROIHeads`; ``pooler`` is an :class:`IONSkipPooler`."""
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        # Res5ROIHeads.from_config pools one feature; it builds res5 and the predictor from the
        # config, so it is given one (any) and its pooler replaced.
        one = cfg.clone()
        one.defrost()
        one.MODEL.ROI_HEADS.IN_FEATURES = [next(iter(input_shape))]
        ret = super().from_config(one, input_shape)
        res5_in_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 4
        ret["in_features"] = skip_pool_inputs(cfg)[0]
        ret["pooler"] = build_ion_skip_pooler(cfg, input_shape, out_channels=res5_in_channels)
        return ret
