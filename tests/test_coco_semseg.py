import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from detectron2.data import DatasetMapper
from detectron2.data.detection_utils import read_image
from PIL import Image
from pycocotools import mask as mask_util

from ion_d2.data.coco_semseg import attach_sem_seg_files, coco_to_semseg_labels

REPO = Path(__file__).resolve().parents[1]
H, W = 20, 30

# Category ids are neither contiguous nor sorted: labels follow sorted ids 3, 7, 12 -> 1, 2, 3.
CATEGORIES = [{"id": 12, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
LABEL = {3: 1, 7: 2, 12: 3}

# Axis-aligned L shape: no edge passes through a pixel centre, so rasterisation is exact.
L_SHAPE = [2.2, 1.3, 14.3, 1.3, 14.3, 6.6, 8.4, 6.6, 8.4, 15.6, 2.2, 15.6]
# A small triangle overlapping the L, with slanted edges.
TRIANGLE = [3.1, 2.3, 13.7, 4.4, 5.3, 14.2]


def polygon_mask(poly, height, width):
    """Even-odd point-in-polygon test at pixel centres (pixel (r, c) covers [c, c+1) x [r, r+1)),
    which is pycocotools' convention."""
    xs, ys = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    inside = np.zeros((height, width), dtype=bool)
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
        crosses = (y0 > ys) != (y1 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xs < x_cross)
    return inside


def distance_to_boundary(poly, height, width):
    xs, ys = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    dist = np.full((height, width), np.inf)
    for a, b in zip(pts, np.roll(pts, -1, axis=0)):
        d = b - a
        t = np.clip(((xs - a[0]) * d[0] + (ys - a[1]) * d[1]) / (d @ d), 0, 1)
        dist = np.minimum(dist, np.hypot(xs - a[0] - t * d[0], ys - a[1] - t * d[1]))
    return dist


def uncompressed_rle(mask):
    """COCO's uncompressed RLE: run lengths of the column-major mask, starting with zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def masks():
    rows, cols = np.mgrid[0:H, 0:W]
    ellipse = ((rows - 10) / 7.0) ** 2 + ((cols - 23) / 5.0) ** 2 <= 1
    crowd = np.zeros((H, W), dtype=bool)
    crowd[12:20, 18:30] = True
    square = np.zeros((H, W), dtype=bool)
    square[16:19, 1:5] = True
    in_crowd = np.zeros((H, W), dtype=bool)
    in_crowd[14:16, 25:28] = True
    return ellipse, crowd, square, in_crowd


def annotation(ann_id, category_id, segmentation, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": 1,
        "category_id": category_id,
        "iscrowd": iscrowd,
        "segmentation": segmentation,
    }


def write_coco(tmp_path):
    ellipse, crowd, square, in_crowd = masks()
    compressed = mask_util.encode(np.asfortranarray(square.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode("ascii")
    annotations = [
        # The triangle comes before the larger L: drawing in json order would bury it.
        annotation(1, 3, [TRIANGLE]),
        annotation(2, 7, [L_SHAPE]),
        annotation(3, 3, compressed),
        annotation(4, 3, uncompressed_rle(in_crowd)),
        annotation(5, 3, uncompressed_rle(crowd), iscrowd=1),
        annotation(6, 12, uncompressed_rle(ellipse)),
        # Degenerate polygon (2 points): skipped.
        annotation(7, 7, [[1, 2, 3, 4]]),
    ]
    dataset = {
        "images": [
            {"id": 1, "file_name": "a/img1.jpg", "height": H, "width": W},
            {"id": 2, "file_name": "b/img2.png", "height": 10, "width": 12},
        ],
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps(dataset))
    return json_file, dataset


def read_png(path):
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.array(img)


def test_labels_pixelwise(tmp_path):
    json_file, _ = write_coco(tmp_path)
    out_dir = tmp_path / "labels"
    stats = coco_to_semseg_labels(str(json_file), str(out_dir))
    assert stats == {
        "images": 2,
        "categories": 3,
        "instances": 5,
        "crowd_instances": 1,
        "skipped_instances": 1,
    }
    assert sorted(os.listdir(out_dir)) == ["img1.png", "img2.png"]

    ellipse, crowd, square, in_crowd = masks()
    l_shape = polygon_mask(L_SHAPE, H, W)
    triangle = polygon_mask(TRIANGLE, H, W)
    # Overlaps exist, and the areas fix the drawing order the expected map uses below.
    assert (ellipse & crowd).any() and (l_shape & triangle).any() and (crowd & in_crowd).any()
    assert ellipse.sum() > crowd.sum() > triangle.sum() > square.sum() > in_crowd.sum()

    below = np.zeros((H, W), dtype=np.uint8)
    below[ellipse] = LABEL[12]
    below[l_shape] = LABEL[7]
    below[crowd] = 255
    expected = below.copy()
    expected[triangle] = LABEL[3]
    expected[square] = LABEL[3]
    expected[in_crowd] = LABEL[3]

    labels = read_png(out_dir / "img1.png")
    assert labels.shape == (H, W) and labels.dtype == np.uint8
    # pycocotools rasterises polygons on a 5x finer grid, so a pixel whose centre lies within
    # ~1/5 px of a slanted edge can fall on either side (<= 0.17 px over 200 random triangles);
    # only those pixels of the triangle may show what lies below it.
    near_edge = distance_to_boundary(TRIANGLE, H, W) < 0.25
    exact = ~near_edge
    np.testing.assert_array_equal(labels[exact], expected[exact])
    assert np.isin(labels[near_edge], [expected[near_edge], below[near_edge]]).all()
    assert (triangle & exact).sum() >= 0.75 * triangle.sum()
    # The L's axis-aligned edges are exact, and the L label survives only outside the triangle.
    assert ((labels == LABEL[7]) == (l_shape & (labels != LABEL[3]))).all()

    np.testing.assert_array_equal(read_png(out_dir / "img2.png"), np.zeros((10, 12), np.uint8))
    # What DatasetMapper reads.
    np.testing.assert_array_equal(read_image(str(out_dir / "img1.png"), "L")[..., 0], labels)


def test_bad_inputs_raise(tmp_path):
    json_file, dataset = write_coco(tmp_path)

    bad = json.loads(json.dumps(dataset))
    bad["annotations"][5]["segmentation"]["size"] = [H + 1, W]
    (tmp_path / "bad_size.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"RLE size \[21, 30\].*\[20, 30\]"):
        coco_to_semseg_labels(str(tmp_path / "bad_size.json"), str(tmp_path / "out"))

    bad = json.loads(json.dumps(dataset))
    bad["annotations"][0]["category_id"] = 99
    (tmp_path / "bad_cat.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"category_id 99.*\[3, 7, 12\]"):
        coco_to_semseg_labels(str(tmp_path / "bad_cat.json"), str(tmp_path / "out"))

    bad = json.loads(json.dumps(dataset))
    bad["images"][1]["file_name"] = "other/img1.png"
    (tmp_path / "bad_names.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="'img1.png'"):
        coco_to_semseg_labels(str(tmp_path / "bad_names.json"), str(tmp_path / "out"))


def test_attach_sem_seg_files(tmp_path):
    json_file, _ = write_coco(tmp_path)
    out_dir = tmp_path / "labels"
    coco_to_semseg_labels(str(json_file), str(out_dir))

    image_root = tmp_path / "images"
    (image_root / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(image_root / "a" / "img1.jpg")
    dicts = [
        {"file_name": str(image_root / "a" / "img1.jpg"), "height": H, "width": W, "image_id": 1},
        {"file_name": str(image_root / "b" / "img2.png"), "height": 10, "width": 12, "image_id": 2},
        {"file_name": str(image_root / "c" / "img3.jpg"), "height": 8, "width": 8, "image_id": 3},
    ]
    result = attach_sem_seg_files(dicts, str(out_dir))
    assert result is dicts
    assert dicts[0]["sem_seg_file_name"] == os.path.join(str(out_dir), "img1.png")
    assert dicts[1]["sem_seg_file_name"] == os.path.join(str(out_dir), "img2.png")
    assert "sem_seg_file_name" not in dicts[2]

    # DatasetMapper turns the attached file into the "sem_seg" tensor the model receives.
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="BGR")
    mapped = mapper(dicts[0])
    np.testing.assert_array_equal(mapped["sem_seg"].numpy(), read_png(out_dir / "img1.png"))

    missing = [{"file_name": "x/img1.jpg"}]
    attach_sem_seg_files(missing, str(tmp_path / "does_not_exist"))
    assert "sem_seg_file_name" not in missing[0]


def test_cli(tmp_path):
    json_file, _ = write_coco(tmp_path)
    out_dir = tmp_path / "cli_labels"
    cmd = [sys.executable, str(REPO / "tools" / "coco_to_semseg.py"), "--json", str(json_file)]
    cmd += ["--output-dir", str(out_dir)]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "'images': 2" in result.stdout  # setup_logger's handler writes to stdout
    assert sorted(os.listdir(out_dir)) == ["img1.png", "img2.png"]
    np.testing.assert_array_equal(read_png(out_dir / "img2.png"), np.zeros((10, 12), np.uint8))
