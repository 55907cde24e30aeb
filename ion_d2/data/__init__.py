"""Datasets shipped with ion_d2 and helpers to prepare data for ION's segmentation regularizer.

Importing this package registers the bundled synthetic dataset as "ion_synth_train" and
"ion_synth_val", and its local variant (a pair decided by a thin structure just outside the box)
as "ion_synth_local_train" and "ion_synth_local_val", under ``$DETECTRON2_DATASETS`` (default
"./datasets"), as Detectron2 registers its builtin datasets; the data is generated on first
use. It also registers Detectron2's builtin VOC and COCO training sets with ION's segmentation
labels as ``<builtin name>_ionseg`` (see :mod:`ion_d2.data.builtin_ionseg`), and VOC 2012
test's images as "voc_2012_test" (:mod:`ion_d2.data.voc2012_testset`).
"""

from .builtin_ionseg import ION_SEG_SUFFIX, register_all_ionseg
from .coco_semseg import attach_sem_seg_files, coco_to_semseg_labels
from .mapper import InvalidSemSegLabel, IONDatasetMapper
from .semseg_check import check_sem_seg_labels
from .synthetic import (
    CONTEXT_CLASSES,
    THING_CLASSES,
    TRAIN_DATASET_NAME,
    VAL_DATASET_NAME,
    generate_synthetic_dataset,
    register_ion_synthetic,
)
from .transforms import ResizeLongestEdgeCap
from .voc2012_testset import (
    VOC_2012_TEST,
    load_voc_test_images,
    register_voc_2012_test,
    register_voc_test,
)

__all__ = [
    "ION_SEG_SUFFIX",
    "IONDatasetMapper",
    "InvalidSemSegLabel",
    "ResizeLongestEdgeCap",
    "attach_sem_seg_files",
    "check_sem_seg_labels",
    "coco_to_semseg_labels",
    "generate_synthetic_dataset",
    "register_all_ionseg",
    "register_ion_synthetic",
    "CONTEXT_CLASSES",
    "THING_CLASSES",
    "TRAIN_DATASET_NAME",
    "VAL_DATASET_NAME",
    "VOC_2012_TEST",
    "load_voc_test_images",
    "register_voc_2012_test",
    "register_voc_test",
]

register_ion_synthetic()
register_ion_synthetic(variant="local")
register_all_ionseg()
register_voc_2012_test()
