"""
Does the detector use context? Per pair of classes that only context tells apart, how many
objects it finds and how many of those it gives the right class of the pair.
"""

import itertools
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from detectron2.utils import comm

__all__ = ["ContextPairEvaluator"]


class ContextPairEvaluator(DatasetEvaluator):
    """
    For a dataset whose metadata names ``context_pairs`` (pairs of thing classes that look the
    same inside their boxes, e.g. ``[["car", "boat"], ["lamp", "ball"]]`` for the bundled data),
    reports per pair, over the ground-truth objects of its two classes:

    * ``found``: the share (%) with a detection of either class of the pair at IoU >= ``iou``;
    * ``right class``: of those found, the share (%) whose highest-scoring such detection has
      the object's own class (50 % is chance for a detector that cannot tell the pair apart).

    Use it beside Detectron2's evaluators (``DatasetEvaluators([COCOEvaluator(...), this])``);
    ``evaluate()`` returns ``{"context_pairs": {"car/boat found": ..., "car/boat right class":
    ..., "car/boat objects": ...}}``. Crowd annotations are left out.
    """

    def __init__(self, dataset_name: str, *, iou: float = 0.5):
        """
        Args:
            dataset_name (str): a registered dataset whose metadata has ``context_pairs`` and
                ``thing_classes``, and whose dicts have "image_id" and "annotations".
            iou (float): the IoU from which a detection finds an object, in (0, 1].
        """
        if not 0.0 < iou <= 1.0:
            raise ValueError(f"ContextPairEvaluator iou={iou} is invalid; expected (0, 1].")
        meta = MetadataCatalog.get(dataset_name)
        pairs = meta.get("context_pairs", None)
        if not pairs:
            raise ValueError(
                f"Dataset {dataset_name!r} has no 'context_pairs' metadata (pairs of class names "
                "told apart only by context); ContextPairEvaluator has nothing to report."
            )
        classes = list(meta.thing_classes)
        unknown = [c for c in itertools.chain(*pairs) if c not in classes]
        if unknown or any(len(p) != 2 for p in pairs):
            raise ValueError(
                f"Dataset {dataset_name!r}'s context_pairs {pairs} must be pairs of its "
                f"thing_classes {classes}" + (f"; unknown: {unknown}" if unknown else "") + "."
            )
        self._pairs: List[Tuple[int, int]] = [
            (classes.index(a), classes.index(b)) for a, b in pairs
        ]
        self._names = [f"{a}/{b}" for a, b in pairs]
        self._iou = iou
        self._gt = {d["image_id"]: _gt_boxes(d) for d in DatasetCatalog.get(dataset_name)}
        self.reset()

    def reset(self) -> None:
        # per pair: objects, found, found with the right class
        self._counts = torch.zeros(len(self._pairs), 3, dtype=torch.long)

    def process(self, inputs, outputs) -> None:
        for x, out in zip(inputs, outputs):
            boxes, classes = self._gt[x["image_id"]]
            if len(classes) == 0:
                continue
            det = out["instances"].to("cpu")
            self._counts += count_pair_objects(
                boxes,
                classes,
                det.pred_boxes.tensor,
                det.scores,
                det.pred_classes,
                self._pairs,
                self._iou,
            )

    def evaluate(self):
        counts = comm.gather(self._counts, dst=0)
        if not comm.is_main_process():
            return {}
        total = torch.stack(counts).sum(dim=0)
        results: Dict[str, float] = OrderedDict()
        for name, (objects, found, right) in zip(self._names, total.tolist()):
            results[f"{name} objects"] = float(objects)
            results[f"{name} found"] = 100.0 * found / objects if objects else float("nan")
            results[f"{name} right class"] = 100.0 * right / found if found else float("nan")
        return OrderedDict(context_pairs=results)


def _gt_boxes(record: dict) -> Tuple[torch.Tensor, torch.Tensor]:
    """(K, 4) XYXY absolute boxes and (K,) contiguous class ids of a dataset dict, no crowd."""
    annos = [a for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
    return (
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor([a["category_id"] for a in annos], dtype=torch.long),
    )


def count_pair_objects(
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    pairs: Sequence[Tuple[int, int]],
    iou: float,
) -> torch.Tensor:
    """
    Per pair, for one image: (objects of the pair's classes, found, found with the right class),
    a (P, 3) long tensor. An object is found by a detection of either class of its pair at IoU
    >= ``iou``; its class is the class of the highest-scoring such detection.
    """
    counts = torch.zeros(len(pairs), 3, dtype=torch.long)
    overlaps = pairwise_iou(Boxes(gt_boxes), Boxes(boxes))  # (K, D)
    for p, pair in enumerate(pairs):
        in_pair = torch.isin(classes, torch.tensor(pair))
        for k in torch.nonzero(torch.isin(gt_classes, torch.tensor(pair))).flatten().tolist():
            counts[p, 0] += 1
            match = in_pair & (overlaps[k] >= iou)
            if not bool(match.any()):
                continue
            counts[p, 1] += 1
            best = torch.where(match, scores, torch.full_like(scores, -1.0)).argmax()
            counts[p, 2] += int(classes[best] == gt_classes[k])
    return counts
