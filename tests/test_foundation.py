"""The environment ion_d2 stands on: detectron2 imports, its compiled-op fallback, a stock
predictor and the COCO evaluator, all on CPU."""

import importlib.machinery
import json
import subprocess
import sys
import types

import detectron2
import numpy as np
import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.engine import DefaultPredictor
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances

from ion_d2.engine.trainer import has_compiled_ops


@pytest.mark.parametrize(
    "statement",
    [
        "import detectron2.modeling, detectron2.evaluation, ion_d2",
        "import ion_d2, detectron2.modeling, detectron2.evaluation",
        "from detectron2.engine import DefaultTrainer, DefaultPredictor; import ion_d2",
    ],
)
def test_imports_in_any_order(statement):
    proc = subprocess.run([sys.executable, "-c", statement], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(has_compiled_ops(), reason="a compiled detectron2 is installed")
def test_fallback_compiled_op_raises_clear_error():
    from detectron2 import _C
    from detectron2.layers import nms_rotated
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    boxes = torch.tensor([[10.0, 10.0, 4.0, 4.0, 0.0]])
    with pytest.raises(_C.CompiledOpUnavailableError, match="'box_iou_rotated'.*compiled"):
        pairwise_iou_rotated(boxes, boxes)
    # Reached through torch.ops.detectron2, which the fallback registers.
    with pytest.raises(NotImplementedError, match="'nms_rotated'.*ION_D2_DETECTRON2"):
        nms_rotated(boxes, torch.ones(1), 0.5)


@pytest.mark.parametrize(
    "suffix,compiled", [(importlib.machinery.EXTENSION_SUFFIXES[0], True), (".py", False)]
)
def test_has_compiled_ops_asks_whether_C_is_an_extension_module(monkeypatch, suffix, compiled):
    fake = types.ModuleType("detectron2._C")
    fake.__file__ = f"/site-packages/detectron2/_C{suffix}"
    monkeypatch.setattr(detectron2, "_C", fake, raising=False)
    has_compiled_ops.cache_clear()
    try:
        assert has_compiled_ops() is compiled
    finally:
        has_compiled_ops.cache_clear()


def test_default_predictor_stock_r50_c4_on_cpu():
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""  # random weights
    cfg.INPUT.MIN_SIZE_TEST = 160
    cfg.INPUT.MAX_SIZE_TEST = 256
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
    # Random weights give saturated softmax scores; keep every box so there is output to check.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = -1.0
    predictor = DefaultPredictor(cfg)
    assert not predictor.model.training
    image = np.random.RandomState(0).randint(0, 256, size=(120, 150, 3), dtype=np.uint8)
    instances = predictor(image)["instances"]
    # Detections are returned at the input's resolution, not the resized one.
    assert instances.image_size == (120, 150)
    assert len(instances) > 0
    for field in ("pred_boxes", "scores", "pred_classes"):
        assert instances.has(field)
    boxes = instances.pred_boxes.tensor
    assert torch.isfinite(boxes).all()
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 150).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 120).all()

    # The same as resizing (short side 160 -> 160x200) and calling the model directly.
    resized = predictor.aug.get_transform(image).apply_image(image)
    assert resized.shape == (160, 200, 3)
    with torch.no_grad():
        direct = predictor.model(
            [
                {
                    "image": torch.as_tensor(resized.transpose(2, 0, 1).astype("float32")),
                    "height": 120,
                    "width": 150,
                }
            ]
        )[0]["instances"]
    assert len(direct) == len(instances)
    assert torch.allclose(direct.pred_boxes.tensor, boxes, atol=1e-3)


def _write_tiny_coco(tmp_path):
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 100, "width": 100},
        {"id": 2, "file_name": "b.jpg", "height": 80, "width": 120},
    ]
    boxes = {1: [[10, 10, 30, 20], [50, 40, 40, 40]], 2: [[5, 5, 60, 50]]}
    annotations, ann_id = [], 1
    for image_id, bbs in boxes.items():
        for bb in bbs:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": 7,
                    "bbox": bb,
                    "area": bb[2] * bb[3],
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    data = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 7, "name": "thing"}],
    }
    path = tmp_path / "tiny_coco.json"
    path.write_text(json.dumps(data))
    return str(path)


def _evaluate(name, dicts, tmp_path, shift, **kwargs):
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path / f"eval{shift}"), **kwargs)
    evaluator.reset()
    for d in dicts:
        gt = torch.tensor([a["bbox"] for a in d["annotations"]], dtype=torch.float32)
        gt[:, 2:] += gt[:, :2]  # XYWH -> XYXY
        pred = Instances((d["height"], d["width"]))
        pred.pred_boxes = Boxes(gt + shift)
        pred.scores = torch.linspace(0.9, 0.8, len(gt))
        pred.pred_classes = torch.zeros(len(gt), dtype=torch.int64)
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": pred}])
    return evaluator.evaluate()["bbox"]


def test_coco_evaluator_on_tiny_dataset(tmp_path):
    json_file = _write_tiny_coco(tmp_path)
    name = "ion_d2_test_tiny_coco"
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, str(tmp_path), name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=str(tmp_path))
    try:
        dicts = DatasetCatalog.get(name)
        perfect = _evaluate(name, dicts, tmp_path, shift=0.0, use_fast_impl=False)
        shifted = _evaluate(name, dicts, tmp_path, shift=6.0, use_fast_impl=False)
        # COCOEvaluator's defaults, as Detectron2's own tools/train_net.py builds it (issue 25:
        # it raised CompiledOpUnavailableError on ion_d2's Python-only detectron2): the same AP.
        default = _evaluate(name, dicts, tmp_path, shift=6.0)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert key in perfect
    assert perfect["AP"] == pytest.approx(100.0)
    assert perfect["AP50"] == pytest.approx(100.0)
    # Shifting every box by 6 px keeps some IoUs above 0.5 but loses the strict thresholds.
    assert 0.0 < shifted["AP"] < perfect["AP"]
    assert shifted["AP75"] < 100.0
    assert default == pytest.approx(shifted, abs=0.01, nan_ok=True)  # APl: no large boxes
