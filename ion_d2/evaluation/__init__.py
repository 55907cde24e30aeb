"""Evaluators beyond Detectron2's stock ones."""

from .voc_comp4 import PascalVOCComp4Writer
from .voc_size import AREA_RANGES, PascalVOCBySizeEvaluator, voc_ap_in_area_range

__all__ = [
    "AREA_RANGES",
    "PascalVOCBySizeEvaluator",
    "PascalVOCComp4Writer",
    "voc_ap_in_area_range",
]
