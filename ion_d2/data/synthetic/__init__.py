"""
The bundled synthetic dataset, on which ION's context and skip pooling matter (see
docs/DATASET.md): constants and palette (:mod:`.meta`), the pure renderer (:mod:`.glyphs`,
:mod:`.scene`, :mod:`.render`), and generation, caching and registration (:mod:`.generate`).
"""

from .generate import generate_synthetic_dataset, register_ion_synthetic, split_dir_name
from .meta import (
    CONTEXT_CLASSES,
    CONTEXT_PAIRS,
    LOCAL_CLASSES,
    LOCAL_TRAIN_DATASET_NAME,
    LOCAL_VAL_DATASET_NAME,
    SEM_SEG_CLASSES,
    THING_CLASSES,
    TRAIN_DATASET_NAME,
    VAL_DATASET_NAME,
    variant_spec,
)
from .render import render_sample

__all__ = [
    "CONTEXT_CLASSES",
    "CONTEXT_PAIRS",
    "LOCAL_CLASSES",
    "LOCAL_TRAIN_DATASET_NAME",
    "LOCAL_VAL_DATASET_NAME",
    "SEM_SEG_CLASSES",
    "THING_CLASSES",
    "TRAIN_DATASET_NAME",
    "VAL_DATASET_NAME",
    "generate_synthetic_dataset",
    "register_ion_synthetic",
    "render_sample",
    "split_dir_name",
    "variant_spec",
]
