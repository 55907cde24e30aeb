"""
A check of the training and test datasets before the first training step, so that a dataset
the model cannot learn from correctly fails at once with one error instead of training silently
wrong (a category id the head reads as background, a box of negative width the mapper mirrors)
or failing hours later (a deleted or truncated file, an image too small for the trunk's stride).

It reads the dataset dicts, each file's header and last bytes and a COCO json's ``images``,
decoding no image unless its end marker is missing (:mod:`.file_check`;
``benchmarks/bench_dataset_check.py`` measures it). :func:`check_dataset_dicts` checks a list
of dicts; :func:`check_train_datasets` and :func:`check_test_datasets` apply it to a config's
``DATASETS.TRAIN`` / ``DATASETS.TEST``, for IONTrainer and for any other entry point (a lazy
config's training script can call them with its model's :func:`input_stride`).
"""

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .file_check import duplicate_coco_image_ids, image_file_problem
from .semseg_check import check_sem_seg_labels
from .size_rule import resized_sizes

__all__ = [
    "DatasetCheckError",
    "DatasetLimits",
    "check_dataset_dicts",
    "check_test_datasets",
    "check_train_datasets",
    "input_stride",
]

logger = logging.getLogger(__name__)

# Offenders named in the error, per kind of problem.
_SHOWN = 5
_DROP_KEY = "DATALOADER.ION_DROP_INVALID_BOXES"
_SKIP_KEY = "DATALOADER.ION_SKIP_UNREADABLE_IMAGES"
_OUTSIDE_KEY = "DATALOADER.ION_MAX_OUTSIDE_BOX_FRACTION"


class DatasetCheckError(ValueError):
    """A dataset that the model cannot train or be evaluated on as configured."""


