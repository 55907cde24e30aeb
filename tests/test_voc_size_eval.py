"""AP50 by object size on Pascal VOC-format data (TEST.ION_VOC_AP_BY_SIZE): hand-made ground
truth and detections whose per-size AP is worked out by hand, and the stock AP50 reproduced."""

import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_pascal_voc
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.structures import Boxes, Instances
from model_utils import load_cfg

from ion_d2.engine import IONTrainer
from ion_d2.evaluation import PascalVOCBySizeEvaluator, voc_ap_in_area_range

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "ION_VGG16_tiny_cpu.yaml")
CLASSES = ("cat", "dog")

# VOC boxes: 1-based inclusive (xmin, ymin, xmax, ymax); areas (w+1)(h+1).
GROUND_TRUTH = {
    "a": [
        ("cat", (11, 11, 30, 30), 0),  # 20x20 = 400: small
        ("cat", (1, 1, 120, 120), 0),  # 120x120 = 14400: large
        ("dog", (101, 101, 150, 150), 0),  # 50x50 = 2500: medium
    ],
    "b": [
        ("cat", (21, 21, 60, 60), 0),  # 40x40 = 1600: medium
        ("cat", (151, 151, 160, 160), 1),  # difficult: ignored everywhere
    ],
}


def _voc_to_d2(box):
    x0, y0, x1, y1 = box
    return (x0 - 1.0, y0 - 1.0, float(x1), float(y1))


# (image, class, score, Detectron2 XYXY box) and what each detection is for cat/dog per size.
DETECTIONS = [
    ("b", "cat", 0.99, (80.0, 80.0, 200.0, 200.0)),  # unmatched, 14400: FP large
    ("b", "cat", 0.95, (100.0, 0.0, 110.0, 10.0)),  # unmatched, 100: FP small
    ("a", "cat", 0.90, _voc_to_d2((1, 1, 120, 120))),  # TP large
    ("a", "cat", 0.80, _voc_to_d2((11, 11, 30, 30))),  # TP small
    ("b", "cat", 0.60, _voc_to_d2((21, 21, 60, 60))),  # TP medium
    ("a", "cat", 0.50, _voc_to_d2((11, 11, 30, 30))),  # duplicate: FP small
    ("b", "cat", 0.40, _voc_to_d2((151, 151, 160, 160))),  # difficult: ignored
    ("a", "cat", 0.30, (140.0, 10.0, 180.0, 50.0)),  # unmatched, 1600: FP medium
    ("b", "dog", 0.95, (0.0, 90.0, 100.0, 190.0)),  # unmatched, 10000: FP large
    ("a", "dog", 0.85, _voc_to_d2((101, 101, 150, 150))),  # TP medium
]
# By hand (area under the interpolated precision/recall curve, VOC 2012's metric):
#   cat small:  FP, TP (1 positive)            -> precision 1/2 at recall 1 -> AP 0.5
#   cat medium: TP, then only FP               -> AP 1.0
#   cat large:  FP, TP                         -> AP 0.5
#   dog medium: TP (the large FP is ignored)   -> AP 1.0; dog has no small or large object.
#   all sizes:  cat FP FP TP TP TP FP . FP (3 positives) -> precision 3/5 at recall 1 -> 0.6;
#               dog FP TP -> 0.5; stock AP50 = mean = 55.
EXPECTED = {"AP50_small": 50.0, "AP50_medium": 100.0, "AP50_large": 50.0, "AP50": 55.0}


