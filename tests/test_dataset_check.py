"""
Issue 19's dataset faults: each is refused before the first training step, with one error that
names the dataset, the count, the first offenders and the key to change (or, for boxes, dropped
on request), without decoding any image.
"""

import json
import logging
import os
import random

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from model_utils import box_record, check_cfg, load_cfg

from ion_d2.engine import IONTrainer

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _image(folder, name="img.png", size=(48, 64)):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    cv2.imwrite(path, np.random.RandomState(0).randint(0, 256, (*size, 3), dtype=np.uint8))
    return path


def test_coco_json_with_more_categories_than_num_classes_is_refused(tmp_path):
    # 7 categories, NUM_CLASSES 6: class index 6 would be the head's background.
    images, annotations = [], []
    for i in range(7):
        _image(tmp_path, f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 48, "width": 64})
        for k in range(7):
            annotations.append(
                {
                    "id": 7 * i + k,
                    "image_id": i,
                    "category_id": k + 1,
                    "bbox": [2 + 5 * k, 3, 8, 9],
                    "area": 72,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": f"c{k}"} for k in range(7)]
    with open(tmp_path / "ann.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    register_coco_instances("check_coco7", {}, str(tmp_path / "ann.json"), str(tmp_path))
    try:
        with pytest.raises(ValueError) as exc:
            IONTrainer.build_train_loader(check_cfg("check_coco7"))
    finally:
        DatasetCatalog.remove("check_coco7")
        MetadataCatalog.remove("check_coco7")
    message = str(exc.value)
    assert "DATASETS.TRAIN ('check_coco7',) (7 images)" in message
    assert "7 annotations with a category_id outside [0, 6)" in message
    assert f"{tmp_path / '0.png'} (category_id 6)" in message
    assert "MODEL.ROI_HEADS.NUM_CLASSES is 6" in message


def test_box_of_negative_width_is_refused_or_dropped(tmp_path, registered, caplog):
    path = _image(tmp_path)
    bad = box_record(path, [[10, 12, 20, 20], [57, 12, -85, 85]])
    name = registered("check_negbox", [bad, box_record(path, [[1, 1, 5, 5]])])
    cfg = check_cfg(name)
    with pytest.raises(ValueError) as exc:
        IONTrainer.build_train_loader(cfg)
    message = str(exc.value)
    assert "1 boxes with a non-positive or non-finite width or height" in message
    assert f"{path} (bbox [57.0, 12.0, -85.0, 85.0], width -85, height 85)" in message
    assert "DATALOADER.ION_DROP_INVALID_BOXES True" in message

    # XYXY boxes are converted as Detectron2 does (x1 < x0 is a negative width); NaN is refused.
    name = registered(
        "check_xyxy", [box_record(path, [[30, 5, 10, 20], [0, 0, float("nan"), 4]], mode=0)]
    )
    with pytest.raises(ValueError, match=r"2 boxes .*width -20, height 15.*width nan"):
        IONTrainer.build_train_loader(check_cfg(name))

    cfg.DATALOADER.ION_DROP_INVALID_BOXES = True
    with caplog.at_level(logging.WARNING, logger="ion_d2.data.dataset_check"):
        loader = IONTrainer.build_train_loader(cfg)
    assert "dropped 1 boxes of non-positive or non-finite width/height from 1 images" in caplog.text
    boxes = [len(d["annotations"]) for d in loader.dataset]
    assert boxes == [1, 1]
    assert loader.dataset[0]["annotations"][0]["bbox"] == [10, 12, 20, 20]


def test_missing_files_are_refused_before_training(tmp_path, registered):
    paths = [_image(tmp_path, f"{i}.png") for i in range(8)]
    for path in paths[1:]:
        os.remove(path)
    name = registered("check_missing", [box_record(p, [[1, 1, 9, 9]]) for p in paths])
    with pytest.raises(ValueError) as exc:
        IONTrainer.build_train_loader(check_cfg(name))
    message = str(exc.value)
    assert "7 files that cannot be read" in message
    assert f"{paths[1]} (file_name: No such file or directory)" in message
    assert paths[6] not in message and message.count("No such file") == 5  # first few only


def test_missing_test_file_is_refused_before_training(tmp_path, registered):
    train = registered("check_train_ok", [box_record(_image(tmp_path), [[1, 1, 9, 9]])])
    gone = str(tmp_path / "gone.png")
    test = registered("check_test_gone", [box_record(gone, [[1, 1, 9, 9]])])
    with pytest.raises(ValueError, match=rf"DATASETS.TEST 'check_test_gone'.*\n.*{gone}"):
        IONTrainer.build_train_loader(check_cfg(train, [test]))


def test_image_too_small_for_the_trunk_is_refused(tmp_path, registered):
    # 1x500 in the tiny config (shorter edge 64, longer edge capped at 128): 0 rows after
    # resizing, PIL's "height and width must be > 0" naming no file.
    thin = _image(tmp_path, "thin.png", size=(1, 500))
    name = registered(
        "check_thin",
        [box_record(thin, [[1, 0, 50, 1]], size=(1, 500)), box_record(_image(tmp_path), [])],
    )
    with pytest.raises(ValueError) as exc:
        IONTrainer.build_train_loader(check_cfg(name))
    message = str(exc.value)
    assert "1 images whose shorter side is under the trunk's stride (16 px)" in message
    assert f"{thin} (1x500 HxW, shorter side 0 px after resizing)" in message
    assert "INPUT.MIN_SIZE_TRAIN / INPUT.MAX_SIZE_TRAIN" in message


def test_minimum_size_comes_from_the_backbone(tmp_path):
    cfg = check_cfg("ion_synth_train")
    assert IONTrainer.trunk_stride(cfg) == 16
    # A trunk that stops at conv4 has stride 8: a 16 px image is then large enough.
    cfg.MODEL.ION.VGG16.OUT_FEATURES = ["conv3", "conv4"]
    assert IONTrainer.trunk_stride(cfg) == 8


def test_bundled_data_passes_unchanged_and_leaves_the_random_generators_alone():
    cfg = load_cfg(os.path.join(REPO, "configs", "ION_VGG16_synthetic.yaml"))
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    loader = IONTrainer.build_train_loader(cfg)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    dicts = DatasetCatalog.get("ion_synth_train")
    assert len(loader.dataset) == len(dicts)
    assert [d["annotations"] for d in loader.dataset] == [d["annotations"] for d in dicts]
