"""
Pascal VOC AP50 by object size, with COCO's size buckets.

Section 4.5 of the paper claims a large gain on small objects ("For COCO, if we look at small
objects, average precision and average recall improve from 4.1% to 7.0%"; its footnote:
"'Small' means area <= 32^2 px"), measured with COCO's size buckets; the stock
``PascalVOCDetectionEvaluator`` reports no sizes. :class:`PascalVOCBySizeEvaluator` adds
"AP50_small", "AP50_medium" and "AP50_large" to its results (``TEST.ION_VOC_AP_BY_SIZE``).
(Figure 5's "normalized AP by size" uses Hoiem et al.'s per-class percentile buckets instead;
this is not that metric.)

The rule, for one class and one area range [lo, hi] (:data:`AREA_RANGES`, COCO's
``cocoeval.Params.areaRng``, both bounds included as in ``cocoeval``), at IoU > 0.5:

* Areas are box areas (VOC has no masks): ``(xmax - xmin + 1) * (ymax - ymin + 1)`` in VOC's
  inclusive pixel coordinates, i.e. width x height of the Detectron2 box.
* A ground truth is ignored when it is "difficult" (as VOC) or its area is outside the range.
  The number of positives is the number of ground truths not ignored.
* Detections are taken by decreasing score and each is assigned to the ground truth of its class
  and image with the highest IoU, exactly as the VOC devkit (``voc_eval``) does. If that IoU is
  above 0.5: a detection assigned to an ignored ground truth is ignored (neither true nor false
  positive); otherwise it is a true positive if that ground truth is not yet matched, a false
  positive (duplicate) if it is. If the IoU is at most 0.5, the detection is a false positive if
  its own area is inside the range and ignored otherwise (as COCO ignores unmatched detections
  outside the range).
* AP from precision/recall as the dataset's VOC metric (11-point for 2007, area otherwise).

With the range [0, inf) this is exactly the stock AP50. "AP50_<size>" is the mean over the
classes that have at least one positive in that range (NaN when none has).
"""

import logging
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.evaluation.pascal_voc_evaluation import parse_rec, voc_ap
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = ["AREA_RANGES", "PascalVOCBySizeEvaluator", "voc_ap_in_area_range"]

logger = logging.getLogger(__name__)

#: COCO's area ranges in square pixels (pycocotools ``Params.areaRng``), both bounds included.
AREA_RANGES: Dict[str, Tuple[float, float]] = {
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}

# One class's detections: (image id, score, [xmin, ymin, xmax, ymax] in VOC coordinates).
Detection = Tuple[str, float, Sequence[float]]


def _voc_area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[..., 2] - boxes[..., 0] + 1.0) * (boxes[..., 3] - boxes[..., 1] + 1.0)


def _best_overlap(gt_boxes: np.ndarray, box: np.ndarray) -> Tuple[float, int]:
    """The VOC devkit's IoU (inclusive pixel coordinates): the best one and its index."""
    if gt_boxes.size == 0:
        return -np.inf, -1
    iw = np.maximum(np.minimum(gt_boxes[:, 2], box[2]) - np.maximum(gt_boxes[:, 0], box[0]) + 1, 0)
    ih = np.maximum(np.minimum(gt_boxes[:, 3], box[3]) - np.maximum(gt_boxes[:, 1], box[1]) + 1, 0)
    inters = iw * ih
    overlaps = inters / (_voc_area(box) + _voc_area(gt_boxes) - inters)
    return float(np.max(overlaps)), int(np.argmax(overlaps))


def voc_ap_in_area_range(
    detections: List[Detection],
    ground_truth: Dict[str, Tuple[np.ndarray, np.ndarray]],
    area_range: Tuple[float, float],
    *,
    iou_thresh: float = 0.5,
    use_07_metric: bool,
) -> Tuple[float, int]:
    """
    AP of one class restricted to one area range (the rule in this module's docstring).

    Args:
        detections: (image id, score, VOC box) of every detection of the class.
        ground_truth: image id -> (VOC boxes (G, 4), difficult flags (G,)) of the class, for
            every image of the test set.
        area_range: (lo, hi) in square pixels, both included.
        iou_thresh: a detection matches when its IoU is above this.
        use_07_metric: VOC 2007's 11-point AP instead of the area under the curve.

    Returns:
        tuple[float, int]: AP in [0, 1] and the number of positives (AP is NaN when 0).
    """
    lo, hi = area_range
    ignored, matched = {}, {}
    for image_id, (boxes, difficult) in ground_truth.items():
        area = _voc_area(boxes.reshape(-1, 4).astype(float))
        ignored[image_id] = difficult.astype(bool) | (area < lo) | (area > hi)
        matched[image_id] = np.zeros(len(area), dtype=bool)
    npos = int(sum((~x).sum() for x in ignored.values()))
    if npos == 0:
        return float("nan"), 0

    confidence = np.array([score for _, score, _ in detections], dtype=float)
    order = np.argsort(-confidence)  # as voc_eval, so ties break the same way
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    empty = (np.zeros((0, 4)), np.zeros(0, dtype=bool))
    for d, i in enumerate(order):
        image_id, _, box = detections[i]
        box = np.asarray(box, dtype=float)
        gt_boxes = ground_truth.get(image_id, empty)[0].reshape(-1, 4).astype(float)
        ovmax, jmax = _best_overlap(gt_boxes, box)
        if ovmax > iou_thresh:
            if ignored[image_id][jmax]:
                continue
            if matched[image_id][jmax]:
                fp[d] = 1.0
            else:
                tp[d] = 1.0
                matched[image_id][jmax] = True
        elif lo <= _voc_area(box) <= hi:
            fp[d] = 1.0
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return float(voc_ap(rec, prec, use_07_metric)), npos


