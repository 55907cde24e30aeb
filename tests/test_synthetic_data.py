"""The bundled synthetic dataset (ion_d2.data.synthetic): determinism, COCO validity, label maps,
the context rules, the size distribution and lazy registration."""

import contextlib
import io
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ion_d2.data.synthetic import generate_synthetic_dataset, register_ion_synthetic, render
from ion_d2.data.synthetic.glyphs import render_glyph
from ion_d2.data.synthetic.meta import (
    CLASS_GLYPHS,
    CONTEXT_MARGIN,
    CONTEXT_MIN_VISIBLE,
    IGNORE_LABEL,
    IMAGE_SIZE_RANGE,
    MAX_OCCLUDED_FRACTION,
    MOON_ID,
    MOON_MIN_GAP,
    ROAD_ID,
    SEM_SEG_CLASSES,
    THING_CLASSES,
    WATER_ID,
)

NUM_IMAGES = 8
SEED = 0


def _split_files(root, split="train"):
    base = os.path.join(str(root), "ion_synth")
    return (
        os.path.join(base, "annotations", f"instances_{split}.json"),
        os.path.join(base, split, "images"),
        os.path.join(base, split, "sem_seg"),
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One 8-image slice: its json, loaded COCO dict, images and label maps by image id."""
    root = tmp_path_factory.mktemp("synth_a")
    json_file = generate_synthetic_dataset(
        str(root), split="train", num_images=NUM_IMAGES, seed=SEED
    )
    _, image_root, sem_root = _split_files(root)
    with open(json_file) as f:
        coco = json.load(f)
    images, labels = {}, {}
    for im in coco["images"]:
        images[im["id"]] = np.asarray(Image.open(os.path.join(image_root, im["file_name"])))
        labels[im["id"]] = np.asarray(Image.open(os.path.join(sem_root, im["file_name"])))
    return {
        "root": root,
        "json_file": json_file,
        "coco": coco,
        "images": images,
        "labels": labels,
    }


def _decode(ann):
    return mask_util.decode(ann["segmentation"]).astype(bool)


def _ring(array, bbox, margin):
    """Pixels of `array` within `margin` of the box but outside it."""
    x, y, w, h = bbox
    y0, x0 = max(0, y - margin), max(0, x - margin)
    window = array[y0 : y + h + margin, x0 : x + w + margin]
    inside = np.zeros(window.shape[:2], dtype=bool)
    inside[y - y0 : y - y0 + h, x - x0 : x - x0 + w] = True
    return window[~inside]


def test_same_seed_is_identical_and_other_seed_differs(dataset, tmp_path):
    json_a, _, sem_a = _split_files(dataset["root"])
    json_b = generate_synthetic_dataset(
        str(tmp_path / "b"), split="train", num_images=NUM_IMAGES, seed=SEED
    )
    json_c = generate_synthetic_dataset(
        str(tmp_path / "c"), split="train", num_images=NUM_IMAGES, seed=SEED + 1
    )
    _, _, sem_b = _split_files(tmp_path / "b")
    _, _, sem_c = _split_files(tmp_path / "c")
    with open(json_a, "rb") as fa, open(json_b, "rb") as fb, open(json_c, "rb") as fc:
        bytes_a, bytes_b, bytes_c = fa.read(), fb.read(), fc.read()
    assert bytes_a == bytes_b
    assert bytes_a != bytes_c
    names = sorted(os.listdir(sem_a))
    assert len(names) == NUM_IMAGES and names == sorted(os.listdir(sem_b))
    num_different = 0
    for name in names:
        label_a = np.asarray(Image.open(os.path.join(sem_a, name)))
        label_b = np.asarray(Image.open(os.path.join(sem_b, name)))
        np.testing.assert_array_equal(label_a, label_b)
        label_c = np.asarray(Image.open(os.path.join(sem_c, name)))
        num_different += label_a.shape != label_c.shape or not np.array_equal(label_a, label_c)
    assert num_different == NUM_IMAGES
    # Another split name with the same seed draws other images.
    json_d = generate_synthetic_dataset(
        str(tmp_path / "b"), split="val", num_images=NUM_IMAGES, seed=SEED
    )
    with open(json_d, "rb") as f:
        assert f.read() != bytes_a


def test_complete_split_is_skipped_and_resized_split_is_regenerated(tmp_path, monkeypatch):
    root = str(tmp_path)
    json_file = generate_synthetic_dataset(root, split="train", num_images=5, seed=SEED)
    _, image_root, sem_root = _split_files(root)

    def fail(*args, **kwargs):
        raise AssertionError("a complete split was drawn again")

    with monkeypatch.context() as m:
        m.setattr(render, "render_sample", fail)
        assert generate_synthetic_dataset(root, split="train", num_images=5, seed=SEED) == (
            json_file
        )
        with pytest.raises(AssertionError, match="drawn again"):
            generate_synthetic_dataset(root, split="train", num_images=5, seed=SEED + 1)

    generate_synthetic_dataset(root, split="train", num_images=3, seed=SEED)
    with open(json_file) as f:
        assert len(json.load(f)["images"]) == 3
    assert sorted(os.listdir(image_root)) == ["000000.png", "000001.png", "000002.png"]
    assert sorted(os.listdir(sem_root)) == ["000000.png", "000001.png", "000002.png"]


def test_json_loads_with_detectron2_and_boxes_lie_inside_images(dataset):
    _, image_root, _ = _split_files(dataset["root"])
    dicts = load_coco_json(dataset["json_file"], image_root)
    assert len(dicts) == NUM_IMAGES
    assert sum(len(d["annotations"]) for d in dicts) == len(dataset["coco"]["annotations"]) > 0
    for d in dicts:
        lo, hi = IMAGE_SIZE_RANGE
        assert lo <= d["height"] <= hi and lo <= d["width"] <= hi
        assert dataset["images"][d["image_id"]].shape == (d["height"], d["width"], 3)
        for ann in d["annotations"]:
            x, y, w, h = ann["bbox"]
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS and ann["iscrowd"] == 0
            assert 1 <= ann["category_id"] <= len(THING_CLASSES)
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= d["width"] and y + h <= d["height"]
    categories = dataset["coco"]["categories"]
    assert [(c["id"], c["name"]) for c in categories] == list(enumerate(THING_CLASSES, start=1))


def test_ground_truth_as_detections_scores_ap_one(dataset):
    # The json is complete enough for COCO's evaluation (areas, iscrowd, ids).
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(dataset["json_file"])
        results = [
            {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"]}
            for a in dataset["coco"]["annotations"]
        ]
        for r in results:
            r["score"] = 1.0
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)


def test_label_maps_match_annotations(dataset):
    by_image = {}
    for ann in dataset["coco"]["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    allowed = set(range(len(SEM_SEG_CLASSES))) | {IGNORE_LABEL}
    for image_id, label in dataset["labels"].items():
        assert label.dtype == np.uint8 and label.ndim == 2
        assert set(np.unique(label).tolist()) <= allowed
        assert {ROAD_ID, WATER_ID} & set(np.unique(label).tolist())
        owner = np.zeros(label.shape, dtype=np.int64)
        for ann in by_image.get(image_id, []):
            mask = _decode(ann)
            x, y, w, h = ann["bbox"]
            assert ann["area"] == mask.sum() > 0
            # The box is the whole object's; the visible mask lies inside it.
            ys, xs = np.nonzero(mask)
            assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h
            assert np.all(label[mask] == ann["category_id"])
            owner[mask] += 1
        assert owner.max() <= 1  # visible masks never overlap
        # Every thing-labelled pixel belongs to an instance.
        is_thing = (label >= 1) & (label <= len(THING_CLASSES))
        np.testing.assert_array_equal(is_thing, owner == 1)


def test_context_pairs_are_identical_inside_the_box_and_differ_outside(dataset):
    """Unoccluded car/boat (lamp/ball) boxes hold exactly the shared glyph's pixels; only the
    region around the box (the moon elsewhere in the image) tells the classes apart."""
    assert CLASS_GLYPHS["car"] == CLASS_GLYPHS["boat"] and CLASS_GLYPHS["lamp"] == "orb"
    assert CLASS_GLYPHS["ball"] == "orb"
    checked = {name: 0 for name in ("car", "boat", "lamp", "ball")}
    for ann in dataset["coco"]["annotations"]:
        name = THING_CLASSES[ann["category_id"] - 1]
        if name not in checked:
            continue
        x, y, w, h = ann["bbox"]
        image = dataset["images"][ann["image_id"]]
        label = dataset["labels"][ann["image_id"]]
        # Tiles fill their box: the mask area is the box area unless occluded.
        assert ann["area"] >= (1 - MAX_OCCLUDED_FRACTION) * w * h
        if name in ("car", "boat"):
            ring_labels = _ring(label, ann["bbox"], CONTEXT_MARGIN)
            regions = ring_labels[np.isin(ring_labels, [ROAD_ID, WATER_ID])]
            expected = ROAD_ID if name == "car" else WATER_ID
            # Only the right region shows around the box, and over most of its surroundings.
            assert np.all(regions == expected)
            assert regions.size >= CONTEXT_MIN_VISIBLE * ring_labels.size
        else:
            moon = np.argwhere(label == MOON_ID)
            assert (moon.size > 0) == (name == "lamp")
            if name == "lamp":
                # Box-to-moon distance, in pixels.
                dy = np.maximum(0, np.maximum(y - moon[:, 0] - 1, moon[:, 0] - (y + h - 1)))
                dx = np.maximum(0, np.maximum(x - moon[:, 1] - 1, moon[:, 1] - (x + w - 1)))
                assert np.hypot(dx, dy).min() >= MOON_MIN_GAP - 1
        if ann["area"] < w * h:
            continue  # occluded: the crop holds parts of other objects
        crop = image[y : y + h, x : x + w]
        rgb, mask = render_glyph(CLASS_GLYPHS[name], w, h)
        assert mask.all()
        np.testing.assert_array_equal(crop, rgb)
        checked[name] += 1
    assert all(n > 0 for n in checked.values()), checked

    # Around a car it is grey road, around a boat blue water (checked on the pixels too).
    for ann in dataset["coco"]["annotations"]:
        name = THING_CLASSES[ann["category_id"] - 1]
        if name in ("car", "boat"):
            label = dataset["labels"][ann["image_id"]]
            ring_labels = _ring(label, ann["bbox"], CONTEXT_MARGIN)
            ring_rgb = _ring(dataset["images"][ann["image_id"]], ann["bbox"], CONTEXT_MARGIN)
            region = ring_rgb[np.isin(ring_labels, [ROAD_ID, WATER_ID])].astype(float)
            blue_minus_red = (region[:, 2] - region[:, 0]).mean()
            assert blue_minus_red > 60 if name == "boat" else abs(blue_minus_red) < 25


def test_render_glyph_depends_on_glyph_and_size_only():
    vehicle, vehicle_mask = render_glyph("vehicle", 30, 16)
    again, _ = render_glyph("vehicle", 30, 16)
    np.testing.assert_array_equal(vehicle, again)
    assert vehicle.shape == (16, 30, 3) and vehicle_mask.all()
    orb, _ = render_glyph("orb", 30, 30)
    sign, sign_mask = render_glyph("sign", 30, 30)
    ring, ring_mask = render_glyph("ring", 30, 30)
    assert not np.array_equal(orb, sign) and not np.array_equal(sign, ring)
    # Sign and ring let the scene show through; their masks still span the whole box.
    assert not sign_mask.all() and 0.5 < ring_mask.mean() < 0.6
    for mask in (sign_mask, ring_mask):
        assert mask.any(0).all() and mask.any(1).all()
    with pytest.raises(ValueError, match="'boat'.*vehicle"):
        render_glyph("boat", 10, 10)


def test_objects_are_mostly_small_some_medium_some_occluded(dataset):
    anns = dataset["coco"]["annotations"]
    areas = np.array([a["area"] for a in anns])
    small = areas < 32 * 32
    medium = (areas >= 32 * 32) & (areas < 96 * 96)
    assert len(anns) >= 4 * NUM_IMAGES
    assert small.mean() >= 0.35
    assert medium.sum() >= 3
    # Partial occlusion: some tile glyphs lose pixels, none more than the cap.
    tiles = [a for a in anns if CLASS_GLYPHS[THING_CLASSES[a["category_id"] - 1]] == "vehicle"]
    visible = np.array([a["area"] / (a["bbox"][2] * a["bbox"][3]) for a in tiles])
    assert (visible < 1).any()
    assert visible.min() >= 1 - MAX_OCCLUDED_FRACTION
    # Clutter: pixels labelled background exist besides road, water, moon and things.
    assert sum(int((label == 0).sum()) for label in dataset["labels"].values()) > 0


def test_invalid_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="split='../x'"):
        generate_synthetic_dataset(str(tmp_path), split="../x", num_images=2, seed=0)
    with pytest.raises(ValueError, match="num_images=0"):
        generate_synthetic_dataset(str(tmp_path), split="train", num_images=0, seed=0)
    with pytest.raises(ValueError, match="seed=-1"):
        generate_synthetic_dataset(str(tmp_path), split="train", num_images=2, seed=-1)


@pytest.fixture
def registered_names():
    """Names registered during a test; removed from both catalogs afterwards."""
    names = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def test_register_is_lazy_and_loads_dicts_with_sem_seg(tmp_path, registered_names):
    root = str(tmp_path)
    registered_names += ["ion_synth_test_train", "ion_synth_test_val"]
    names = register_ion_synthetic(
        root, num_train=4, num_val=2, seed=SEED, name_prefix="ion_synth_test"
    )
    assert names == ("ion_synth_test_train", "ion_synth_test_val")
    assert not os.path.exists(os.path.join(root, "ion_synth"))  # nothing drawn yet

    for name, num in zip(names, (4, 2)):
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == list(THING_CLASSES)
        assert meta.stuff_classes == list(SEM_SEG_CLASSES)
        assert meta.num_sem_seg_classes == len(SEM_SEG_CLASSES) == 10
        assert meta.context_classes == ["car", "boat", "lamp", "ball"]
        assert meta.evaluator_type == "coco" and meta.ignore_label == 255
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == num
        assert os.path.isfile(meta.json_file)
        assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(6)}
        for d in dicts:
            assert os.path.isfile(d["file_name"]) and os.path.isfile(d["sem_seg_file_name"])
            assert d["file_name"].startswith(meta.image_root)
            label = np.asarray(Image.open(d["sem_seg_file_name"]))
            assert label.shape == (d["height"], d["width"])
            assert all(0 <= a["category_id"] < len(THING_CLASSES) for a in d["annotations"])

    # detectron2's DatasetMapper reads the dicts, label maps included.
    cfg = get_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (160,)
    cfg.INPUT.MAX_SIZE_TRAIN = 320
    cfg.INPUT.RANDOM_FLIP = "none"
    record = DatasetCatalog.get(names[0])[0]
    mapped = DatasetMapper(cfg, is_train=True)(record)
    assert mapped["sem_seg"].shape == mapped["image"].shape[1:]
    assert set(mapped["sem_seg"].unique().tolist()) <= set(range(len(SEM_SEG_CLASSES)))
    assert len(mapped["instances"]) == len(record["annotations"]) > 0

    # The same arguments again: a no-op. Other arguments: a clear error.
    assert register_ion_synthetic(root, num_train=4, num_val=2, name_prefix="ion_synth_test") == (
        names
    )
    with pytest.raises(ValueError, match="'ion_synth_test_train' is already registered"):
        register_ion_synthetic(root, num_train=5, num_val=2, name_prefix="ion_synth_test")


def test_register_defaults_to_detectron2_datasets_root(tmp_path, monkeypatch, registered_names):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    registered_names += ["ion_synth_env_train", "ion_synth_env_val"]
    register_ion_synthetic(num_train=2, num_val=2, seed=1, name_prefix="ion_synth_env")
    meta = MetadataCatalog.get("ion_synth_env_val")
    assert meta.json_file == os.path.join(
        str(tmp_path), "ion_synth", "annotations", "instances_val_n2_seed1.json"
    )
    # A name registered by something else is not taken over, and the error leaves no half
    # registration behind.
    registered_names += ["ion_synth_other_train", "ion_synth_other_val"]
    DatasetCatalog.register("ion_synth_other_val", lambda: [])
    with pytest.raises(ValueError, match="'ion_synth_other_val'.*something other than ion_d2"):
        register_ion_synthetic(num_train=2, num_val=2, name_prefix="ion_synth_other")
    assert "ion_synth_other_train" not in DatasetCatalog.list()
