"""Evaluators beyond Detectron2's stock ones."""

from .context_pairs import ContextPairEvaluator
from .voc_comp4 import PascalVOCComp4Writer
from .voc_size import AREA_RANGES, PascalVOCBySizeEvaluator, voc_ap_in_area_range

__all__ = [
    "AREA_RANGES",
    "ContextPairEvaluator",
    "PascalVOCBySizeEvaluator",
    "PascalVOCComp4Writer",
    "voc_ap_in_area_range",
]