def _write_voc_tree(root, ground_truth, split="test"):
    for sub in ("Annotations", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for image_id, objects in ground_truth.items():
        xml = "".join(
            f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for name, (x0, y0, x1, y1), difficult in objects
        )
        with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w") as f:
            f.write(
                f"<annotation><filename>{image_id}.jpg</filename><size><width>200</width>"
                f"<height>200</height><depth>3</depth></size>{xml}</annotation>"
            )
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("\n".join(ground_truth) + "\n")


@pytest.fixture
def voc_dataset(tmp_path):
    names = []

    def make(ground_truth, year):
        name = f"ion_d2_test_voc_size_{len(names)}"
        root = str(tmp_path / f"VOC{year}_{len(names)}")
        _write_voc_tree(root, ground_truth)
        register_pascal_voc(name, root, "test", year, CLASSES)
        MetadataCatalog.get(name).evaluator_type = "pascal_voc"
        names.append(name)
        return name

    yield make
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _run(evaluator, detections):
    evaluator.reset()
    for image_id in sorted({d[0] for d in detections}):
        mine = [d for d in detections if d[0] == image_id]
        instances = Instances((200, 200))
        instances.pred_boxes = Boxes(torch.tensor([d[3] for d in mine], dtype=torch.float32))
        instances.scores = torch.tensor([d[2] for d in mine])
        instances.pred_classes = torch.tensor([CLASSES.index(d[1]) for d in mine])
        evaluator.process([{"image_id": image_id}], [{"instances": instances}])
    return evaluator.evaluate()["bbox"]


def test_hand_computed_ap_by_size(voc_dataset):
    name = voc_dataset(GROUND_TRUTH, 2012)
    bbox = _run(PascalVOCBySizeEvaluator(name), DETECTIONS)
    for key, value in EXPECTED.items():
        assert bbox[key] == pytest.approx(value, abs=1e-6), key
    # The stock keys are unchanged.
    stock = _run(PascalVOCDetectionEvaluator(name), DETECTIONS)
    for key in ("AP", "AP50", "AP75"):
        assert bbox[key] == pytest.approx(stock[key])


def test_no_ground_truth_in_a_range_gives_nan(voc_dataset):
    name = voc_dataset({"a": [("cat", (11, 11, 30, 30), 0)]}, 2012)
    bbox = _run(PascalVOCBySizeEvaluator(name), [("a", "cat", 0.9, (10.0, 10.0, 30.0, 30.0))])
    assert bbox["AP50_small"] == pytest.approx(100.0)
    assert np.isnan(bbox["AP50_medium"]) and np.isnan(bbox["AP50_large"])


@pytest.mark.parametrize("year", [2007, 2012])
def test_all_sizes_range_reproduces_stock_ap50(voc_dataset, year):
    """With the range [0, inf) the rule is the VOC devkit's AP50, on random detections with
    duplicates, misses, difficult objects and score ties."""
    rng = np.random.RandomState(year)
    ground_truth, detections = {}, []
    for k in range(6):
        image_id = f"{k:06d}"
        objects = []
        for _ in range(rng.randint(1, 5)):
            x0, y0 = rng.randint(1, 150, size=2)
            w, h = rng.randint(5, 50, size=2)
            objects.append(
                (CLASSES[rng.randint(2)], (x0, y0, x0 + w, y0 + h), int(rng.rand() < 0.2))
            )
        ground_truth[image_id] = objects
        for name, box, _ in objects:
            for _ in range(rng.randint(0, 3)):
                jitter = rng.uniform(-6, 6, size=4)
                d2_box = tuple(float(v) for v in np.array(_voc_to_d2(box)) + jitter)
                detections.append((image_id, name, round(rng.rand(), 1), d2_box))
        for _ in range(2):  # false positives anywhere
            x0, y0 = rng.uniform(0, 150, size=2)
            detections.append(
                (image_id, CLASSES[rng.randint(2)], rng.rand(), (x0, y0, x0 + 30.0, y0 + 20.0))
            )
    name = voc_dataset(ground_truth, year)
    evaluator = PascalVOCBySizeEvaluator(name, area_ranges={"all": (0.0, float("inf"))})
    bbox = _run(evaluator, detections)
    assert bbox["AP50_all"] == pytest.approx(bbox["AP50"], abs=1e-9)
    assert 0 < bbox["AP50"] < 100


def test_detections_outside_the_range_are_ignored():
    """One small positive. Ranked above its true positive: a detection of the large object (IoU
    1) and an unmatched large detection; either would halve the small AP if it counted."""
    gt = {"a": (np.array([[11.0, 11, 30, 30], [1, 1, 150, 150]]), np.array([False, False]))}
    dets = [
        ("a", 0.9, [1.0, 1, 150, 150]),
        ("a", 0.8, [151.0, 1, 199, 199]),  # 49 x 199 = 9751 px: large
        ("a", 0.7, [11.0, 11, 30, 30]),
    ]
    assert voc_ap_in_area_range(dets, gt, (0, 32**2), use_07_metric=False) == (1.0, 1)
    # In the large range the unmatched large box is a false positive after the true one.
    assert voc_ap_in_area_range(dets, gt, (96**2, 1e10), use_07_metric=False) == (1.0, 1)
    ap, npos = voc_ap_in_area_range(dets[1:] + dets[:1], gt, (96**2, 1e10), use_07_metric=False)
    assert npos == 1  # order of the list does not matter, scores do
    assert ap == 1.0
    ranked_first = [("a", 0.95, [151.0, 1, 199, 199])] + dets
    assert voc_ap_in_area_range(ranked_first, gt, (96**2, 1e10), use_07_metric=False) == (0.5, 1)


def test_config_switch_picks_the_evaluator(voc_dataset, tmp_path):
    name = voc_dataset(GROUND_TRUTH, 2007)
    cfg = load_cfg(TINY)
    assert cfg.TEST.ION_VOC_AP_BY_SIZE is False
    assert type(IONTrainer.build_evaluator(cfg, name)) is PascalVOCDetectionEvaluator
    cfg.TEST.ION_VOC_AP_BY_SIZE = True
    assert isinstance(IONTrainer.build_evaluator(cfg, name), PascalVOCBySizeEvaluator)
    MetadataCatalog.get("ion_d2_test_voc_size_coco").evaluator_type = "coco"
    try:
        with pytest.raises(ValueError, match="ION_VOC_AP_BY_SIZE.*pascal_voc"):
            IONTrainer.build_evaluator(cfg, "ion_d2_test_voc_size_coco")
    finally:
        MetadataCatalog.remove("ion_d2_test_voc_size_coco")
