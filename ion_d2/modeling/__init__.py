"""
ION's model, registered in Detectron2's registries on import: the VGG16 backbone (:mod:`.vgg16`),
the context modules and their IRNN scans (:mod:`.context`), the per-image padding rules every
batched module follows (:mod:`.padding`), ROI pooling and skip pooling (:mod:`.roi_pool`,
:mod:`.skip_pooling` with :mod:`.feature_order`), the heads (:mod:`.roi_heads`,
:mod:`.res5_roi_heads`, :mod:`.box_head` with :mod:`.fc_svd`, :mod:`.box_voting`, :mod:`.seg_head`),
the meta-architecture (:mod:`.meta_arch`) and test-time augmentation
(:mod:`.test_time_augmentation`).
"""

from . import box_head  # noqa: F401  (registers IONFCHead)
from .context import ION_CONTEXT_REGISTRY, build_ion_context
from .meta_arch import IONRCNN
from .res5_roi_heads import IONRes5ROIHeads
from .roi_heads import IONROIHeads
from .seg_head import IONSegRegularizerHead
from .skip_pooling import IONSkipPooler
from .test_time_augmentation import IONRCNNWithTTA
from .vgg16 import IONVGG16, build_ion_vgg16_backbone

__all__ = [
    "ION_CONTEXT_REGISTRY",
    "build_ion_context",
    "IONRCNN",
    "IONRCNNWithTTA",
    "IONROIHeads",
    "IONRes5ROIHeads",
    "IONSegRegularizerHead",
    "IONSkipPooler",
    "IONVGG16",
    "build_ion_vgg16_backbone",
]
