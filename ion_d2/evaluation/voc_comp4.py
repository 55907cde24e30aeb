"""
The PASCAL VOC evaluation server's result files, for test sets without public annotations
(VOC 2012 test, Table 2 of the paper: "submitting to the public evaluation server").

The server scores a tar of ``results/VOC2012/Main/comp4_det_test_<class>.txt`` ("comp4": trained
on any data; the devkit's naming), one file per class with one line per detection::

    <image id> <score> <xmin> <ymin> <xmax> <ymax>

in VOC's 1-based pixel coordinates: the inverse of Detectron2's VOC loader, which subtracts 1
from xmin and ymin only, as ``PascalVOCDetectionEvaluator`` writes the same lines before scoring
them.
"""

import logging
import os
from collections import defaultdict
from typing import Dict, List

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = ["PascalVOCComp4Writer"]

logger = logging.getLogger(__name__)


class PascalVOCComp4Writer(DatasetEvaluator):
    """
    Writes every class's comp4 detection file for the VOC evaluation server and reports no
    metric (the annotations are the server's). Used for datasets whose metadata has
    ``evaluator_type`` "pascal_voc_comp4" (``voc_2012_test``).
    """

    def __init__(self, dataset_name: str, output_dir: str):
        """
        Args:
            dataset_name (str): a registered dataset with ``thing_classes``, ``year`` and
                ``split`` metadata.
            output_dir (str): the files go to ``<output_dir>/results/VOC<year>/Main/``.
        """
        meta = MetadataCatalog.get(dataset_name)
        self._dataset_name = dataset_name
        self._class_names = list(meta.thing_classes)
        self._split = meta.get("split", "test")
        self.results_dir = os.path.join(
            output_dir, "results", f"VOC{meta.get('year', 2012)}", "Main"
        )
        self._predictions: Dict[int, List[str]] = defaultdict(list)

    def reset(self):
        self._predictions = defaultdict(list)

    def process(self, inputs, outputs):
        for input, output in zip(inputs, outputs):
            image_id = input["image_id"]
            instances = output["instances"].to("cpu")
            boxes = instances.pred_boxes.tensor.numpy()
            scores = instances.scores.tolist()
            classes = instances.pred_classes.tolist()
            for box, score, cls in zip(boxes, scores, classes):
                xmin, ymin, xmax, ymax = box
                # The inverse of Detectron2's VOC loading (xmin - 1, ymin - 1).
                self._predictions[cls].append(
                    f"{image_id} {score:.3f} {xmin + 1:.1f} {ymin + 1:.1f} {xmax:.1f} {ymax:.1f}"
                )

    def result_file(self, class_name: str) -> str:
        """The path of ``class_name``'s file."""
        return os.path.join(self.results_dir, f"comp4_det_{self._split}_{class_name}.txt")

    def evaluate(self):
        """
        Writes one file per class (empty for a class without detections).

        Returns:
            dict: empty (no metric), on every process.
        """
        gathered = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return {}
        lines = defaultdict(list)
        for predictions in gathered:
            for cls, cls_lines in predictions.items():
                lines[cls].extend(cls_lines)
        PathManager.mkdirs(self.results_dir)
        for cls, name in enumerate(self._class_names):
            with PathManager.open(self.result_file(name), "w") as f:
                f.write("".join(line + "\n" for line in lines.get(cls, [])))
        total = sum(len(v) for v in lines.values())
        logger.info(
            f"{self._dataset_name}: no public annotations; wrote {total} detections to "
            f"{self.results_dir}/comp4_det_{self._split}_<class>.txt for the VOC evaluation "
            f"server (upload a tar of {os.path.dirname(os.path.dirname(self.results_dir))})."
        )
        return {}
