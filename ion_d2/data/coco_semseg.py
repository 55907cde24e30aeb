"""Semantic labels from COCO instance annotations, for ION's segmentation regularizer.

Section 5.3: "every image in COCO has these labels". :func:`coco_to_semseg_labels` renders an
instances json into one label PNG per image; :func:`attach_sem_seg_files` points Detectron2
dataset dicts at them, so that ``DatasetMapper`` loads them as ``"sem_seg"``.

Registering COCO with labels (run ``tools/coco_to_semseg.py`` once beforehand)::

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_coco_json
    from ion_d2.data.coco_semseg import attach_sem_seg_files

    name = "coco_2017_train_ion_seg"
    json_file = "datasets/coco/annotations/instances_train2017.json"
    image_root = "datasets/coco/train2017"
    sem_seg_root = "datasets/coco/ion_semseg_train2017"
    DatasetCatalog.register(
        name,
        lambda: attach_sem_seg_files(load_coco_json(json_file, image_root, name), sem_seg_root),
    )
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", ignore_label=255
    )

and set ``MODEL.SEM_SEG_HEAD.NUM_CLASSES = K + 1`` (81 for COCO's 80 categories: background
plus one label per category) and ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255``. Label ``i + 1`` is
the category with contiguous id ``i`` in ``load_coco_json``'s mapping (categories sorted by id).
"""

import json
import logging
import os
from typing import Any, Dict, List, Optional

import numpy as np
from detectron2.utils.file_io import PathManager
from PIL import Image
from pycocotools import mask as mask_util

__all__ = ["coco_to_semseg_labels", "attach_sem_seg_files", "IGNORE_LABEL", "BACKGROUND_LABEL"]

logger = logging.getLogger(__name__)

BACKGROUND_LABEL = 0
# Crowd regions: no loss (MODEL.SEM_SEG_HEAD.IGNORE_VALUE).
IGNORE_LABEL = 255


def _label_file_name(file_name: str) -> str:
    return os.path.splitext(os.path.basename(file_name))[0] + ".png"


def _decode_segmentation(segm: Any, height: int, width: int, ann_id: Any) -> Optional[np.ndarray]:
    """
    Rasterise one COCO segmentation (polygons, uncompressed RLE or compressed RLE).

    Returns:
        ndarray or None: (height, width) bool mask; None if the segmentation has no valid
        polygon.
    """
    if isinstance(segm, list):
        # As detectron2's load_coco_json: a polygon needs at least 3 points.
        polygons = [p for p in segm if len(p) % 2 == 0 and len(p) >= 6]
        if not polygons:
            return None
        rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            raise ValueError(
                f"Annotation {ann_id}: RLE size {list(segm['size'])} does not match its image "
                f"size [{height}, {width}]."
            )
        # Uncompressed RLE (a list of counts, as COCO's crowd annotations) is compressed first;
        # compressed RLE (a string) decodes directly.
        if isinstance(segm["counts"], list):
            rle = mask_util.frPyObjects(segm, height, width)
        else:
            rle = segm
    else:
        raise ValueError(
            f"Annotation {ann_id}: segmentation of type {type(segm).__name__} is neither a list "
            "of polygons nor an RLE dict with 'counts' and 'size'."
        )
    return mask_util.decode(rle).astype(bool)


