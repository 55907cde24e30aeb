"""Selective-search proposals (ion_d2.data.selective_search{,_proposals}, the tool of that name):
Detectron2's file format, determinism across worker counts, resuming an interrupted run, the
error without cv2.ximgproc, and a tiny ION trained and evaluated from the files. They need
cv2.ximgproc (opencv-contrib-python-headless, which `make setup` installs) and fail, naming the
install command, without it."""

import os
import pickle
import subprocess
import sys
import types

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog, load_proposals_into_dataset
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode
from model_utils import load_cfg, shrink_cfg, synthetic_slice

from ion_d2.data import selective_search as ss
from ion_d2.data import selective_search_proposals as ssp
from ion_d2.engine import IONTrainer

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TOOL = os.path.join(REPO, "tools", "selective_search_proposals.py")
# Fast mode on images downscaled to 128 px: a few hundredths of a second per image.
SMALL = ss.SelectiveSearchConfig(mode="fast", max_size=128)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    with synthetic_slice(root, num_train=4, num_val=4, seed=5, name_prefix="sstest") as names:
        yield names


def _load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def _assert_same_file(a, b):
    assert a["ids"] == b["ids"]
    assert len(a["boxes"]) == len(b["boxes"])
    for x, y in zip(a["boxes"], b["boxes"]):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a["objectness_logits"], b["objectness_logits"]):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def one_worker_file(synth, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ss") / "train_w1.pkl")
    return ssp.compute_selective_search_proposals(
        synth[0], out, config=SMALL, workers=1, progress=False
    )


def test_file_format_loads_into_detectron2(synth, one_worker_file):
    data = _load(one_worker_file)
    dicts = DatasetCatalog.get(synth[0])
    assert data["ids"] == [d["image_id"] for d in dicts]
    assert BoxMode(data["bbox_mode"]) == BoxMode.XYXY_ABS
    assert not os.path.exists(one_worker_file + ".work")  # the cache is cleaned up
    loaded = load_proposals_into_dataset([dict(d) for d in dicts], one_worker_file)
    for record, boxes in zip(loaded, data["boxes"]):
        h, w = record["height"], record["width"]
        assert boxes.dtype == np.float32 and boxes.shape[1] == 4 and 20 < len(boxes) <= 2000
        # Detectron2 sorts by decreasing logit: the file's rank order survives.
        np.testing.assert_array_equal(record["proposal_boxes"], boxes)
        assert np.all(np.diff(record["proposal_objectness_logits"]) < 0)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= SMALL.min_size).all()
        assert len(np.unique(boxes, axis=0)) == len(boxes)


def test_same_result_with_two_workers_and_in_any_order(synth, one_worker_file, tmp_path):
    two = ssp.compute_selective_search_proposals(
        synth[0], str(tmp_path / "w2.pkl"), config=SMALL, workers=2, progress=False
    )
    _assert_same_file(_load(one_worker_file), _load(two))
    # The same image searched again after others in this process: the same boxes in the same
    # order (OpenCV ranks with the C library's rand(), re-seeded per image).
    image = read_image(DatasetCatalog.get(synth[0])[0]["file_name"], format="BGR")
    first = ss.selective_search_boxes(image, SMALL, image_seed=7)
    ss.selective_search_boxes(image[::-1].copy(), SMALL, image_seed=8)
    np.testing.assert_array_equal(first, ss.selective_search_boxes(image, SMALL, image_seed=7))


def test_top_k_keeps_the_best_ranked_boxes(synth):
    image = read_image(DatasetCatalog.get(synth[0])[1]["file_name"], format="BGR")
    every = ss.selective_search_boxes(image, SMALL, image_seed=3)
    top = ss.selective_search_boxes(
        image, ss.SelectiveSearchConfig(mode="fast", max_size=128, top_k=10), image_seed=3
    )
    np.testing.assert_array_equal(top, every[:10])


def test_boxes_are_scaled_back_to_the_original_image(synth):
    image = read_image(DatasetCatalog.get(synth[0])[2]["file_name"], format="BGR")[:100, :120]
    image = np.ascontiguousarray(image)
    # INTER_AREA halves a nearest-neighbour 2x enlargement back to the exact pixels.
    big = cv2.resize(image, (240, 200), interpolation=cv2.INTER_NEAREST)
    plain = ss.SelectiveSearchConfig(mode="fast", min_size=0)
    shrunk = ss.SelectiveSearchConfig(mode="fast", min_size=0, max_size=120)
    small_boxes = ss.selective_search_boxes(image, plain, image_seed=1)
    big_boxes = ss.selective_search_boxes(big, shrunk, image_seed=1)
    np.testing.assert_array_equal(big_boxes, 2 * small_boxes)


