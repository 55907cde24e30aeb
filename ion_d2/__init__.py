"""ion_d2: Inside-Outside Net (Bell et al., CVPR 2016) as a Detectron2 plugin.

Importing this package registers every ION component in Detectron2's registries:
``build_ion_vgg16_backbone`` (BACKBONE), ``IONFCHead`` (ROI_BOX_HEAD), ``IONROIHeads`` and
``IONRes5ROIHeads`` (ROI_HEADS), ``IONSegRegularizerHead`` (SEM_SEG_HEADS), ``IONRCNN``
(META_ARCH) and the context modules of ``ION_CONTEXT_REGISTRY``.
"""

from . import data as _data  # noqa: F401  (registers the bundled datasets)
from .config import add_ion_config, get_ion_cfg
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
    "get_ion_cfg",
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

# The one place that states the version: setup.py reads this line, CHANGELOG.md's newest release
# heading names it (tests/test_version.py checks both).
__version__ = "0.2.0"
