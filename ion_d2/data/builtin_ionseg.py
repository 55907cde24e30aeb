"""Detectron2's builtin VOC and COCO training sets with ION's segmentation labels.

``<builtin name>_ionseg`` (e.g. "voc_2007_trainval_ionseg", "coco_2014_train_ionseg") loads
the same images, boxes and metadata as Detectron2's builtin dataset of that name
(``detectron2/data/datasets/builtin.py``), under the same root (``$DETECTRON2_DATASETS``, else
"datasets"), and adds ``"sem_seg_file_name"`` to each image whose label PNG exists, so that
``DatasetMapper`` loads it as ``"sem_seg"`` for the segmentation regularizer (section 3.2,
Table 6). Images without one keep no label and add no segmentation loss.

Where the labels are expected, and the command that writes them (both also in each name's
metadata, as ``sem_seg_root`` and ``sem_seg_labels_command``)::

    VOC   <root>/VOC20xx/ION_SegmentationLabels/<id>.png   tools/voc_to_semseg.py (SBD, VOC2012)
    COCO  <root>/coco/ion_semseg_<image folder>/<stem>.png  tools/coco_to_semseg.py (instances)

Registration is lazy: importing ion_d2 reads no file; the dicts are loaded by
``DatasetCatalog.get``.
"""

import functools
import os
from typing import Any, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.datasets.pascal_voc import CLASS_NAMES, load_voc_instances

from .coco_semseg import IGNORE_LABEL, attach_sem_seg_files
from .voc_semseg import LABEL_DIR_NAME

__all__ = [
    "ION_SEG_SUFFIX",
    "register_voc_ionseg",
    "register_coco_ionseg",
    "register_all_ionseg",
]

ION_SEG_SUFFIX = "_ionseg"

# name -> (folder, split), as detectron2/data/datasets/builtin.py's register_all_pascal_voc.
_VOC_SPLITS = {
    "voc_2007_trainval": ("VOC2007", "trainval"),
    "voc_2007_train": ("VOC2007", "train"),
    "voc_2007_val": ("VOC2007", "val"),
    "voc_2012_trainval": ("VOC2012", "trainval"),
    "voc_2012_train": ("VOC2012", "train"),
    "voc_2012_val": ("VOC2012", "val"),
}

# name -> (image root, instances json), as builtin.py's _PREDEFINED_SPLITS_COCO; the labels of
# "coco/<images>" go to "coco/ion_semseg_<images>". The training sets of Table 3 (2014 train)
# and of the Appendix (trainval35k = 2014 train + valminusminival), and 2017 train.
_COCO_SPLITS = {
    "coco_2014_train": ("coco/train2014", "coco/annotations/instances_train2014.json"),
    "coco_2014_valminusminival": (
        "coco/val2014",
        "coco/annotations/instances_valminusminival2014.json",
    ),
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
}


def _load_voc(dirname: str, split: str, sem_seg_root: str) -> List[Dict[str, Any]]:
    return attach_sem_seg_files(load_voc_instances(dirname, split, CLASS_NAMES), sem_seg_root)


def _load_coco(
    json_file: str, image_root: str, name: str, sem_seg_root: str
) -> List[Dict[str, Any]]:
    return attach_sem_seg_files(load_coco_json(json_file, image_root, name), sem_seg_root)


def register_voc_ionseg(name: str, dirname: str, split: str, year: int) -> None:
    """
    Register a Pascal VOC split as ``register_pascal_voc`` and builtin.py do (20 classes,
    ``evaluator_type`` "pascal_voc"), with the label PNGs of ``tools/voc_to_semseg.py`` at
    ``<dirname>/ION_SegmentationLabels/<id>.png``.

    Args:
        name (str): dataset name to register.
        dirname (str): the VOC folder, holding Annotations, ImageSets and JPEGImages.
        split (str): image set of ``ImageSets/Main``, e.g. "trainval".
        year (int): 2007 or 2012, as Detectron2's VOC evaluator reads it.
    """
    sem_seg_root = os.path.join(dirname, LABEL_DIR_NAME)
    root = os.path.dirname(os.path.normpath(dirname))
    DatasetCatalog.register(name, functools.partial(_load_voc, dirname, split, sem_seg_root))
    MetadataCatalog.get(name).set(
        thing_classes=list(CLASS_NAMES),
        dirname=dirname,
        year=year,
        split=split,
        evaluator_type="pascal_voc",
        ignore_label=IGNORE_LABEL,
        sem_seg_root=sem_seg_root,
        sem_seg_labels_command=(
            f"python tools/voc_to_semseg.py --root {root} --sbd <SBD>/benchmark_RELEASE/dataset "
            f"[--voc2012-seg <VOC2012>/SegmentationClass]"
        ),
    )


def register_coco_ionseg(
    name: str, metadata: Dict[str, Any], json_file: str, image_root: str, sem_seg_root: str
) -> None:
    """
    Register a COCO instances json as ``register_coco_instances`` does (``evaluator_type``
    "coco"), with the label PNGs of ``tools/coco_to_semseg.py`` at
    ``<sem_seg_root>/<image stem>.png``.

    Args:
        name (str): dataset name to register.
        metadata (dict): class metadata, e.g. the builtin COCO dataset's ``thing_classes``,
            ``thing_colors`` and ``thing_dataset_id_to_contiguous_id``.
        json_file (str): instances json.
        image_root (str): folder of the images.
        sem_seg_root (str): folder of the label PNGs.
    """
    DatasetCatalog.register(
        name, functools.partial(_load_coco, json_file, image_root, name, sem_seg_root)
    )
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        ignore_label=IGNORE_LABEL,
        sem_seg_root=sem_seg_root,
        sem_seg_labels_command=(
            f"python tools/coco_to_semseg.py --json {json_file} --output-dir {sem_seg_root}"
        ),
        **metadata,
    )


def _builtin_coco_class_metadata(builtin_name: str) -> Dict[str, Any]:
    # The class metadata builtin.py gave the dataset of that name (Detectron2 registers its
    # builtins when detectron2.data is imported); its paths are recomputed from our root.
    meta = MetadataCatalog.get(builtin_name)
    keys = ("thing_classes", "thing_colors", "thing_dataset_id_to_contiguous_id")
    return {k: getattr(meta, k) for k in keys}


def register_all_ionseg(root: Optional[str] = None) -> List[str]:
    """
    Register ``<name>_ionseg`` for each VOC and COCO training set above.

    Args:
        root (str or None): the datasets root; None reads ``$DETECTRON2_DATASETS`` (default
            "datasets"), as builtin.py does.

    Returns:
        list[str]: the registered names.
    """
    if root is None:
        root = os.getenv("DETECTRON2_DATASETS", "datasets")
    names = []
    for builtin_name, (folder, split) in _VOC_SPLITS.items():
        year = 2007 if "2007" in builtin_name else 2012
        name = builtin_name + ION_SEG_SUFFIX
        register_voc_ionseg(name, os.path.join(root, folder), split, year)
        names.append(name)
    for builtin_name, (image_root, json_file) in _COCO_SPLITS.items():
        name = builtin_name + ION_SEG_SUFFIX
        sem_seg_root = os.path.join(
            os.path.dirname(image_root), "ion_semseg_" + os.path.basename(image_root)
        )
        register_coco_ionseg(
            name,
            _builtin_coco_class_metadata(builtin_name),
            os.path.join(root, json_file),
            os.path.join(root, image_root),
            os.path.join(root, sem_seg_root),
        )
        names.append(name)
    return names
