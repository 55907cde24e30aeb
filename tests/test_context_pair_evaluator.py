"""ContextPairEvaluator: per context pair, the objects found and the share given the right class."""

import math

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.structures import Boxes, BoxMode, Instances
from model_utils import load_cfg, synthetic_slice

from ion_d2.data.synthetic import CONTEXT_PAIRS, THING_CLASSES
from ion_d2.engine import IONTrainer
from ion_d2.evaluation import ContextPairEvaluator
from ion_d2.evaluation.context_pairs import count_pair_objects

CLASSES = ["car", "boat", "lamp", "ball", "sign", "ring"]
PAIRS = [(0, 1), (2, 3)]


def _anno(box, category):
    return {"bbox": list(box), "bbox_mode": BoxMode.XYXY_ABS, "category_id": category}


def _dets(rows, size=(100, 100)):
    """Instances from (x1, y1, x2, y2, score, class) rows."""
    inst = Instances(size)
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    inst.pred_boxes = Boxes(t[:, :4])
    inst.scores = t[:, 4]
    inst.pred_classes = t[:, 5].long()
    return inst


def test_counts_by_hand():
    gt_boxes = torch.tensor(
        [[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 60], [70, 70, 90, 90], [0, 50, 10, 60.0]]
    )
    gt_classes = torch.tensor([0, 1, 2, 4, 3])  # car, boat, lamp, sign, ball
    dets = _dets(
        [
            [0, 0, 10, 10, 0.6, 1],  # the car as boat (0.6) ...
            [0, 0, 10, 11, 0.4, 0],  # ... and as car (0.4): the boat wins, wrong
            [20, 20, 40, 40, 0.9, 1],  # the boat as boat: right
            [50, 50, 60, 60, 0.9, 4],  # the lamp as sign: not in the pair, not found
            [70, 70, 90, 90, 0.9, 4],  # the sign: no pair
            [0, 50, 10, 58, 0.3, 3],  # the ball at IoU 0.8: found, right
        ]
    )
    counts = count_pair_objects(
        gt_boxes, gt_classes, dets.pred_boxes.tensor, dets.scores, dets.pred_classes, PAIRS, 0.5
    )
    assert counts.tolist() == [[2, 2, 1], [2, 1, 1]]
    # A stricter IoU loses the ball (0.8).
    strict = count_pair_objects(
        gt_boxes, gt_classes, dets.pred_boxes.tensor, dets.scores, dets.pred_classes, PAIRS, 0.9
    )
    assert strict.tolist() == [[2, 2, 1], [2, 0, 0]]


def test_evaluator_over_a_dataset(registered):
    dicts = [
        {"image_id": 1, "file_name": "a.png", "height": 100, "width": 100,
         "annotations": [_anno((0, 0, 10, 10), 0), _anno((20, 20, 40, 40), 2)]},
        {"image_id": 2, "file_name": "b.png", "height": 100, "width": 100,
         "annotations": [_anno((0, 0, 30, 30), 1), dict(_anno((50, 50, 60, 60), 1), iscrowd=1)]},
    ]  # fmt: skip
    name = registered("ctx_pairs_test", dicts, context_pairs=[["0", "1"], ["2", "3"]])
    evaluator = ContextPairEvaluator(name)
    evaluator.reset()
    evaluator.process(
        [{"image_id": 1}, {"image_id": 2}],
        [
            {"instances": _dets([[0, 0, 10, 10, 0.9, 0], [20, 20, 40, 40, 0.8, 3]])},
            {"instances": _dets([[0, 0, 30, 30, 0.7, 0]])},
        ],
    )
    results = evaluator.evaluate()["context_pairs"]
    assert results["0/1 objects"] == 2.0  # the crowd box is left out
    assert results["0/1 found"] == 100.0 and results["0/1 right class"] == 50.0
    assert results["2/3 objects"] == 1.0
    assert results["2/3 found"] == 100.0 and results["2/3 right class"] == 0.0
    evaluator.reset()
    assert math.isnan(evaluator.evaluate()["context_pairs"]["0/1 found"])


def test_refuses_datasets_without_or_with_bad_pairs(registered):
    record = [{"image_id": 1, "file_name": "a.png", "height": 9, "width": 9, "annotations": []}]
    with pytest.raises(ValueError, match="no 'context_pairs' metadata"):
        ContextPairEvaluator(registered("ctx_none", record))
    with pytest.raises(ValueError, match=r"unknown: \['dog'\]"):
        ContextPairEvaluator(registered("ctx_bad", record, context_pairs=[["0", "dog"]]))
    with pytest.raises(ValueError, match=r"iou=0 is invalid"):
        ContextPairEvaluator(registered("ctx_iou", record, context_pairs=[["0", "1"]]), iou=0)


@pytest.mark.parametrize("variant", ["base", "local"])
def test_the_bundled_pairs_and_the_trainers_evaluators(tmp_path, variant):
    assert CONTEXT_PAIRS == (("car", "boat"), ("lamp", "ball"))
    assert list(THING_CLASSES) == CLASSES
    cfg = load_cfg("configs/ION_VGG16_tiny_cpu.yaml")
    cfg.OUTPUT_DIR = str(tmp_path)
    # A slice of the bundled data under tmp_path, generated (as the trainer's test loader does
    # before it builds the evaluators, which read its json).
    prefix = f"ctx_pairs_{variant}"
    with synthetic_slice(
        str(tmp_path), num_train=1, num_val=3, name_prefix=prefix, variant=variant
    ):
        DatasetCatalog.get(f"{prefix}_val")
        evaluator = IONTrainer.build_evaluator(cfg, f"{prefix}_val")
        assert isinstance(evaluator, DatasetEvaluators)
        kinds = [type(e) for e in evaluator._evaluators]
        assert kinds == [COCOEvaluator, ContextPairEvaluator]
        pairs = evaluator._evaluators[1]._names
    assert pairs == ["car/boat", "lamp/ball"] + (["kite/bird"] if variant == "local" else [])


def test_demo_prints_one_line_per_pair():
    from model_utils import load_script

    demo = load_script("tools/run_demo.py")
    pairs = {
        "car/boat objects": 317.0,
        "car/boat found": 76.0252,
        "car/boat right class": 99.5851,
        "lamp/ball objects": 212.0,
        "lamp/ball found": 79.717,
        "lamp/ball right class": 55.6213,
    }
    assert demo.format_pair_table(pairs).splitlines() == [
        "car/boat: 317 objects, 76.0 % found, 99.6 % of those given the right class of the pair",
        "lamp/ball: 212 objects, 79.7 % found, 55.6 % of those given the right class of the pair",
    ]
