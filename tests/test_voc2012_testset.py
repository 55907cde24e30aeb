"""VOC 2012 test (Table 2): "voc_2012_test" registered where Detectron2 has none, its images
loaded from a VOC2012 folder, and the evaluation server's comp4 result files written by
PascalVOCComp4Writer (IONTrainer's evaluator for it) in the devkit's 1-based format."""

import os
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import CLASS_NAMES
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from model_utils import load_cfg

from ion_d2.data import (
    VOC_2012_TEST,
    load_voc_test_images,
    register_voc_2012_test,
    register_voc_test,
)
from ion_d2.engine import IONTrainer
from ion_d2.evaluation import PascalVOCComp4Writer

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")
IDS = ["2008_000001", "2008_000007"]
SIZES = [(60, 80), (72, 64)]  # (h, w)


@pytest.fixture
def voc2012(tmp_path):
    """A VOC2012 test folder as the tarball lays it out: test.txt and JPEGImages."""
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(IDS) + "\n")
    rng = np.random.default_rng(0)
    for image_id, (h, w) in zip(IDS, SIZES):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(root / "JPEGImages" / f"{image_id}.jpg"), image)
    return root


def _register(dirname):
    name = f"voc_test_{uuid.uuid4().hex[:8]}"
    register_voc_test(name, str(dirname))
    return name


def test_voc_2012_test_is_registered_once_with_vocs_metadata():
    # Detectron2 (v0.6 and main) registers no 2012 test split; ion_d2 does, under the root.
    assert VOC_2012_TEST in DatasetCatalog.list()
    meta = MetadataCatalog.get(VOC_2012_TEST)
    assert meta.thing_classes == list(CLASS_NAMES)
    assert meta.evaluator_type == "pascal_voc_comp4" and meta.year == 2012
    root = os.getenv("DETECTRON2_DATASETS", "datasets")
    assert meta.dirname == os.path.join(root, "VOC2012")
    # A name that exists already is left alone.
    assert register_voc_2012_test("/elsewhere") is False
    assert MetadataCatalog.get(VOC_2012_TEST).dirname == meta.dirname


def test_loads_the_listed_images_with_their_sizes(voc2012):
    dicts = DatasetCatalog.get(_register(voc2012))
    assert [d["image_id"] for d in dicts] == IDS
    assert [(d["height"], d["width"]) for d in dicts] == SIZES
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    assert all("annotations" not in d for d in dicts)


def test_missing_folder_names_what_is_needed(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageSets/Main/test.txt not found.*VOC2012 test"):
        load_voc_test_images(str(tmp_path / "VOC2012"))


def test_comp4_lines_are_the_devkits_format(voc2012, tmp_path):
    writer = PascalVOCComp4Writer(_register(voc2012), str(tmp_path / "out"))
    writer.reset()
    instances = Instances((60, 80))
    instances.pred_boxes = Boxes(torch.tensor([[10.0, 20.0, 30.5, 40.0], [0.0, 0.0, 5.0, 6.0]]))
    instances.scores = torch.tensor([0.9, 0.25])
    instances.pred_classes = torch.tensor([3, 14])
    writer.process([{"image_id": IDS[0]}], [{"instances": instances}])
    assert writer.evaluate() == {}
    main = tmp_path / "out" / "results" / "VOC2012" / "Main"
    assert sorted(os.listdir(main)) == sorted(f"comp4_det_test_{c}.txt" for c in CLASS_NAMES)
    # Detectron2 loads VOC boxes as (xmin - 1, ymin - 1, xmax, ymax): the inverse, 1-based.
    assert CLASS_NAMES[3] == "boat" and CLASS_NAMES[14] == "person"
    assert (main / "comp4_det_test_boat.txt").read_text() == f"{IDS[0]} 0.900 11.0 21.0 30.5 40.0\n"
    assert (main / "comp4_det_test_person.txt").read_text() == f"{IDS[0]} 0.250 1.0 1.0 5.0 6.0\n"
    assert (main / "comp4_det_test_cat.txt").read_text() == ""


def test_ion_trainer_writes_the_result_files_for_a_set_without_annotations(voc2012, tmp_path):
    name = _register(voc2012)
    cfg = load_cfg(TINY)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(CLASS_NAMES)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # an untrained model: keep its boxes
    cfg.MODEL.ION.SEG_LOSS_ON = False
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 10
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    cfg.DATASETS.TEST = (name,)
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    evaluator = IONTrainer.build_evaluator(cfg, name)
    assert isinstance(evaluator, PascalVOCComp4Writer)
    # No metric (DefaultTrainer.test returns a single dataset's results unwrapped).
    assert IONTrainer.test(cfg, model, [evaluator]) == {}
    main = tmp_path / "run" / "inference" / name / "results" / "VOC2012" / "Main"
    lines = [
        line.split()
        for c in CLASS_NAMES
        for line in (main / f"comp4_det_test_{c}.txt").read_text().splitlines()
    ]
    assert len(lines) == len(IDS) * 5
    for image_id, score, *box in lines:
        h, w = SIZES[IDS.index(image_id)]
        x1, y1, x2, y2 = map(float, box)
        assert 0 <= float(score) <= 1
        assert 1 <= x1 <= x2 <= w and 1 <= y1 <= y2 <= h
