"""
Issue 29's dataset inputs: images that cannot be read as 8-bit images (16-bit PNGs, truncated
files), a COCO json whose images share an id, and boxes wholly outside their image are each
named before the first training step; the mapper names (or the loader skips, deterministically)
an image that fails to decode in training.
"""

import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BoxMode
from model_utils import box_record, check_cfg

from ion_d2.data import IONDatasetMapper
from ion_d2.data.loader import build_ion_train_loader
from ion_d2.engine import IONTrainer

SKIP_KEY = "DATALOADER.ION_SKIP_UNREADABLE_IMAGES"


def _write(folder, name, image):
    path = os.path.join(folder, name)
    assert cv2.imwrite(path, image)
    return path


def _image(folder, name, seed=0):
    return _write(folder, name, np.random.RandomState(seed).randint(0, 256, (48, 64, 3), np.uint8))


def _truncated(folder, name):
    path = _image(folder, name)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def test_16_bit_images_are_refused_before_training_and_by_the_mapper(tmp_path, registered):
    # Detectron2's read_image clips a 16-bit grey PNG to an all-white image.
    ramp = (np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16)
    grey = _write(tmp_path, "grey16.png", ramp)
    rgb = _write(tmp_path, "rgb16.png", np.stack([ramp] * 3, axis=-1))
    tiff = _write(tmp_path, "grey16.tif", ramp)
    good = _image(tmp_path, "good.png")
    name = registered("inputs_16bit", [box_record(p) for p in (good, grey, rgb, tiff)])
    with pytest.raises(ValueError) as exc:
        IONTrainer.build_train_loader(check_cfg(name))
    message = str(exc.value)
    assert "DATASETS.TRAIN ('inputs_16bit',) (4 images)" in message
    assert "3 image files that cannot be read as 8-bit images" in message
    assert f"{grey} (file_name: 16-bit PNG)" in message
    assert f"{rgb} (file_name: 16-bit PNG)" in message
    assert f"{tiff} (file_name: PIL mode 'I;16', not 8-bit)" in message
    assert good not in message and f"{SKIP_KEY} True" in message

    # The training path, without the check, refuses it too instead of reading it white.
    mapper = IONDatasetMapper(check_cfg(name), True)
    assert mapper(box_record(good))["image"].shape[0] == 3
    with pytest.raises(OSError, match=f"{grey} cannot be read as an 8-bit image: 16-bit PNG"):
        mapper(box_record(grey))


def test_truncated_images_are_refused_or_left_out_before_training(tmp_path, registered, caplog):
    jpeg, png = _truncated(tmp_path, "cut.jpg"), _truncated(tmp_path, "cut.png")
    # Complete files with data after the end marker (zero padding, an appended trailer) pass.
    padded, trailer = _image(tmp_path, "padded.png"), _image(tmp_path, "trailer.jpg")
    with open(padded, "ab") as f:
        f.write(bytes(100))
    with open(trailer, "ab") as f:
        f.write(b"trailer data")
    good = [_image(tmp_path, f"{i}.jpg", seed=i) for i in range(2)]
    paths = [good[0], jpeg, padded, png, trailer, good[1]]
    name = registered("inputs_truncated", [box_record(p) for p in paths])
    cfg = check_cfg(name)
    with pytest.raises(ValueError) as exc:
        IONTrainer.build_train_loader(cfg)
    message = str(exc.value)
    assert "2 image files that cannot be read as 8-bit images" in message
    assert f"{jpeg} (file_name: truncated or corrupt: image file is truncated" in message
    assert f"{png} (file_name: truncated or corrupt: image file is truncated" in message
    assert padded not in message and trailer not in message
    assert f"{SKIP_KEY} True" in message

    cfg.DATALOADER.ION_SKIP_UNREADABLE_IMAGES = True
    with caplog.at_level(logging.WARNING, logger="ion_d2.data.dataset_check"):
        loader = IONTrainer.build_train_loader(cfg)
    assert (
        f"left out 2 images whose files cannot be read as 8-bit images ({SKIP_KEY} True): {jpeg} "
        "(file_name: truncated or corrupt: image file is truncated" in caplog.text
    )
    assert jpeg in caplog.text and png in caplog.text
    assert [d["file_name"] for d in loader.dataset] == [good[0], padded, trailer, good[1]]


def _batches(cfg, dicts, count, start_iter=0):
    loader = build_ion_train_loader(cfg, IONDatasetMapper(cfg, True), dicts)
    loader.set_start_iter(start_iter)
    batches = iter(loader)
    return [next(batches) for _ in range(count)]