class PascalVOCBySizeEvaluator(PascalVOCDetectionEvaluator):
    """
    :class:`PascalVOCDetectionEvaluator` whose "bbox" results also hold "AP50_small",
    "AP50_medium" and "AP50_large" (see this module's docstring for the rule).
    """

    def __init__(
        self, dataset_name: str, area_ranges: Optional[Dict[str, Tuple[float, float]]] = None
    ):
        """
        Args:
            dataset_name (str): a Pascal VOC-format dataset (its metadata has "dirname",
                "split", "year" and "thing_classes", as ``register_pascal_voc`` sets).
            area_ranges (dict[str, tuple]): name -> (lo, hi) box areas; default
                :data:`AREA_RANGES`. Results are "AP50_<name>".
        """
        super().__init__(dataset_name)
        meta = MetadataCatalog.get(dataset_name)
        self._area_ranges = dict(AREA_RANGES if area_ranges is None else area_ranges)
        annotation_dir = PathManager.get_local_path(os.path.join(meta.dirname, "Annotations/"))
        self._size_anno_template = os.path.join(annotation_dir, "{}.xml")
        self._size_image_set = os.path.join(meta.dirname, "ImageSets", "Main", meta.split + ".txt")
        self._size_class_names = list(meta.thing_classes)
        self._size_use_07_metric = meta.year == 2007

    def reset(self):
        super().reset()
        self._size_predictions = defaultdict(list)  # class id -> list[Detection]

    def process(self, inputs, outputs):
        super().process(inputs, outputs)
        for input, output in zip(inputs, outputs):
            instances = output["instances"].to("cpu")
            boxes = instances.pred_boxes.tensor.numpy()
            scores = instances.scores.tolist()
            classes = instances.pred_classes.tolist()
            for box, score, cls in zip(boxes, scores, classes):
                xmin, ymin, xmax, ymax = box
                # The same VOC coordinates and rounding as the stock evaluator's result files.
                xmin += 1
                ymin += 1
                voc_box = [float(f"{v:.1f}") for v in (xmin, ymin, xmax, ymax)]
                self._size_predictions[cls].append(
                    (str(input["image_id"]), float(f"{score:.3f}"), voc_box)
                )

    def _ground_truth(self) -> Dict[str, Dict[str, Tuple[np.ndarray, np.ndarray]]]:
        """class name -> image id -> (VOC boxes, difficult flags), for every test image."""
        with PathManager.open(self._size_image_set, "r") as f:
            image_ids = [line.strip() for line in f if line.strip()]
        per_class = {name: {} for name in self._size_class_names}
        for image_id in image_ids:
            objects = parse_rec(self._size_anno_template.format(image_id))
            for name in self._size_class_names:
                objs = [o for o in objects if o["name"] == name]
                per_class[name][image_id] = (
                    np.array([o["bbox"] for o in objs], dtype=float).reshape(-1, 4),
                    np.array([o["difficult"] for o in objs], dtype=bool),
                )
        return per_class

    def evaluate(self):
        results = super().evaluate()
        all_predictions = comm.gather(self._size_predictions, dst=0)
        if not comm.is_main_process():
            return results
        predictions = defaultdict(list)
        for predictions_per_rank in all_predictions:
            for cls, dets in predictions_per_rank.items():
                predictions[cls].extend(dets)
        ground_truth = self._ground_truth()
        for size, area_range in self._area_ranges.items():
            aps, positives = [], 0
            for cls_id, name in enumerate(self._size_class_names):
                ap, npos = voc_ap_in_area_range(
                    predictions.get(cls_id, []),
                    ground_truth[name],
                    area_range,
                    use_07_metric=self._size_use_07_metric,
                )
                positives += npos
                if npos > 0:
                    aps.append(ap * 100)
            results["bbox"][f"AP50_{size}"] = float(np.mean(aps)) if aps else float("nan")
            logger.info(
                f"AP50_{size} (box area in [{area_range[0]:g}, {area_range[1]:g}]): "
                f"{results['bbox'][f'AP50_{size}']:.2f} over {len(aps)} classes, "
                f"{positives} ground truths."
            )
        return results
