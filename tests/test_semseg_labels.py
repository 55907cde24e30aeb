"""Segmentation labels for the VOC / COCO presets: tools/voc_to_semseg.py on a tiny fake SBD and
VOC2012, the ``*_ionseg`` datasets, the trainer's check and a training step whose segmentation
loss is no longer 0."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_pascal_voc
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.pascal_voc import CLASS_NAMES
from detectron2.data.detection_utils import read_image
from model_utils import load_cfg, load_script
from PIL import Image
from test_voc_coco_training import _write_voc

from ion_d2.data import coco_to_semseg_labels, register_all_ionseg
from ion_d2.data.voc_semseg import VOC_SEGMENTATION_CLASSES
from ion_d2.engine import IONTrainer

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "voc_to_semseg.py"
TINY = REPO / "configs" / "ION_VGG16_tiny_cpu.yaml"
H, W = 96, 128  # the size of _write_voc's images
IONSEG_NAMES = [n for n in DatasetCatalog.list() if n.endswith("_ionseg")]


def _load_tool():
    return load_script("tools/voc_to_semseg.py")


tool = _load_tool()


@pytest.fixture(autouse=True)
def _ion_d2_logs_reach_caplog(monkeypatch):
    # detectron2's setup_logger(name="ion_d2"), if a test in this process called it, stops
    # propagation to the root logger, where caplog listens.
    monkeypatch.setattr(logging.getLogger("ion_d2"), "propagate", True)


def _src(name: str) -> int:
    """Index of a class in SBD's and VOC's label files."""
    return VOC_SEGMENTATION_CLASSES.index(name) + 1


def _out(name: str) -> int:
    """Label of a class in the converted PNGs: 1 + its index in Detectron2's CLASS_NAMES."""
    return CLASS_NAMES.index(name) + 1


def _voc_palette():
    # The devkit's colour map (VOClabelcolormap.m).
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_voc_png(path, indices):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette(_voc_palette())
    image.save(path)


