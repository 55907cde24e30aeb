"""The paper's dataset settings at toy size: a tiny Pascal VOC folder and a tiny COCO json,
registered the way Detectron2's builtins are, trained for a few iterations with the stock
DefaultTrainer machinery and evaluated with the matching stock evaluator."""

import json
import os

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc
from model_utils import load_cfg

from ion_d2.engine import IONTrainer

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "ION_VGG16_tiny_cpu.yaml")
CLASSES = ("cat", "dog", "car")


def _scene(rng, h=96, w=128):
    image = rng.randint(0, 60, size=(h, w, 3)).astype(np.uint8)
    boxes = []
    for k in range(2):
        x0, y0 = int(rng.randint(0, w - 40)), int(rng.randint(0, h - 40))
        x1, y1 = x0 + int(rng.randint(16, 40)), y0 + int(rng.randint(16, 40))
        cls = int(rng.randint(len(CLASSES)))
        image[y0:y1, x0:x1] = (80 * (cls + 1), 255 - 60 * cls, 40 * k)
        boxes.append((cls, x0, y0, x1, y1))
    return image, boxes


def _write_voc(root, n=4):
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    rng = np.random.RandomState(0)
    ids = [f"{i:06d}" for i in range(n)]
    for image_id in ids:
        image, boxes = _scene(rng)
        cv2.imwrite(os.path.join(root, "JPEGImages", image_id + ".jpg"), image)
        objects = "".join(
            f"<object><name>{CLASSES[c]}</name><pose>Unspecified</pose><truncated>0</truncated>"
            f"<difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for c, x0, y0, x1, y1 in boxes
        )
        xml = (
            f"<annotation><filename>{image_id}.jpg</filename><size><width>{image.shape[1]}"
            f"</width><height>{image.shape[0]}</height><depth>3</depth></size>{objects}"
            "</annotation>"
        )
        with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as f:
            f.write(xml)
    with open(os.path.join(root, "ImageSets", "Main", "trainval.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


def _write_coco(root, n=4):
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = np.random.RandomState(1)
    images, annotations = [], []
    for i in range(n):
        image, boxes = _scene(rng)
        name = f"{i:04d}.png"
        cv2.imwrite(os.path.join(root, "images", name), image)
        images.append({"id": i + 1, "file_name": name, "height": 96, "width": 128})
        for c, x0, y0, x1, y1 in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": c + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    path = os.path.join(root, "instances.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


@pytest.fixture
def registered(tmp_path):
    names = []

    def register(kind):
        name = f"ion_d2_test_{kind}_{len(names)}"
        if kind == "voc":
            root = str(tmp_path / "VOC2007")
            _write_voc(root)
            register_pascal_voc(name, root, "trainval", 2007, CLASSES)
            # As detectron2.data.datasets.builtin does for its VOC splits.
            MetadataCatalog.get(name).evaluator_type = "pascal_voc"
        else:
            root = str(tmp_path / "coco")
            register_coco_instances(name, {}, _write_coco(root), os.path.join(root, "images"))
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


@pytest.mark.parametrize("kind,evaluator", [("voc", "pascal_voc"), ("coco", "coco")])
def test_few_iterations_then_stock_evaluator(kind, evaluator, registered, tmp_path):
    name = registered(kind)
    assert MetadataCatalog.get(name).evaluator_type == evaluator
    cfg = load_cfg(TINY)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(CLASSES)
    cfg.MODEL.ION.SEG_LOSS_ON = False  # these datasets have no semantic labels
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.MAX_ITER = 3
    cfg.SOLVER.BASE_LR = 0.001
    cfg.SOLVER.ION_END_LR = 0.0001
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    trainer = IONTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER  # training finished
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert 0.0001 <= lr < 0.001  # exponentially decayed towards ION_END_LR

    cfg.defrost()
    cfg.DATASETS.TEST = (name,)
    results = IONTrainer.test(cfg, trainer.model)
    bbox = results["bbox"]
    for key in ("AP", "AP50", "AP75"):
        assert key in bbox and np.isfinite(bbox[key])
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
