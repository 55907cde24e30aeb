"""How many training images carry segmentation labels, checked before ION trains with
``MODEL.ION.SEG_LOSS_ON``.

An image without ``"sem_seg_file_name"`` adds no segmentation loss; a training set without any
would train with a loss that is always 0, which :func:`check_sem_seg_labels` refuses.
"""

import logging
from typing import Any, Dict, List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from .builtin_ionseg import ION_SEG_SUFFIX

__all__ = ["check_sem_seg_labels"]

logger = logging.getLogger(__name__)


def _how_to_label(name: str) -> str:
    meta = MetadataCatalog.get(name)
    command = meta.get("sem_seg_labels_command", None)
    if command is not None:
        return (
            f"{name!r} expects its labels under {meta.get('sem_seg_root', None)}; write them "
            f"with `{command}`"
        )
    if name + ION_SEG_SUFFIX in DatasetCatalog.list():
        labelled = MetadataCatalog.get(name + ION_SEG_SUFFIX)
        return (
            f"{name!r} has no segmentation labels: train on {name + ION_SEG_SUFFIX!r} instead, "
            f"after writing its labels with `{labelled.get('sem_seg_labels_command', None)}`"
        )
    return (
        f"{name!r} has no segmentation labels: give its dataset dicts 'sem_seg_file_name' "
        "(e.g. with ion_d2.data.attach_sem_seg_files)"
    )


def check_sem_seg_labels(
    dataset_dicts: List[Dict[str, Any]], dataset_names: Sequence[str]
) -> float:
    """
    Report the fraction of ``dataset_dicts`` that have ``"sem_seg_file_name"``: an info line
    when all do, a warning when only some do.

    Args:
        dataset_dicts (list[dict]): the training images, as the train loader gets them.
        dataset_names (list[str]): the datasets they come from (``DATASETS.TRAIN``), named in
            the messages.

    Returns:
        float: the labelled fraction, in (0, 1].

    Raises:
        ValueError: when no image has a label, naming the datasets and how to label them.
    """
    total = len(dataset_dicts)
    labelled = sum(1 for d in dataset_dicts if "sem_seg_file_name" in d)
    names = ", ".join(repr(n) for n in dataset_names)
    if labelled == 0:
        hints = "; ".join(_how_to_label(n) for n in dataset_names)
        raise ValueError(
            f"MODEL.ION.SEG_LOSS_ON is True but none of the {total} training images of "
            f"DATASETS.TRAIN ({names}) has a segmentation label ('sem_seg_file_name'), so the "
            f"segmentation loss would be 0. {hints}. The <builtin name>{ION_SEG_SUFFIX} "
            "datasets (e.g. 'voc_2007_trainval_ionseg', 'voc_2012_trainval_ionseg', "
            "'coco_2014_train_ionseg') load Detectron2's VOC and COCO sets with those labels. "
            "Or train without the regularizer: MODEL.ION.SEG_LOSS_ON False."
        )
    fraction = labelled / total
    if labelled < total:
        logger.warning(
            f"{100 * fraction:.1f}% of {total} training images ({names}) have segmentation "
            f"labels; the other {total - labelled} add no segmentation loss."
        )
    else:
        logger.info(f"All {total} training images ({names}) have segmentation labels.")
    return fraction