def test_interrupted_run_resumes_to_the_same_file(synth, one_worker_file, tmp_path, monkeypatch):
    out = str(tmp_path / "resumed.pkl")
    real = ss.selective_search_boxes
    calls = []

    def interrupted_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssp, "selective_search_boxes", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        ssp.compute_selective_search_proposals(
            synth[0], out, config=SMALL, workers=1, progress=False
        )
    assert not os.path.exists(out)
    assert len([f for f in os.listdir(out + ".work") if f.endswith(".npy")]) == 2

    # Other settings cannot reuse that cache.
    with pytest.raises(ValueError, match="work folder"):
        ssp.compute_selective_search_proposals(
            synth[0], out, config=ss.SelectiveSearchConfig(max_size=64), progress=False
        )

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssp, "selective_search_boxes", counted)
    calls.clear()
    ssp.compute_selective_search_proposals(synth[0], out, config=SMALL, workers=1, progress=False)
    assert len(calls) == 2  # only the images the first run had not done
    _assert_same_file(_load(out), _load(one_worker_file))
    # A finished file is kept as it is; one made with other settings is refused.
    calls.clear()
    ssp.compute_selective_search_proposals(synth[0], out, config=SMALL, progress=False)
    assert calls == []
    with pytest.raises(ValueError, match="exists and was made with"):
        ssp.compute_selective_search_proposals(
            synth[0], out, config=ss.SelectiveSearchConfig(top_k=5), progress=False
        )


def test_missing_ximgproc_names_the_wheel_and_command(monkeypatch, tmp_path):
    plain_cv2 = types.ModuleType("cv2")
    plain_cv2.__version__ = "4.11.0"
    plain_cv2.__file__ = "/site-packages/cv2/__init__.py"
    monkeypatch.setitem(sys.modules, "cv2", plain_cv2)
    with pytest.raises(ImportError) as err:
        ssp.compute_selective_search_proposals("any", str(tmp_path / "x.pkl"))
    message = str(err.value)
    assert "cv2.ximgproc" in message and "opencv-contrib-python-headless" in message
    assert ss.OPENCV_CONTRIB_INSTALL in message and "ION_D2_OPENCV=contrib" in message


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="mode='best'"):
        ss.SelectiveSearchConfig(mode="best")
    with pytest.raises(ValueError, match="top_k=0"):
        ss.SelectiveSearchConfig(top_k=0)


def test_tool_then_train_and_evaluate_ion_from_the_files(synth, one_worker_file, tmp_path):
    train, val = synth
    # The command-line tool, on the slice registered by a module it imports, writes the same
    # file as the library with the same settings.
    root = MetadataCatalog.get(train).ion_synth_params["root"]
    (tmp_path / "sstest_register.py").write_text(
        "from ion_d2.data import register_ion_synthetic\n"
        f"register_ion_synthetic({root!r}, num_train=4, num_val=4, seed=5, name_prefix='sstest')\n"
    )
    files = {train: str(tmp_path / "train.pkl"), val: str(tmp_path / "val.pkl")}
    proc = subprocess.run(
        [sys.executable, TOOL, "--dataset", train, "--output", files[train], "--workers", "2"]
        + ["--max-size", "128", "--import", "sstest_register"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([REPO, str(tmp_path)])},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_file(_load(files[train]), _load(one_worker_file))
    ssp.compute_selective_search_proposals(val, files[val], config=SMALL, progress=False)

    path = os.path.join(REPO, "configs", "ION_VGG16_synthetic.yaml")
    cfg = shrink_cfg(load_cfg(path, {"MODEL.ION.PROPOSALS": "selective_search"}))
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train,), ()
    cfg.DATASETS.PROPOSAL_FILES_TRAIN = (files[train],)
    cfg.DATASETS.PROPOSAL_FILES_TEST = (files[val],)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (96,), 128
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 128
    cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS = 2, 3, 0
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    trainer = IONTrainer(cfg)
    assert trainer.model.proposal_generator is None  # the boxes come from the file
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == cfg.SOLVER.MAX_ITER
    latest = trainer.storage.latest()
    assert "loss_cls" in latest and "loss_rpn_cls" not in latest

    cfg.DATASETS.TEST = (val,)
    results = IONTrainer.test(cfg, trainer.model)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert key in results["bbox"]
