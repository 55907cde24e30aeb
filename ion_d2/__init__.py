"""ion_d2: Inside-Outside Net (Bell et al., CVPR 2016) as a Detectron2 plugin.

Importing this package registers every ION component in Detectron2's registries:
``build_ion_vgg16_backbone`` (BACKBONE), ``IONFCHead`` (ROI_BOX_HEAD), ``IONROIHeads`` and
``IONRes5ROIHeads`` (ROI_HEADS), ``IONSegRegularizerHead`` (SEM_SEG_HEADS), ``IONRCNN``
(META_ARCH) and the context modules of ``ION_CONTEXT_REGISTRY``.
"""

from . import box_head as _box_head  # noqa: F401  (registration only)
from . import data as _data  # noqa: F401  (registers the bundled datasets)
from .config import add_ion_config
from .context import ION_CONTEXT_REGISTRY, build_ion_context
from .meta_arch import IONRCNN
from .predictor import IONPredictor
from .res5_roi_heads import IONRes5ROIHeads
from .roi_heads import IONROIHeads
from .seg_head import IONSegRegularizerHead
from .test_time_augmentation import IONRCNNWithTTA
from .vgg16 import IONVGG16, build_ion_vgg16_backbone

__all__ = [
    "add_ion_config",
    "ION_CONTEXT_REGISTRY",
    "build_ion_context",
    "IONRCNN",
    "IONPredictor",
    "IONRCNNWithTTA",
    "IONROIHeads",
    "IONRes5ROIHeads",
    "IONSegRegularizerHead",
    "IONVGG16",
    "build_ion_vgg16_backbone",
]
