"""Datasets shipped with ion_d2 and helpers to prepare data for ION's segmentation regularizer.

Importing this package registers the bundled synthetic dataset as "ion_synth_train" and
"ion_synth_val" under ``$DETECTRON2_DATASETS`` (default "./datasets"), as Detectron2 registers
its builtin datasets; the data is generated on first use.
"""

from .coco_semseg import attach_sem_seg_files, coco_to_semseg_labels
from .mapper import InvalidSemSegLabel, IONDatasetMapper
from .synthetic import (
    CONTEXT_CLASSES,
    THING_CLASSES,
    TRAIN_DATASET_NAME,
    VAL_DATASET_NAME,
    generate_synthetic_dataset,
    register_ion_synthetic,
)
from .transforms import ResizeLongestEdgeCap

register_ion_synthetic()
