"""ion_d2: Inside-Outside Net (Bell et al., CVPR 2016) as a Detectron2 plugin.

Importing this package registers every ION component in Detectron2's registries:
``build_ion_vgg16_backbone`` (BACKBONE), ``IONFCHead`` (ROI_BOX_HEAD), ``IONROIHeads`` and
``IONRes5ROIHeads`` (ROI_HEADS), ``IONSegRegularizerHead`` (SEM_SEG_HEADS), ``IONRCNN``
(META_ARCH) and the context modules of ``ION_CONTEXT_REGISTRY``.
"""

from . import data as _data  # noqa: F401  (registers the bundled datasets)
from .config import add_ion_config
from .engine import IONPredictor
from .modeling import (
    ION_CONTEXT_REGISTRY,
    IONRCNN,
    IONVGG16,
    IONRCNNWithTTA,
    IONRes5ROIHeads,
    IONROIHeads,
    IONSegRegularizerHead,
    build_ion_context,
    build_ion_vgg16_backbone,
)

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