@dataclass(frozen=True)
class DatasetLimits:
    """
    What a dataset must fit.

    Attributes:
        num_classes (int): category ids must be in [0, num_classes) (``ROI_HEADS.NUM_CLASSES``).
        min_side (int): the smallest shorter image side after resizing: the trunk's stride
            (:func:`input_stride`), below which its coarsest feature map is empty.
        short_edge (int): the smallest shorter edge the resize draws (``MIN_SIZE_TRAIN`` /
            ``MIN_SIZE_TEST``); 0 keeps an image's size up to ``max_size``.
        max_size (int): the longer-edge cap (``MAX_SIZE_TRAIN`` / ``MAX_SIZE_TEST``).
        sem_seg_num_classes (int or None): with the segmentation loss on, the number of
            semantic classes the head predicts; None when the labels are not used.
        size_keys (str): the config keys that set the resize, for the message.
        max_outside_fraction (float): the largest fraction of boxes that may lie wholly
            outside their image (``DATALOADER.ION_MAX_OUTSIDE_BOX_FRACTION``).
    """

    num_classes: int
    min_side: int
    short_edge: int
    max_size: int
    sem_seg_num_classes: Optional[int] = None
    size_keys: str = "INPUT.MIN_SIZE_TRAIN / INPUT.MAX_SIZE_TRAIN"
    max_outside_fraction: float = 0.01

    @classmethod
    def from_config(cls, cfg, *, min_side: int, is_train: bool) -> "DatasetLimits":
        """The limits of ``cfg``'s training (``is_train``) or test images."""
        if is_train:
            short, max_size = min(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN
            keys = "INPUT.MIN_SIZE_TRAIN / INPUT.MAX_SIZE_TRAIN"
        else:
            short, max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
            keys = "INPUT.MIN_SIZE_TEST / INPUT.MAX_SIZE_TEST"
        seg_on = is_train and cfg.MODEL.ION.SEG_LOSS_ON
        return cls(
            num_classes=cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            min_side=min_side,
            short_edge=short,
            max_size=max_size,
            sem_seg_num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES if seg_on else None,
            size_keys=keys,
            max_outside_fraction=cfg.DATALOADER.ION_MAX_OUTSIDE_BOX_FRACTION,
        )


def input_stride(backbone) -> int:
    """
    The smallest image side a backbone can take: its ``size_divisibility`` or its largest
    feature stride, whichever is larger (an image shorter than the stride has an empty
    coarsest feature map).
    """
    strides = [s.stride for s in backbone.output_shape().values()]
    return int(max([backbone.size_divisibility, *strides]))


def _box_xywh(ann: Dict[str, Any]) -> Tuple[float, float, float, float]:
    box, mode = ann["bbox"], ann["bbox_mode"]
    if mode == BoxMode.XYWH_ABS:
        return float(box[0]), float(box[1]), float(box[2]), float(box[3])
    if mode == BoxMode.XYXY_ABS:
        x, y = float(box[0]), float(box[1])
        return x, y, float(box[2]) - x, float(box[3]) - y
    # Other modes: Detectron2's own conversion (the mapper's).
    x, y, w, h = BoxMode.convert(list(box), mode, BoxMode.XYWH_ABS)[:4]
    return float(x), float(y), float(w), float(h)


@dataclass
class _AnnotationProblems:
    bad_category: List[str]
    bad_box: List[Tuple[int, int, str]]  # (image index, annotation index, description)
    outside: List[str]  # boxes wholly outside their image
    num_boxes: int  # boxes of positive size in images of known size


def _annotation_problems(dicts: List[dict], limits: DatasetLimits) -> _AnnotationProblems:
    found = _AnnotationProblems([], [], [], 0)
    for i, d in enumerate(dicts):
        height, width = d.get("height"), d.get("width")
        for j, ann in enumerate(d.get("annotations", ())):
            category = ann.get("category_id")
            if category is not None and not 0 <= category < limits.num_classes:
                found.bad_category.append(f"{d.get('file_name')} (category_id {category})")
            if "bbox" not in ann or ann.get("iscrowd", 0):
                continue
            x, y, w, h = _box_xywh(ann)
            if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
                found.bad_box.append((i, j, _box_text(d, ann, f", width {w:g}, height {h:g}")))
            elif height is not None and width is not None:
                found.num_boxes += 1
                # Detectron2 clips boxes to the image and drops those left empty.
                if x >= width or y >= height or x + w <= 0 or y + h <= 0:
                    found.outside.append(_box_text(d, ann, f" in a {height}x{width} HxW image"))
    return found


def _box_text(d: dict, ann: Dict[str, Any], detail: str) -> str:
    box = [round(float(v), 2) for v in ann["bbox"]]
    return f"{d.get('file_name')} (bbox {box}{detail})"


def _file_problems(dicts: List[dict], keys: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """Files that cannot be opened (descriptions), and images that cannot be read as 8-bit
    images (path: description)."""
    missing, unreadable, seen = [], {}, set()
    for d in dicts:
        for key in keys:
            path = d.get(key)
            if path is None or path in seen:
                continue
            seen.add(path)
            try:
                problem = image_file_problem(path)
            except OSError as e:
                missing.append(f"{path} ({key}: {e.strerror})")
                continue
            if problem is not None:
                unreadable[path] = f"{path} ({key}: {problem})"
    return missing, unreadable


def _duplicate_ids(json_files: Sequence[str]) -> Dict[str, List[str]]:
    """Per COCO json, its images that share an id (descriptions)."""
    found = {}
    for json_file in json_files:
        try:
            shared = duplicate_coco_image_ids(json_file)
        except (OSError, ValueError) as e:
            logger.warning(f"Image ids of {json_file} not checked: {e}")
            continue
        if shared:
            found[json_file] = [f"id {i} ({', '.join(names)})" for i, names in shared.items()]
    return found


def _too_small(dicts: List[dict], limits: DatasetLimits) -> List[str]:
    sized = [d for d in dicts if "height" in d and "width" in d]
    if not sized:
        return []
    heights = np.array([d["height"] for d in sized], dtype=np.int64)
    widths = np.array([d["width"] for d in sized], dtype=np.int64)
    sides = np.minimum(*resized_sizes(heights, widths, limits.short_edge, limits.max_size))
    bad = np.flatnonzero((np.minimum(heights, widths) < 1) | (sides < limits.min_side))
    return [
        f"{sized[i].get('file_name')} ({heights[i]}x{widths[i]} HxW, shorter side "
        f"{sides[i]} px after resizing)"
        for i in bad
    ]


def _first(offenders: List[str]) -> str:
    return "; ".join(offenders[:_SHOWN]) + ("; ..." if len(offenders) > _SHOWN else "")


def _section(what: str, offenders: List[str], fix: str) -> str:
    return f"  {len(offenders)} {what}: {_first(offenders)}. {fix}"


def _drop_boxes(dicts: List[dict], bad_box, name: str, drop_empty: bool) -> List[dict]:
    by_image: Dict[int, set] = {}
    for i, j, _ in bad_box:
        by_image.setdefault(i, set()).add(j)
    for i, skip in by_image.items():
        d = dict(dicts[i])
        d["annotations"] = [a for j, a in enumerate(d["annotations"]) if j not in skip]
        dicts[i] = d
    emptied = [i for i in by_image if not dicts[i]["annotations"]]
    message = (
        f"{name}: dropped {len(bad_box)} boxes of non-positive or non-finite width/height from "
        f"{len(by_image)} images ({_DROP_KEY} True)"
    )
    if drop_empty and emptied:
        gone = set(emptied)
        dicts = [d for i, d in enumerate(dicts) if i not in gone]
        message += f"; {len(gone)} images left without boxes removed (FILTER_EMPTY_ANNOTATIONS)"
    logger.warning(message + ".")
    return dicts


def _outside_section(found: _AnnotationProblems, limits: DatasetLimits, fix: str) -> str:
    share = len(found.outside) / found.num_boxes
    return _section(
        f"boxes lie wholly outside their image ({share:.1%} of {found.num_boxes}; "
        f"{_OUTSIDE_KEY} is {limits.max_outside_fraction:g})",
        found.outside,
        fix,
    )


def _annotation_sections(
    found: _AnnotationProblems, limits: DatasetLimits, drop_invalid_boxes: bool
) -> List[str]:
    sections = []
    if found.bad_category:
        sections.append(
            _section(
                f"annotations with a category_id outside [0, {limits.num_classes})",
                found.bad_category,
                f"MODEL.ROI_HEADS.NUM_CLASSES is {limits.num_classes}: set it to the dataset's "
                "number of classes (an id equal to NUM_CLASSES is the head's background).",
            )
        )
    if found.bad_box and not drop_invalid_boxes:
        sections.append(
            _section(
                "boxes with a non-positive or non-finite width or height",
                [desc for _, _, desc in found.bad_box],
                f"Fix the annotations, or set {_DROP_KEY} True to drop such boxes.",
            )
        )
    if len(found.outside) > limits.max_outside_fraction * found.num_boxes:
        fix = (
            "Fix their coordinates (or the images' height/width), or raise "
            f"{_OUTSIDE_KEY} to accept them."
        )
        sections.append(_outside_section(found, limits, fix))
    return sections


def _leave_out(
    dicts: List[dict], unreadable: Dict[str, str], keys: Sequence[str], name: str
) -> List[dict]:
    kept = [d for d in dicts if not any(d.get(key) in unreadable for key in keys)]
    what = f"images whose files cannot be read as 8-bit images ({_SKIP_KEY} True)"
    first = _first(list(unreadable.values()))
    if not kept:
        raise DatasetCheckError(f"{name}: all {len(dicts)} are {what}: {first}.")
    logger.warning(f"{name}: left out {len(dicts) - len(kept)} {what}: {first}.")
    return kept


def check_dataset_dicts(
    dicts: List[dict],
    name: str,
    limits: DatasetLimits,
    *,
    drop_invalid_boxes: bool = False,
    drop_empty: bool = False,
    skip_unreadable: bool = False,
    json_files: Sequence[str] = (),
) -> List[dict]:
    """
    Check a dataset's dicts against ``limits``: category ids, box sizes (``bbox`` in its
    ``bbox_mode``, as Detectron2 converts it; crowd boxes are not trained on and not checked),
    boxes wholly outside their image (logged; refused above ``limits.max_outside_fraction``),
    that ``file_name`` (and with the segmentation loss ``sem_seg_file_name``) exist and can be
    read as 8-bit images (:func:`image_file_problem`), that each image's shorter side after
    resizing (from the dict's ``height``/``width``) is at least the trunk's stride, and that
    the images of the COCO jsons ``json_files`` have distinct ids.

    Args:
        dicts (list[dict]): the dataset dicts (not modified).
        name (str): the dataset, named in the messages (e.g. "DATASETS.TRAIN ('voc_2007')").
        limits (DatasetLimits): what they must fit.
        drop_invalid_boxes (bool): drop boxes of non-positive or non-finite size, logging the
            count, instead of refusing them.
        drop_empty (bool): with ``drop_invalid_boxes``, also remove images left without boxes
            (as ``DATALOADER.FILTER_EMPTY_ANNOTATIONS`` does).
        skip_unreadable (bool): leave out the images whose files cannot be read as 8-bit
            images, logging them, instead of refusing them.
        json_files (list[str]): the COCO jsons the dicts were loaded from.

    Returns:
        list[dict]: ``dicts``, or a copy without the dropped boxes and left-out images.

    Raises:
        DatasetCheckError: listing every kind of problem with its count, the first offenders
            and the config key to change.
    """
    found = _annotation_problems(dicts, limits)
    files = ("file_name",) + (("sem_seg_file_name",) if limits.sem_seg_num_classes else ())
    missing, unreadable = _file_problems(dicts, files)
    sections = _annotation_sections(found, limits, drop_invalid_boxes)
    if missing:
        sections.append(_section("files that cannot be read", missing, "Restore them."))
    if unreadable and not skip_unreadable:
        sections.append(
            _section(
                "image files that cannot be read as 8-bit images",
                list(unreadable.values()),
                "Restore them or convert them to 8-bit images (a training set can leave them "
                f"out with {_SKIP_KEY} True).",
            )
        )
    for json_file, shared in _duplicate_ids(json_files).items():
        sections.append(
            _section(
                f"image ids shared by several images in {json_file}",
                shared,
                "Give each image its own id (the COCO loader keeps one image per id and gives "
                "it the boxes of all of them).",
            )
        )
    small = _too_small(dicts, limits)
    if small:
        sections.append(
            _section(
                f"images whose shorter side is under the trunk's stride ({limits.min_side} px)",
                small,
                f"Remove them from the dataset or change {limits.size_keys}.",
            )
        )
    if sections:
        raise DatasetCheckError(
            f"{name} ({len(dicts)} images) cannot be used as configured:\n" + "\n".join(sections)
        )
    if found.outside:
        fix = "Detectron2 clips boxes to their image and drops the empty ones: not trained on."
        logger.warning(f"{name}: {_outside_section(found, limits, fix).strip()}")
    if found.bad_box:
        dicts = _drop_boxes(list(dicts), found.bad_box, name, drop_empty)
    if unreadable:
        dicts = _leave_out(dicts, unreadable, files, name)
    return dicts


def _sem_seg_classes_fit(names: Sequence[str], num_classes: int) -> None:
    for name in names:
        meta = MetadataCatalog.get(name)
        stuff = meta.get("stuff_classes", None)
        count = meta.get("num_sem_seg_classes", None) or (len(stuff) if stuff else None)
        if count is not None and count > num_classes:
            raise DatasetCheckError(
                f"{name!r} has {count} semantic classes but MODEL.SEM_SEG_HEAD.NUM_CLASSES is "
                f"{num_classes}; set it to {count}."
            )


def _coco_json_files(names: Sequence[str]) -> List[str]:
    # register_coco_instances and Detectron2's builtin COCO datasets record their json.
    found = (MetadataCatalog.get(name).get("json_file", None) for name in names)
    return list(dict.fromkeys(f for f in found if f))


def check_train_datasets(cfg, dicts: List[dict], *, min_side: int) -> List[dict]:
    """
    :func:`check_dataset_dicts` on the training images (``dicts``, as the train loader gets
    them) and the COCO jsons of ``DATASETS.TRAIN`` with ``cfg``'s limits,
    ``DATALOADER.ION_DROP_INVALID_BOXES`` and ``DATALOADER.ION_SKIP_UNREADABLE_IMAGES``; with
    ``MODEL.ION.SEG_LOSS_ON`` also the datasets' semantic class counts and
    :func:`check_sem_seg_labels`.

    Args:
        cfg (CfgNode): the config.
        dicts (list[dict]): the training images of ``DATASETS.TRAIN``.
        min_side (int): the trunk's stride (:func:`input_stride`).

    Returns:
        list[dict]: the dicts to train on (without dropped boxes and left-out images).
    """
    names = tuple(cfg.DATASETS.TRAIN)
    limits = DatasetLimits.from_config(cfg, min_side=min_side, is_train=True)
    if limits.sem_seg_num_classes is not None:
        _sem_seg_classes_fit(names, limits.sem_seg_num_classes)
        check_sem_seg_labels(dicts, names)
    return check_dataset_dicts(
        dicts,
        f"DATASETS.TRAIN {names}",
        limits,
        drop_invalid_boxes=cfg.DATALOADER.ION_DROP_INVALID_BOXES,
        drop_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        skip_unreadable=cfg.DATALOADER.ION_SKIP_UNREADABLE_IMAGES,
        json_files=_coco_json_files(names),
    )


def check_test_datasets(cfg, *, min_side: int, names: Optional[Sequence[str]] = None) -> None:
    """
    :func:`check_dataset_dicts` on each test dataset (``names``, default ``DATASETS.TEST``).
    Evaluators read a test set's ground truth themselves, so with
    ``DATALOADER.ION_DROP_INVALID_BOXES`` its invalid boxes are only counted in the log, and
    its unreadable images are always refused.
    """
    limits = DatasetLimits.from_config(cfg, min_side=min_side, is_train=False)
    for name in cfg.DATASETS.TEST if names is None else names:
        check_dataset_dicts(
            DatasetCatalog.get(name),
            f"DATASETS.TEST {name!r} (evaluators still read its own annotations)",
            limits,
            drop_invalid_boxes=cfg.DATALOADER.ION_DROP_INVALID_BOXES,
            json_files=_coco_json_files([name]),
        )