def test_an_image_that_fails_to_decode_in_training_is_named_or_replaced(tmp_path, caplog):
    # Not through the up-front check: a file truncated after it, or a corruption it misses.
    paths = [_image(tmp_path, f"{i}.jpg", seed=i) for i in range(4)]
    paths.insert(2, _truncated(tmp_path, "cut.jpg"))
    dicts = [box_record(p) for p in paths]
    cfg = check_cfg("unused")
    cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.ASPECT_RATIO_GROUPING = 5, False
    with pytest.raises(OSError, match=f"{paths[2]} cannot be read: image file is truncated"):
        _batches(cfg, dicts, 1)

    cfg.DATALOADER.ION_SKIP_UNREADABLE_IMAGES = True
    with caplog.at_level(logging.WARNING, logger="ion_d2.data.loader"):
        first = _batches(cfg, dicts, 2)
    assert f"{paths[2]} cannot be read: image file is truncated" in caplog.text
    assert f"next readable image in its place from now on ({SKIP_KEY} True)" in caplog.text
    # Each batch keeps its five slots; the cut image's slot holds the image after it.
    for batch in first:
        names = [d["file_name"] for d in batch]
        assert sorted(names) == sorted(paths[:2] + paths[3:] + [paths[3]])
    # The same batches again, and from a resumed position.
    again = _batches(cfg, dicts, 2)
    resumed = _batches(cfg, dicts, 1, start_iter=1)
    for batch, other in zip(first + first[1:], again + resumed):
        for a, b in zip(batch, other):
            assert a["file_name"] == b["file_name"]
            assert torch.equal(a["image"], b["image"])


def test_coco_json_whose_images_share_an_id_is_refused(tmp_path, registered):
    # pycocotools keeps the last image of an id and gives it both images' boxes.
    images, annotations = [], []
    for i, image_id in enumerate([1, 1, 2, 3, 3]):
        _image(tmp_path, f"{i}.png", seed=i)
        images.append({"id": image_id, "file_name": f"{i}.png", "height": 48, "width": 64})
        annotations.append(
            {
                "id": i,
                "image_id": image_id,
                "category_id": 1,
                "bbox": [2 + i, 3, 8, 9],
                "area": 72,
                "iscrowd": 0,
            }
        )
    categories = [{"id": 1, "name": "c"}]
    json_file = str(tmp_path / "ann.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    register_coco_instances("inputs_dup_ids", {}, json_file, str(tmp_path))
    train = registered("inputs_dup_train", [box_record(_image(tmp_path, "ok.png"))])
    try:
        assert len(DatasetCatalog.get("inputs_dup_ids")) == 3  # two images lost
        with pytest.raises(ValueError) as exc:
            IONTrainer.build_train_loader(check_cfg("inputs_dup_ids"))
        with pytest.raises(ValueError) as test_exc:
            IONTrainer.build_train_loader(check_cfg(train, ["inputs_dup_ids"]))
    finally:
        DatasetCatalog.remove("inputs_dup_ids")
        MetadataCatalog.remove("inputs_dup_ids")
    message = str(exc.value)
    assert "DATASETS.TRAIN ('inputs_dup_ids',) (3 images)" in message
    assert (
        f"2 image ids shared by several images in {json_file}: id 1 (0.png, 1.png); "
        "id 3 (3.png, 4.png). Give each image its own id" in message
    )
    assert "DATASETS.TEST 'inputs_dup_ids'" in str(test_exc.value)
    assert "id 1 (0.png, 1.png)" in str(test_exc.value)


def test_boxes_wholly_outside_their_image_are_counted_and_refused_above_the_fraction(
    tmp_path, registered, caplog
):
    path = _image(tmp_path, "img.png")
    # Partly outside (clipped, trained on) in every image: not counted.
    records = [box_record(path, [(1, 1, 20, 20), (50, 40, 30, 20)]) for _ in range(10)]
    records[0]["annotations"] += box_record(path, [(70, 10, 5, 5)])["annotations"]
    records.append(box_record(path, [(2, 2, 20, 20), (-10, 5, 0, 9)], mode=BoxMode.XYXY_ABS))
    name = registered("inputs_outside", records)
    cfg = check_cfg(name)
    offenders = (
        f"{path} (bbox [70.0, 10.0, 5.0, 5.0] in a 48x64 HxW image); "
        f"{path} (bbox [-10.0, 5.0, 0.0, 9.0] in a 48x64 HxW image)."
    )
    with pytest.raises(ValueError) as exc:
        IONTrainer.build_train_loader(cfg)
    message = str(exc.value)
    assert (
        "2 boxes lie wholly outside their image (8.7% of 23; "
        "DATALOADER.ION_MAX_OUTSIDE_BOX_FRACTION is 0.01): " + offenders in message
    )
    assert "or raise DATALOADER.ION_MAX_OUTSIDE_BOX_FRACTION to accept them." in message

    cfg.DATALOADER.ION_MAX_OUTSIDE_BOX_FRACTION = 0.1
    with caplog.at_level(logging.WARNING, logger="ion_d2.data.dataset_check"):
        loader = IONTrainer.build_train_loader(cfg)
    assert (
        "DATASETS.TRAIN ('inputs_outside',): 2 boxes lie wholly outside their image (8.7% of "
        "23; DATALOADER.ION_MAX_OUTSIDE_BOX_FRACTION is 0.1): " + offenders in caplog.text
    )
    assert "drops the empty ones: not trained on." in caplog.text
    assert len(loader.dataset) == 11
