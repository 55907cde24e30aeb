"""A few-iteration train + evaluate + predict on a tiny slice of the bundled dataset."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from model_utils import load_cfg, synthetic_slice

from ion_d2.engine import train_and_evaluate

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")


@pytest.fixture(scope="module")
def synth_slice(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    with synthetic_slice(root, num_train=8, num_val=4, seed=3, name_prefix="e2e") as names:
        yield names


def _read_losses(metrics_file):
    with open(metrics_file) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r["total_loss"] for r in records if "total_loss" in r]


def test_train_evaluate_predict_and_reload(synth_slice, tmp_path):
    train, val = synth_slice
    cfg = load_cfg(TINY)
    cfg.DATASETS.TRAIN = (train,)
    cfg.DATASETS.TEST = (val,)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 6
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = MetadataCatalog.get(train).num_sem_seg_classes
    cfg.INPUT.MIN_SIZE_TRAIN = (0,)  # the generated images' own size
    cfg.INPUT.MIN_SIZE_TEST = 0
    cfg.SOLVER.MAX_ITER = 30
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.ION_END_LR = 0.002
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    cfg.freeze()

    trainer, results = train_and_evaluate(cfg)
    losses = _read_losses(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))
    assert len(losses) >= 2 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    bbox = results["bbox"]
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AP-car", "AP-boat"):
        assert key in bbox

    # The saved checkpoint reloads into a fresh model that predicts identically.
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    assert os.path.isfile(weights)
    pred_cfg = cfg.clone()
    pred_cfg.defrost()
    pred_cfg.MODEL.WEIGHTS = weights
    pred_cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    predictor = DefaultPredictor(pred_cfg)
    image = cv2.imread(DatasetCatalog.get(val)[0]["file_name"])
    a = predictor(image)["instances"]
    model = build_model(pred_cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()
    rgb = image[:, :, ::-1] if pred_cfg.INPUT.FORMAT == "RGB" else image
    with torch.no_grad():
        b = model(
            [
                {
                    "image": torch.as_tensor(rgb.transpose(2, 0, 1).astype("float32")),
                    "height": image.shape[0],
                    "width": image.shape[1],
                }
            ]
        )[0]["instances"]
    assert len(a) == len(b) > 0
    assert torch.allclose(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=1e-4)
    assert torch.allclose(a.scores, b.scores, atol=1e-5)

    # BGR uint8 images of any size.
    rng = np.random.RandomState(0)
    for h, w in ((37, 53), (250, 90)):
        out = predictor(rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8))["instances"]
        assert out.image_size == (h, w)
        boxes = out.pred_boxes.tensor
        assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()

    # tools/predict.py on a folder writes one visualised PNG per image.
    image_dir = os.path.dirname(DatasetCatalog.get(val)[0]["file_name"])
    vis_dir = tmp_path / "vis"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "predict.py"),
            "--config-file",
            TINY,
            "--weights",
            weights,
            "--input",
            image_dir,
            "--output",
            str(vis_dir),
            "MODEL.ROI_HEADS.NUM_CLASSES",
            "6",
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
            str(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(os.listdir(vis_dir))
    assert written == sorted(name + ".png" for name in os.listdir(image_dir))
    assert (
        cv2.imread(str(vis_dir / written[0])).shape[:2]
        == cv2.imread(os.path.join(image_dir, written[0][: -len(".png")])).shape[:2]
    )

    # A second call finds the finished run and does not train again.
    trainer2, _ = train_and_evaluate(cfg)
    assert trainer2.start_iter == cfg.SOLVER.MAX_ITER
