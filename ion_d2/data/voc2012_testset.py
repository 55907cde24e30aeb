"""
PASCAL VOC 2012 test (Table 2 of the paper, section 4.3: "submitting to the public evaluation
server"), registered as ``voc_2012_test``.

Detectron2 registers ``voc_2012_trainval``, ``voc_2012_train`` and ``voc_2012_val`` but no 2012
test split (``detectron2/data/datasets/builtin.py``, v0.6 and main): its annotations are not
public. ion_d2 registers the images, under the same root as the builtin splits, if the name is
not registered already::

    $DETECTRON2_DATASETS/VOC2012/ImageSets/Main/test.txt     (image ids, one a line)
    $DETECTRON2_DATASETS/VOC2012/JPEGImages/<id>.jpg

(the layout of the VOC2012 test tarball). Its metadata has VOC's 20 classes and
``evaluator_type`` "pascal_voc_comp4": :class:`ion_d2.evaluation.PascalVOCComp4Writer` writes the
result files the evaluation server scores. Registration is lazy: the list is read by
``DatasetCatalog.get``.
"""

import functools
import os
from typing import Any, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import CLASS_NAMES
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["VOC_2012_TEST", "load_voc_test_images", "register_voc_test", "register_voc_2012_test"]

VOC_2012_TEST = "voc_2012_test"


def load_voc_test_images(dirname: str, split: str = "test") -> List[Dict[str, Any]]:
    """
    The images of a VOC split without annotations.

    Args:
        dirname (str): the VOC year's folder (holding ImageSets, JPEGImages).
        split (str): the ImageSets/Main list to read.

    Returns:
        list[dict]: one ``{"file_name", "image_id", "height", "width"}`` per id, in the list's
        order; ``image_id`` is the id (as Detectron2's VOC loader sets it), and the size is read
        from the image's header.
    """
    list_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    if not PathManager.isfile(list_file):
        raise FileNotFoundError(
            f"{list_file} not found: {VOC_2012_TEST!r} needs the VOC2012 test images "
            f"(ImageSets/Main/{split}.txt and JPEGImages/) under {dirname} "
            "($DETECTRON2_DATASETS/VOC2012)."
        )
    with PathManager.open(list_file) as f:
        ids = [line.strip() for line in f if line.strip()]
    dicts = []
    for image_id in ids:
        file_name = os.path.join(dirname, "JPEGImages", image_id + ".jpg")
        with PathManager.open(file_name, "rb") as f:
            width, height = Image.open(f).size
        dicts.append(
            {"file_name": file_name, "image_id": image_id, "height": height, "width": width}
        )
    return dicts


def register_voc_test(name: str, dirname: str, year: int = 2012, split: str = "test") -> None:
    """
    Register a VOC split without annotations: its images (:func:`load_voc_test_images`) and the
    metadata of Detectron2's VOC splits, with ``evaluator_type`` "pascal_voc_comp4".

    Args:
        name (str): dataset name to register.
        dirname (str): the VOC year's folder.
        year (int): the VOC year (the result files' folder is ``results/VOC<year>/Main``).
        split (str): the ImageSets/Main list.
    """
    DatasetCatalog.register(name, functools.partial(load_voc_test_images, dirname, split))
    MetadataCatalog.get(name).set(
        thing_classes=list(CLASS_NAMES),
        dirname=dirname,
        year=year,
        split=split,
        evaluator_type="pascal_voc_comp4",
    )


def register_voc_2012_test(root: Optional[str] = None) -> bool:
    """
    Register :data:`VOC_2012_TEST` under ``<root>/VOC2012``, unless a dataset of that name is
    registered already (a future Detectron2, or the user's own).

    Args:
        root (str or None): the datasets root; None: ``$DETECTRON2_DATASETS``, else "datasets".

    Returns:
        bool: whether this call registered it.
    """
    if VOC_2012_TEST in DatasetCatalog.list():
        return False
    if root is None:
        root = os.getenv("DETECTRON2_DATASETS", "datasets")
    register_voc_test(VOC_2012_TEST, os.path.join(root, "VOC2012"))
    return True