def write_sbd_mat(path, segmentation):
    """SBD's dataset/cls/<id>.mat: a 1x1 struct GTcls with Boundaries (20x1 cell of sparse
    maps), Segmentation (uint8) and CategoriesPresent."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    boundaries = np.empty((20, 1), dtype=object)
    for i in range(20):
        boundaries[i, 0] = scipy.sparse.csc_matrix(segmentation.shape, dtype=bool)
    present = np.array([v for v in np.unique(segmentation) if v > 0], dtype=np.uint8)
    gtcls = {
        "Boundaries": boundaries,
        "Segmentation": segmentation.astype(np.uint8),
        "CategoriesPresent": present.reshape(-1, 1),
    }
    scipy.io.savemat(path, {"GTcls": gtcls})


def sbd_labels(seed):
    rng = np.random.RandomState(seed)
    seg = np.zeros((H, W), np.uint8)
    seg[10:50, 20:70] = _src("person")
    seg[60:90, 80:120] = _src("cat")
    seg[rng.randint(0, H, 30), rng.randint(0, W, 30)] = _src("tvmonitor")
    return seg


def voc_labels(seed):
    seg = sbd_labels(seed + 100)
    seg[5:40, 5:40] = _src("aeroplane")
    seg[4, 4:41] = seg[40, 4:41] = 255  # the void border
    return seg


def expected(source):
    out = np.zeros_like(source)
    for name in VOC_SEGMENTATION_CLASSES:
        out[source == _src(name)] = _out(name)
    out[source == 255] = 255
    return out


def read_png(path):
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.array(image)


@pytest.fixture
def sources(tmp_path):
    """A datasets root with a fake SBD and VOC2012 SegmentationClass:
    SBD labels 2007_000001 and 2008_000005, VOC2012 labels 2007_000001 (it wins) and
    2007_000003."""
    root = tmp_path / "datasets"
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    labels = {
        "sbd_2007_000001": sbd_labels(1),
        "sbd_2008_000005": sbd_labels(5),
        "voc_2007_000001": voc_labels(1),
        "voc_2007_000003": voc_labels(3),
    }
    for key, seg in labels.items():
        source, image_id = key.split("_", 1)
        if source == "sbd":
            write_sbd_mat(str(sbd / "cls" / f"{image_id}.mat"), seg)
        else:
            write_voc_png(str(root / "VOC2012" / "SegmentationClass" / f"{image_id}.png"), seg)
    return root, sbd, labels


def test_class_orders_agree():
    assert VOC_SEGMENTATION_CLASSES == tuple(CLASS_NAMES)


def test_converts_sbd_and_voc2012_pixel_for_pixel(sources, caplog):
    root, sbd, labels = sources
    with caplog.at_level(logging.INFO, logger="ion_d2"):
        assert tool.main(["--root", str(root), "--sbd", str(sbd)]) == 0

    out07 = root / "VOC2007" / "ION_SegmentationLabels"
    out12 = root / "VOC2012" / "ION_SegmentationLabels"
    assert sorted(os.listdir(out07)) == ["000001.png", "000003.png"]
    assert sorted(os.listdir(out12)) == ["2008_000005.png"]
    # VOC2012's labels win over SBD's for 2007_000001, void border included.
    np.testing.assert_array_equal(
        read_png(out07 / "000001.png"), expected(labels["voc_2007_000001"])
    )
    assert (read_png(out07 / "000001.png") == 255).sum() == 2 * 37
    np.testing.assert_array_equal(
        read_png(out07 / "000003.png"), expected(labels["voc_2007_000003"])
    )
    np.testing.assert_array_equal(
        read_png(out12 / "2008_000005.png"), expected(labels["sbd_2008_000005"])
    )
    # As DatasetMapper reads it.
    np.testing.assert_array_equal(
        read_image(str(out12 / "2008_000005.png"), "L")[:, :, 0],
        expected(labels["sbd_2008_000005"]),
    )
    assert "Wrote 3, replaced 0" in caplog.text


def test_resumes_and_replaces_sbd_labels_with_voc2012(sources, caplog):
    root, sbd, labels = sources
    voc_seg = root / "VOC2012" / "SegmentationClass"
    hidden = root / "VOC2012" / "hidden"
    voc_seg.rename(hidden)  # first run: SBD only
    assert tool.main(["--root", str(root), "--sbd", str(sbd)]) == 0
    out = root / "VOC2007" / "ION_SegmentationLabels" / "000001.png"
    np.testing.assert_array_equal(read_png(out), expected(labels["sbd_2007_000001"]))

    hidden.rename(voc_seg)  # VOC2012 now labels 2007_000001 too: its labels replace SBD's
    with caplog.at_level(logging.INFO, logger="ion_d2"):
        assert tool.main(["--root", str(root), "--sbd", str(sbd)]) == 0
    assert "Wrote 1, replaced 1 (SBD -> VOC2012 labels), skipped 1" in caplog.text
    np.testing.assert_array_equal(read_png(out), expected(labels["voc_2007_000001"]))

    written = sorted(root.glob("VOC20*/ION_SegmentationLabels/*.png"))
    mtimes = [p.stat().st_mtime_ns for p in written]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ion_d2"):
        assert tool.main(["--root", str(root), "--sbd", str(sbd)]) == 0
    assert "Wrote 0, replaced 0 (SBD -> VOC2012 labels), skipped 3" in caplog.text
    assert [p.stat().st_mtime_ns for p in written] == mtimes

    voc_seg.rename(hidden)  # SBD alone again: VOC2012's labels already written are kept
    assert tool.main(["--root", str(root), "--sbd", str(sbd)]) == 0
    np.testing.assert_array_equal(read_png(out), expected(labels["voc_2007_000001"]))


def test_bad_files_are_named_and_skipped(sources, caplog):
    root, sbd, labels = sources
    corrupt = sbd / "cls" / "2008_000007.mat"
    corrupt.write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    bad_value = root / "VOC2012" / "SegmentationClass" / "2008_000008.png"
    seg = voc_labels(8)
    seg[0, 0] = 30
    write_voc_png(str(bad_value), seg)
    rgb = root / "VOC2012" / "SegmentationClass" / "2008_000009.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(rgb)
    no_struct = sbd / "cls" / "2008_000010.mat"
    scipy.io.savemat(str(no_struct), {"labels": np.zeros((H, W), np.uint8)})

    with caplog.at_level(logging.INFO, logger="ion_d2"):
        assert tool.main(["--root", str(root), "--sbd", str(sbd)]) == 1
    assert f"{corrupt}: cannot read it as a MATLAB .mat file" in caplog.text
    assert f"{bad_value}: unexpected label values [30]" in caplog.text
    assert f"{rgb}: image mode 'RGB'; expected a palette ('P') PNG" in caplog.text
    assert f"{no_struct}: no struct GTcls with a field Segmentation" in caplog.text
    assert "4 label files could not be converted" in caplog.text
    # The good files were converted all the same; the bad ones left nothing.
    assert "Wrote 3" in caplog.text
    assert not (root / "VOC2012" / "ION_SegmentationLabels" / "2008_000008.png").exists()


def test_help_explains_sources_and_layout(capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for words in ("SBD", "GTcls", "SegmentationClass", "ION_SegmentationLabels", "2007_NNNNNN"):
        assert words in help_text
    assert "VOC2012's official labels" in " ".join(help_text.split())


def test_cli_exit_status_and_log(sources):
    root, sbd, _ = sources
    (sbd / "cls" / "2008_000007.mat").write_bytes(b"not a mat file")
    env = dict(os.environ, PYTHONPATH=str(REPO), DETECTRON2_DATASETS=str(root))
    result = subprocess.run(
        [sys.executable, str(TOOL), "--sbd", str(sbd)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    # setup_logger's handler writes to stdout; the labels went under $DETECTRON2_DATASETS.
    assert "2008_000007.mat: cannot read it as a MATLAB .mat file" in result.stdout
    assert (root / "VOC2007" / "ION_SegmentationLabels" / "000001.png").is_file()


@pytest.fixture
def ionseg_root(tmp_path, monkeypatch):
    """Register the ``*_ionseg`` names again under a temporary $DETECTRON2_DATASETS, as
    ``import ion_d2`` would there; the previous registration is restored afterwards."""
    previous_root = os.path.dirname(MetadataCatalog.get("voc_2007_trainval_ionseg").dirname)

    def reregister(root):
        for name in IONSEG_NAMES:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        assert sorted(register_all_ionseg(root)) == sorted(IONSEG_NAMES)

    root = tmp_path / "datasets"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    reregister(None)  # reads the environment variable
    yield root
    reregister(previous_root)


def _voc_world(root, labelled):
    """A 4-image VOC2007 trainval under root, with VOC2012-style labels for the ids in
    ``labelled`` converted by the tool."""
    _write_voc(str(root / "VOC2007"))  # images 000000 ... 000003, classes cat, dog, car
    for image_id in labelled:
        seg = voc_labels(int(image_id))
        write_voc_png(str(root / "VOC2012" / "SegmentationClass" / f"2007_{image_id}.png"), seg)
    if labelled:
        assert tool.main(["--root", str(root)]) == 0


def test_voc_ionseg_dicts_carry_labels_exactly_for_labelled_images(ionseg_root):
    _voc_world(ionseg_root, ["000001", "000003"])
    name = "voc_2007_trainval_ionseg"
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == ["000000", "000001", "000002", "000003"]
    label_dir = ionseg_root / "VOC2007" / "ION_SegmentationLabels"
    labelled = {d["image_id"]: d["sem_seg_file_name"] for d in dicts if "sem_seg_file_name" in d}
    assert labelled == {i: str(label_dir / f"{i}.png") for i in ("000001", "000003")}
    # The builtin loader's boxes, classes as Detectron2's 20 VOC classes.
    assert {CLASS_NAMES[a["category_id"]] for d in dicts for a in d["annotations"]} <= {
        "cat",
        "dog",
        "car",
    }

    meta, builtin = MetadataCatalog.get(name), MetadataCatalog.get("voc_2007_trainval")
    for key in ("thing_classes", "year", "split", "evaluator_type"):
        assert meta.get(key) == builtin.get(key), key
    assert meta.dirname == str(ionseg_root / "VOC2007")
    assert meta.ignore_label == 255
    assert meta.sem_seg_root == str(label_dir)
    assert "tools/voc_to_semseg.py" in meta.sem_seg_labels_command
    assert MetadataCatalog.get("voc_2012_trainval_ionseg").dirname == str(ionseg_root / "VOC2012")


def test_coco_ionseg_dicts_and_metadata(ionseg_root):
    coco = ionseg_root / "coco"
    things = [c for c in COCO_CATEGORIES if c["isthing"]]
    square = [10.0, 10.0, 40.0, 10.0, 40.0, 30.0, 10.0, 30.0]
    dataset = {
        "images": [
            {"id": i, "file_name": f"{i:012d}.jpg", "height": H, "width": W} for i in (1, 2)
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 3,  # car
                "bbox": [10, 10, 30, 20],
                "area": 600,
                "iscrowd": 0,
                "segmentation": [square],
            }
        ],
        "categories": [{"id": c["id"], "name": c["name"]} for c in things],
    }
    json_file = coco / "annotations" / "instances_train2014.json"
    json_file.parent.mkdir(parents=True)
    json_file.write_text(json.dumps(dataset))
    label_dir = coco / "ion_semseg_train2014"
    coco_to_semseg_labels(str(json_file), str(label_dir))
    (label_dir / "000000000002.png").unlink()  # image 2 has no label now

    name = "coco_2014_train_ionseg"
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == [1, 2]
    assert dicts[0]["sem_seg_file_name"] == str(label_dir / "000000000001.png")
    assert "sem_seg_file_name" not in dicts[1]
    assert dicts[0]["file_name"] == str(coco / "train2014" / "000000000001.jpg")
    labels = read_png(dicts[0]["sem_seg_file_name"])
    assert labels[20, 20] == 3  # car: 1 + its contiguous id 2
    meta, builtin = MetadataCatalog.get(name), MetadataCatalog.get("coco_2014_train")
    for key in ("thing_classes", "thing_dataset_id_to_contiguous_id", "evaluator_type"):
        assert meta.get(key) == builtin.get(key), key
    assert meta.json_file == str(json_file)
    assert meta.image_root == str(coco / "train2014")
    assert meta.sem_seg_root == str(label_dir)
    assert MetadataCatalog.get("coco_2014_valminusminival_ionseg").sem_seg_root == str(
        coco / "ion_semseg_val2014"
    )


def _train_cfg(tmp_path, datasets, seg_loss_on=True):
    cfg = load_cfg(str(TINY))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(CLASS_NAMES)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(CLASS_NAMES) + 1
    cfg.MODEL.ION.SEG_LOSS_ON = seg_loss_on
    cfg.DATASETS.TRAIN = tuple(datasets)
    cfg.DATASETS.TEST = ()
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    return cfg


@pytest.fixture
def plain_voc(tmp_path):
    """Tiny VOC2007 trainval registered as Detectron2 registers voc_2007_trainval."""
    name = "ion_d2_test_plain_voc"
    _write_voc(str(tmp_path / "plain" / "VOC2007"))
    register_pascal_voc(name, str(tmp_path / "plain" / "VOC2007"), "trainval", 2007)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def test_trainer_refuses_a_training_set_without_labels(tmp_path, plain_voc, ionseg_root):
    with pytest.raises(ValueError) as e:
        IONTrainer.build_train_loader(_train_cfg(tmp_path, [plain_voc]))
    message = str(e.value)
    assert "none of the 4 training images" in message
    assert repr(plain_voc) in message
    assert "segmentation loss would be 0" in message
    assert "voc_2007_trainval_ionseg" in message
    assert "MODEL.ION.SEG_LOSS_ON False" in message

    # An _ionseg dataset whose labels were never written says where and how to write them.
    _voc_world(ionseg_root, [])
    with pytest.raises(ValueError) as e:
        IONTrainer.build_train_loader(_train_cfg(tmp_path, ["voc_2007_trainval_ionseg"]))
    assert str(ionseg_root / "VOC2007" / "ION_SegmentationLabels") in str(e.value)
    assert f"python tools/voc_to_semseg.py --root {ionseg_root}" in str(e.value)

    # Without the segmentation loss the same data trains.
    assert IONTrainer.build_train_loader(_train_cfg(tmp_path, [plain_voc], False)) is not None


def test_trainer_reports_the_labelled_fraction(tmp_path, plain_voc, ionseg_root, caplog):
    _voc_world(ionseg_root, ["000002"])
    datasets = ["voc_2007_trainval_ionseg", plain_voc]
    with caplog.at_level(logging.INFO, logger="ion_d2"):
        IONTrainer.build_train_loader(_train_cfg(tmp_path, datasets))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("12.5% of 8 training images" in r.getMessage() for r in warnings), caplog.text


def test_one_step_on_ionseg_has_a_segmentation_loss(tmp_path, ionseg_root, caplog):
    _voc_world(ionseg_root, ["000000", "000001", "000002", "000003"])
    cfg = _train_cfg(tmp_path, ["voc_2007_trainval_ionseg"])
    cfg.SOLVER.MAX_ITER = 1
    with caplog.at_level(logging.INFO, logger="ion_d2"):
        trainer = IONTrainer(cfg)
    assert "All 4 training images" in caplog.text
    trainer.resume_or_load(resume=False)
    trainer.train()
    loss = trainer.storage.history("loss_sem_seg").latest()
    # ln(21) ~ 3.0 for an untrained head; 0 would mean every pixel was ignored.
    assert 0.5 < loss < 10.0


def test_presets_train_on_ionseg_datasets():
    for preset, num_classes in (("ION_VGG16_VOC0712_stage1", 20), ("ION_VGG16_COCO_stage1", 80)):
        cfg = load_cfg(str(REPO / "configs" / f"{preset}.yaml"))
        assert cfg.MODEL.ION.SEG_LOSS_ON
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == num_classes + 1
        for name in cfg.DATASETS.TRAIN:
            assert name.endswith("_ionseg") and name in IONSEG_NAMES, name
            assert len(MetadataCatalog.get(name).thing_classes) == num_classes
    for preset in ("FastRCNN_VGG16_VOC0712_stage1",):
        cfg = load_cfg(str(REPO / "configs" / f"{preset}.yaml"))
        assert not cfg.MODEL.ION.SEG_LOSS_ON
        assert cfg.DATASETS.TRAIN == ("voc_2007_trainval", "voc_2012_trainval")
