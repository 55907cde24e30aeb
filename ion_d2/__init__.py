"""ion_d2: Inside-Outside Net (Bell et al., CVPR 2016) as a Detectron2 plugin.

Importing this package registers every ION component in Detectron2's registries.
"""
from .config import add_ion_config

__all__ = ["add_ion_config"]