def coco_to_semseg_labels(json_file: str, output_dir: str) -> Dict[str, int]:
    """
    Write one semantic label map per image of a COCO-format instances json.

    Each image ``<dir>/<stem>.<ext>`` gets ``output_dir/<stem>.png``, a single-channel uint8 PNG
    of the image's size: 0 is background, ``i + 1`` is the i-th category in order of category
    id (1..K), and 255 marks crowd regions (ignored by the loss). Instances, crowds included,
    are drawn from the largest mask area to the smallest, so smaller objects stay on top where
    instances overlap. Images without annotations get an all-background map.

    Args:
        json_file (str): COCO instances json (``images``, ``annotations``, ``categories``).
        output_dir (str): directory for the label PNGs; created if missing, files overwritten.

    Returns:
        dict[str, int]: statistics: ``"images"`` (label maps written), ``"categories"`` (K),
        ``"instances"`` (non-crowd instances drawn), ``"crowd_instances"`` (crowd regions drawn),
        ``"skipped_instances"`` (annotations without a valid segmentation).
    """
    with PathManager.open(json_file, "r") as f:
        dataset = json.load(f)

    cat_ids = sorted(c["id"] for c in dataset["categories"])
    if len(cat_ids) > IGNORE_LABEL - 1:
        raise ValueError(
            f"{json_file} has {len(cat_ids)} categories; uint8 labels with 0 = background and "
            f"{IGNORE_LABEL} = ignore allow at most {IGNORE_LABEL - 1}."
        )
    label_of_cat = {cat_id: i + 1 for i, cat_id in enumerate(cat_ids)}

    images = dataset["images"]
    label_files: Dict[str, Any] = {}
    for img in images:
        label_file = _label_file_name(img["file_name"])
        if label_file in label_files:
            raise ValueError(
                f"Images {label_files[label_file]} and {img['id']} both map to label file "
                f"{label_file!r}; label files are named by image file stem, which must be unique."
            )
        label_files[label_file] = img["id"]

    anns_per_image: Dict[Any, List[Dict[str, Any]]] = {img["id"]: [] for img in images}
    for ann in dataset.get("annotations", []):
        if ann["image_id"] not in anns_per_image:
            raise ValueError(
                f"Annotation {ann.get('id')} refers to image_id {ann['image_id']}, which is not "
                f"in {json_file}'s images."
            )
        if ann["category_id"] not in label_of_cat:
            raise ValueError(
                f"Annotation {ann.get('id')} has category_id {ann['category_id']}; the "
                f"categories of {json_file} are {cat_ids}."
            )
        anns_per_image[ann["image_id"]].append(ann)

    logger.info(
        f"Writing semantic labels for {len(images)} images of {json_file} to {output_dir}: "
        f"{len(cat_ids)} categories (labels 1..{len(cat_ids)}), crowds = {IGNORE_LABEL}."
    )
    PathManager.mkdirs(output_dir)
    stats = {
        "images": 0,
        "categories": len(cat_ids),
        "instances": 0,
        "crowd_instances": 0,
        "skipped_instances": 0,
    }
    for img in images:
        height, width = img["height"], img["width"]
        drawn = []
        for ann in anns_per_image[img["id"]]:
            mask = _decode_segmentation(ann.get("segmentation", []), height, width, ann.get("id"))
            if mask is None or not mask.any():
                stats["skipped_instances"] += 1
                continue
            crowd = bool(ann.get("iscrowd", 0))
            value = IGNORE_LABEL if crowd else label_of_cat[ann["category_id"]]
            stats["crowd_instances" if crowd else "instances"] += 1
            drawn.append((int(mask.sum()), mask, value))

        labels = np.full((height, width), BACKGROUND_LABEL, dtype=np.uint8)
        # Stable sort: equal areas keep the json's order.
        for _, mask, value in sorted(drawn, key=lambda d: -d[0]):
            labels[mask] = value

        # A 2D uint8 array becomes a mode "L" PNG, which DatasetMapper's read_image(..., "L")
        # returns unchanged (a palette PNG would be converted to luminance).
        label_path = os.path.join(output_dir, _label_file_name(img["file_name"]))
        with PathManager.open(label_path, "wb") as f:
            Image.fromarray(labels).save(f, format="PNG")
        stats["images"] += 1
        if stats["images"] % 5000 == 0:
            logger.info(f"Wrote {stats['images']} / {len(images)} label maps.")

    logger.info(f"Done: {stats}.")
    return stats


def attach_sem_seg_files(
    dataset_dicts: List[Dict[str, Any]], sem_seg_root: str
) -> List[Dict[str, Any]]:
    """
    Add ``"sem_seg_file_name"`` to each dataset dict whose label map exists.

    The label map of ``<dir>/<stem>.<ext>`` is ``sem_seg_root/<stem>.png`` (as written by
    :func:`coco_to_semseg_labels`). Dicts without one are left unchanged: their images carry no
    ``"sem_seg"`` and add no segmentation loss.

    Args:
        dataset_dicts (list[dict]): Detectron2 dataset dicts with ``"file_name"``; modified in
            place.
        sem_seg_root (str): directory of the label PNGs.

    Returns:
        list[dict]: ``dataset_dicts``.
    """
    available = set(PathManager.ls(sem_seg_root)) if PathManager.isdir(sem_seg_root) else set()
    num_attached = 0
    for record in dataset_dicts:
        label_file = _label_file_name(record["file_name"])
        if label_file in available:
            record["sem_seg_file_name"] = os.path.join(sem_seg_root, label_file)
            num_attached += 1
    if num_attached < len(dataset_dicts):
        logger.warning(
            f"{len(dataset_dicts) - num_attached} of {len(dataset_dicts)} images have no label "
            f"map in {sem_seg_root}; they get no segmentation loss."
        )
    logger.info(f"Attached {num_attached} semantic label maps from {sem_seg_root}.")
    return dataset_dicts
