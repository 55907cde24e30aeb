"""
Fault injection: each test feeds ion_d2 one of the faults of issue 11 ("nothing lost, nothing
silently wrong") and checks that it is either handled exactly or refused with a clear error.
"""

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from model_utils import ion_cfg, load_cfg, load_script, synthetic_slice

from ion_d2.data import register_ion_synthetic
from ion_d2.data.loader import IterationBatches
from ion_d2.data.mapper import InvalidSemSegLabel, IONDatasetMapper
from ion_d2.data.transforms import ResizeLongestEdgeCap
from ion_d2.engine import IONTrainer, train_and_evaluate
from ion_d2.engine.predictor import IONPredictor
from ion_d2.engine.solver import build_ion_lr_scheduler

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")


# --- 5. An "exponential decay" that would raise the learning rate ------------------------------


def test_ion_lr_schedule_refuses_an_end_lr_above_the_base_lr():
    cfg = ion_cfg()
    cfg.SOLVER.LR_SCHEDULER_NAME = "IONExponentialLR"
    cfg.SOLVER.BASE_LR, cfg.SOLVER.ION_END_LR, cfg.SOLVER.MAX_ITER = 1e-8, 4.8e-4, 100
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    with pytest.raises(
        ValueError, match=r"ION_END_LR <= BASE_LR.*BASE_LR=1e-08.*ION_END_LR=0.00048"
    ):
        build_ion_lr_scheduler(cfg, optimizer)
    # A constant schedule (equal values) is still allowed.
    cfg.SOLVER.ION_END_LR = 1e-8
    build_ion_lr_scheduler(cfg, optimizer)


# --- 2. tools/predict.py: no input overwritten, no output lost, no failure hidden --------------


def _load_tool(name):
    return load_script(f"tools/{name}")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A randomly initialised tiny model saved as a checkpoint (nothing is trained)."""
    cfg = load_cfg(TINY)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = build_model(cfg)
    folder = tmp_path_factory.mktemp("tiny_weights")
    DetectionCheckpointer(model, save_dir=str(folder)).save("tiny")
    return str(folder / "tiny.pth")


def _write_images(folder, names, size=(48, 64)):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    for name in names:
        cv2.imwrite(os.path.join(folder, name), rng.randint(0, 256, (*size, 3), dtype=np.uint8))


def _predict(*argv):
    return _load_tool("predict.py").main(["--config-file", TINY, *argv])


def test_predict_refuses_an_output_folder_that_holds_inputs(tiny_weights, tmp_path):
    _write_images(tmp_path / "in", ["a.png", "b.png"])
    before = {n: (tmp_path / "in" / n).read_bytes() for n in ("a.png", "b.png")}
    with pytest.raises(SystemExit) as exc:
        _predict(
            "--weights",
            tiny_weights,
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "in"),
        )
    assert exc.value.code == 2
    assert {n: (tmp_path / "in" / n).read_bytes() for n in ("a.png", "b.png")} == before
    assert sorted(os.listdir(tmp_path / "in")) == ["a.png", "b.png"]
    # The same file name in two folders would share one output.
    _write_images(tmp_path / "other", ["a.png"])
    with pytest.raises(SystemExit):
        _predict(
            "--weights",
            tiny_weights,
            "--input",
            str(tmp_path / "in"),
            str(tmp_path / "other"),
            "--output",
            str(tmp_path / "vis"),
        )
    assert not os.path.exists(tmp_path / "vis")


def test_predict_keeps_the_source_extension_in_output_names(tiny_weights, tmp_path):
    _write_images(tmp_path / "in", ["x.jpg", "x.png"])
    assert (
        _predict(
            "--weights",
            tiny_weights,
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "vis"),
        )
        == 0
    )
    assert sorted(os.listdir(tmp_path / "vis")) == ["x.jpg.png", "x.png.png"]
    assert cv2.imread(str(tmp_path / "vis" / "x.jpg.png")).shape == (48, 64, 3)


def test_predict_skips_and_reports_unreadable_and_truncated_images(tiny_weights, tmp_path, capsys):
    _write_images(tmp_path / "in", ["good.png", "whole.jpg"])
    jpeg = (tmp_path / "in" / "whole.jpg").read_bytes()
    (tmp_path / "in" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image at all")
    # OpenCV decodes the truncated JPEG "successfully" (its lower half grey).
    assert cv2.imread(str(tmp_path / "in" / "truncated.jpg")) is not None

    code = _predict(
        "--weights",
        tiny_weights,
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "vis"),
    )
    out = capsys.readouterr().out
    assert code == 1
    assert sorted(os.listdir(tmp_path / "vis")) == ["good.png.png", "whole.jpg.png"]
    assert "2 of 4 images written" in out and "2 failed" in out
    summary = out.split("2 failed")[1]
    assert "truncated.jpg: OSError: image file is truncated" in summary
    assert "broken.png: " in summary


def test_predict_refuses_random_weights_unless_asked(tiny_weights, tmp_path, capsys):
    _write_images(tmp_path / "in", ["a.png"])
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "vis")]
    with pytest.raises(SystemExit) as exc:
        _predict("--weights", "", *args)
    assert exc.value.code == 2
    assert "--allow-random-weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _predict("--weights", str(tmp_path / "missing.pth"), *args)
    assert not os.path.exists(tmp_path / "vis")
    assert _predict("--weights", "", "--allow-random-weights", *args) == 0
    assert os.listdir(tmp_path / "vis") == ["a.png.png"]


# --- 8. A finished run is reused only for the config it was trained with -----------------------


@pytest.fixture(scope="module")
def synth_slice(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    with synthetic_slice(root, num_train=8, num_val=2, seed=3, name_prefix="fault") as names:
        yield names


def _slice_cfg(synth_slice, output_dir, **solver):
    cfg = load_cfg(TINY)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (synth_slice[0],), (synth_slice[1],)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 6
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 10
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST = (64,), 64
    cfg.SOLVER.MAX_ITER = 2
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def test_train_and_evaluate_refuses_a_finished_run_of_another_config(synth_slice, tmp_path):
    cfg = _slice_cfg(synth_slice, tmp_path / "run")
    trainer, _ = train_and_evaluate(cfg)
    assert trainer.start_iter == 0
    with open(tmp_path / "run" / "config.yaml") as f:
        assert f.read() == cfg.dump()

    # Cosmetic and test-time keys: the finished run is reused, not trained again.
    same = cfg.clone()
    same.DATALOADER.NUM_WORKERS, same.INPUT.MIN_SIZE_TEST = 1, 80
    trainer, _ = train_and_evaluate(same)
    assert trainer.start_iter == 2

    # Another iteration count without resume (with resume it continues the run: a schedule
    # key), or another dataset: refused, naming the keys and their values.
    longer = cfg.clone()
    longer.SOLVER.MAX_ITER = 3
    with pytest.raises(ValueError, match=r"1 key\(s\):\n  SOLVER.MAX_ITER: 2 -> 3\n.*--retrain"):
        train_and_evaluate(longer, resume=False)
    other_data = cfg.clone()
    other_data.DATASETS.TRAIN = (synth_slice[1],)
    with pytest.raises(ValueError, match=r"DATASETS.TRAIN: \['fault_train'\] -> \['fault_val'\]"):
        train_and_evaluate(other_data)

    # retrain=True trains the new config from scratch and keeps the old run aside.
    trainer, _ = train_and_evaluate(longer, retrain=True)
    assert trainer.start_iter == 0 and trainer.iter == 3
    (aside,) = [n for n in os.listdir(tmp_path / "run") if n.startswith("replaced_")]
    assert "model_final.pth" in os.listdir(tmp_path / "run" / aside)
    with open(tmp_path / "run" / "config.yaml") as f:
        assert f.read() == longer.dump()

    # A run whose config was not stored (written before this check existed) is not reused.
    os.remove(tmp_path / "run" / "config.yaml")
    with pytest.raises(ValueError, match="without its config"):
        train_and_evaluate(longer)


# --- 7. Weights loaded into a model that pools its features in another order -------------------


def test_checkpoint_refuses_reordered_roi_features(tiny_weights, caplog):
    cfg = load_cfg(TINY)
    same = build_model(cfg)
    DetectionCheckpointer(same).load(tiny_weights)
    stored = torch.load(tiny_weights, map_location="cpu")
    assert torch.equal(
        stored["model"]["roi_heads.box_pooler.feature_order"],
        same.roi_heads.box_pooler.feature_order,
    )

    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["conv4", "conv3", "conv5", "context"]
    reordered = build_model(cfg)
    with pytest.raises(ValueError) as exc:
        DetectionCheckpointer(reordered).load(tiny_weights)
    message = str(exc.value)
    assert "['conv3', 'conv4', 'conv5', 'context'] in this order" in message
    assert "pools ['conv4', 'conv3', 'conv5', 'context']" in message


def test_checkpoint_without_feature_order_loads_with_a_warning(tiny_weights, tmp_path, caplog):
    old = torch.load(tiny_weights, map_location="cpu")
    del old["model"]["roi_heads.box_pooler.feature_order"]
    torch.save(old, tmp_path / "old.pth")
    model = build_model(load_cfg(TINY))
    with caplog.at_level(logging.WARNING, logger="ion_d2.modeling.skip_pooling"):
        DetectionCheckpointer(model).load(str(tmp_path / "old.pth"))
    assert "stores no feature order for roi_heads.box_pooler" in caplog.text
    # Weights without any pooler (e.g. converted ImageNet VGG16) have nothing to check.
    caplog.clear()
    trunk_only = {"model": {k: v for k, v in old["model"].items() if k.startswith("backbone.")}}
    torch.save(trunk_only, tmp_path / "trunk.pth")
    with caplog.at_level(logging.WARNING, logger="ion_d2.modeling.skip_pooling"):
        DetectionCheckpointer(build_model(load_cfg(TINY))).load(str(tmp_path / "trunk.pth"))
    assert "feature order" not in caplog.text
    assert torch.equal(
        model.roi_heads.box_pooler.reduce.weight, old["model"]["roi_heads.box_pooler.reduce.weight"]
    )


def test_configs_that_cannot_run_alone_say_so():
    train_net = _load_tool("../train_net.py")
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", os.path.join(REPO, "configs", "Base-ION-VGG16.yaml")]
    )
    with pytest.raises(ValueError, match="names no dataset in DATASETS.TRAIN"):
        train_net.setup(args)
    # The tiny config runs on its own: it names the bundled data, with its class counts.
    cfg = load_cfg(TINY)
    assert cfg.DATASETS.TRAIN == ("ion_synth_train",) and cfg.DATASETS.TEST == ("ion_synth_val",)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == len(
        MetadataCatalog.get("ion_synth_train").thing_classes
    )
    assert (
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        == MetadataCatalog.get("ion_synth_train").num_sem_seg_classes
    )


# --- 3. Semantic labels that do not fit their image or the model's classes --------------------


def _labelled_dataset(folder, label_size=(48, 64), label_value=3):
    """One 48x64 image with a box, and its label map of ``label_size`` holding ``label_value``."""
    os.makedirs(folder, exist_ok=True)
    image, label = os.path.join(folder, "img.png"), os.path.join(folder, "img_label.png")
    cv2.imwrite(image, np.random.RandomState(0).randint(0, 256, (48, 64, 3), dtype=np.uint8))
    seg = np.full(label_size, 255, dtype=np.uint8)
    seg[10:30, 10:40] = label_value
    cv2.imwrite(label, seg)
    return {
        "file_name": image,
        "sem_seg_file_name": label,
        "height": 48,
        "width": 64,
        "image_id": 0,
        "annotations": [{"bbox": [10, 10, 30, 20], "bbox_mode": 1, "category_id": 0}],
    }


def _seg_cfg():
    cfg = load_cfg(TINY)
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 128
    return cfg


def test_mapper_checks_label_size_before_transforms(tmp_path):
    mapper = IONDatasetMapper(_seg_cfg(), is_train=True)
    good = mapper(_labelled_dataset(tmp_path / "good"))
    assert good["sem_seg"].shape == good["image"].shape[1:]
    assert set(good["sem_seg"].unique().tolist()) == {3, 255}

    bad = _labelled_dataset(tmp_path / "bad", label_size=(40, 50))
    with pytest.raises(InvalidSemSegLabel) as exc:
        mapper(bad)
    assert bad["sem_seg_file_name"] in str(exc.value) and bad["file_name"] in str(exc.value)
    assert "label map is 40x50 (HxW) but its image is 48x64" in str(exc.value)
    # The stock mapper resizes the image and then fails on the label without naming anything.
    with pytest.raises(AssertionError):
        DatasetMapper(_seg_cfg(), is_train=True)(bad)


def test_train_loader_rejects_labels_outside_the_classes(tmp_path):
    cfg = _seg_cfg()
    d = _labelled_dataset(tmp_path, label_value=77)
    DatasetCatalog.register("fault_badseg", lambda: [d])
    MetadataCatalog.get("fault_badseg").set(thing_classes=["a"])
    try:
        cfg.DATASETS.TRAIN = ("fault_badseg",)
        with pytest.raises(InvalidSemSegLabel) as exc:
            next(iter(IONTrainer.build_train_loader(cfg)))
    finally:
        DatasetCatalog.remove("fault_badseg")
        MetadataCatalog.remove("fault_badseg")
    message = str(exc.value)
    assert d["sem_seg_file_name"] in message and "values [77]" in message
    assert "[0, 10) (MODEL.SEM_SEG_HEAD.NUM_CLASSES = 10)" in message
    assert "255 (MODEL.SEM_SEG_HEAD.IGNORE_VALUE)" in message


# --- 1. A run killed after a checkpoint and resumed continues exactly --------------------------


@pytest.fixture(scope="module")
def bundled_datasets(tmp_path_factory):
    """A $DETECTRON2_DATASETS with the bundled training split (what train_net.py reads)."""
    root = tmp_path_factory.mktemp("bundled")
    names = register_ion_synthetic(str(root), name_prefix="fault_bundled")
    DatasetCatalog.get(names[0])  # generated once, before runs start in parallel
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    return root


def _train_net(datasets, out, *opts, flags=()):
    """train_net.py with the tiny config on its own (the bundled data), 64 px images."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets), OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", TINY, *flags]
    cmd += ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "DATASETS.TEST", "()"]
    cmd += ["OUTPUT_DIR", str(out), *opts]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _metrics_has(path, iteration):
    return path.exists() and f'"iteration": {iteration}' in path.read_text()


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    timing = ("time", "eta_seconds")
    return {
        r["iteration"]: {k: v for k, v in r.items() if not any(t in k for t in timing)}
        for r in records
    }


def test_resume_after_a_kill_continues_exactly(bundled_datasets, tmp_path):
    # 40 iterations checkpointed at 19: Detectron2 logs the losses (medians over 20
    # iterations) and the LR at iterations 19 and 39.
    opts = ["SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "20", "SEED", "7"]
    whole = _train_net(bundled_datasets, tmp_path / "whole", *opts)
    killed = _train_net(bundled_datasets, tmp_path / "killed", *opts)
    tag, log = tmp_path / "killed" / "last_checkpoint", tmp_path / "killed" / "metrics.json"
    deadline = time.time() + 300
    # Kill once iteration 19's checkpoint and log line (written after it) are there.
    while not (tag.exists() and tag.read_text() == "model_0000019.pth" and _metrics_has(log, 19)):
        assert killed.poll() is None and time.time() < deadline, killed.stdout.read()[-3000:]
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert not (tmp_path / "killed" / "model_final.pth").exists()

    resumed = _train_net(bundled_datasets, tmp_path / "killed", *opts, flags=["--resume"])
    log = resumed.communicate()[0]
    assert resumed.returncode == 0, log[-3000:]
    assert "Starting training from iteration 20" in log
    assert whole.wait() == 0, whole.stdout.read()[-3000:]

    expected, got = _metrics(tmp_path / "whole"), _metrics(tmp_path / "killed")
    assert sorted(expected) == sorted(got) == [19, 39]
    for iteration in (19, 39):
        assert set(got[iteration]) == set(expected[iteration])
        for key, value in expected[iteration].items():
            assert got[iteration][key] == pytest.approx(value, rel=1e-6), (iteration, key)
    a = torch.load(tmp_path / "whole" / "model_final.pth", map_location="cpu")["model"]
    b = torch.load(tmp_path / "killed" / "model_final.pth", map_location="cpu")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-6, atol=1e-9), key


def test_checkpoint_written_without_trainer_extras_resumes_with_a_warning(
    synth_slice, tmp_path, caplog
):
    cfg = _slice_cfg(synth_slice, tmp_path / "run", MAX_ITER=3, CHECKPOINT_PERIOD=2)
    trainer = IONTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    path = tmp_path / "run" / "model_0000001.pth"
    state = torch.load(path, map_location="cpu")
    assert {"_trainer", "rng", "data_loader"} <= set(state["trainer"])
    assert state["trainer"]["data_loader"] == {"seed": cfg.SEED}
    # What Detectron2 v0.6 writes: the iteration and the LR scheduler only.
    for key in ("_trainer", "rng", "data_loader"):
        del state["trainer"][key]
    torch.save(state, path)
    (tmp_path / "run" / "last_checkpoint").write_text("model_0000001.pth")

    resumed = IONTrainer(cfg)
    with caplog.at_level(logging.WARNING, logger="ion_d2.engine.checkpoint"):
        resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2 and resumed.data_loader.start_iter == 2
    for what in ("optimizer state", "random number generators", "data loader's seed"):
        assert what in caplog.text
    # The learning rate is iteration 2's, from the restored scheduler, not the initial one.
    expected = cfg.SOLVER.BASE_LR * (cfg.SOLVER.ION_END_LR / cfg.SOLVER.BASE_LR) ** (2 / 3)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6)


def test_iteration_batches_depend_on_seed_and_iteration_only():
    groups = np.array([0, 1] * 5 + [0] * 3)  # 8 landscape, 5 portrait images
    batches = IterationBatches(13, 4, seed=5, groups=groups)
    assert batches.batches_per_epoch == 8 // 4 + 5 // 4
    seen = [batches(i) for i in range(12)]
    fresh = IterationBatches(13, 4, seed=5, groups=groups)
    assert [fresh(i) for i in (11, 3, 7)] == [seen[11], seen[3], seen[7]]
    for batch in seen:
        assert len(set(groups[batch])) == 1
    assert sorted(sum(seen[:3], [])) == sorted(set(sum(seen[:3], [])))  # no repeat in an epoch
    assert seen != [IterationBatches(13, 4, seed=6, groups=groups)(i) for i in range(12)]
    plain = IterationBatches(3, 2, seed=5, groups=None)
    stream = sum((plain(i) for i in range(3)), [])
    assert sorted(stream[:3]) == [0, 1, 2] and sorted(stream[3:]) == [0, 1, 2]


def test_train_batches_do_not_depend_on_the_number_of_workers(synth_slice):
    def first_batches(workers, start_iter):
        cfg = _slice_cfg(synth_slice, "unused")
        cfg.DATALOADER.NUM_WORKERS = workers
        loader = IONTrainer.build_train_loader(cfg)
        loader.set_start_iter(start_iter)
        return list(itertools.islice(loader, 3))

    a, b = first_batches(0, 0), first_batches(2, 0)
    for x, y in zip(a, b):
        assert [d["file_name"] for d in x] == [d["file_name"] for d in y]
        assert all(torch.equal(dx["image"], dy["image"]) for dx, dy in zip(x, y))
    # Starting at iteration 2 gives the third batch.
    resumed = first_batches(0, 2)[0]
    assert [d["file_name"] for d in resumed] == [d["file_name"] for d in a[2]]
    assert torch.equal(resumed[0]["image"], a[2][0]["image"])


# --- 6. Predictor inputs and test-time size -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_predictor(tiny_weights):
    cfg = load_cfg(TINY)
    cfg.MODEL.WEIGHTS = tiny_weights
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 0, 96
    return IONPredictor(cfg)


def test_predictor_converts_grey_and_bgra_and_refuses_the_rest(tiny_predictor):
    rng = np.random.RandomState(0)
    bgr = rng.randint(0, 256, (40, 56, 3), dtype=np.uint8)
    grey = bgr[:, :, 0]

    def boxes(image):
        out = tiny_predictor(image)["instances"]
        assert out.image_size == (40, 56)
        return out.pred_boxes.tensor

    assert torch.equal(boxes(grey), boxes(np.repeat(grey[:, :, None], 3, axis=2)))
    assert torch.equal(boxes(grey[:, :, None]), boxes(np.repeat(grey[:, :, None], 3, axis=2)))
    bgra = np.concatenate([bgr, np.full((40, 56, 1), 7, np.uint8)], axis=2)
    assert torch.equal(boxes(bgra), boxes(bgr))

    with pytest.raises(TypeError, match="None; cv2.imread returns None"):
        tiny_predictor(None)
    with pytest.raises(ValueError, match=r"non-empty .* got shape \(0, 0, 3\)"):
        tiny_predictor(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(ValueError, match=r"dtype float32 \(values 0.0..1.0\).*\* 255"):
        tiny_predictor(np.linspace(0, 1, 40 * 56 * 3, dtype=np.float32).reshape(40, 56, 3))
    with pytest.raises(ValueError, match="dtype uint16.*// 257"):
        tiny_predictor(bgr.astype(np.uint16) * 257)
    with pytest.raises(ValueError, match=r"got shape \(40, 56, 2\)"):
        tiny_predictor(bgr[:, :, :2])


def test_no_resizing_still_caps_the_longer_edge(tiny_predictor, tmp_path):
    # MIN_SIZE_TEST 0 ("own size") with MAX_SIZE_TEST 96: small images untouched, large capped.
    assert isinstance(tiny_predictor.aug, ResizeLongestEdgeCap)
    small = np.zeros((80, 96, 3), np.uint8)
    assert isinstance(tiny_predictor.aug.get_transform(small), T.NoOpTransform)
    big = tiny_predictor.aug.get_transform(np.zeros((300, 200, 3), np.uint8))
    assert (big.new_h, big.new_w) == (96, 64)
    seen = []
    model = tiny_predictor.model
    hook = model.backbone.register_forward_pre_hook(lambda m, x: seen.append(x[0].shape))
    try:
        out = tiny_predictor(np.random.RandomState(1).randint(0, 256, (300, 200, 3), np.uint8))
    finally:
        hook.remove()
    assert out["instances"].image_size == (300, 200)
    assert max(seen[0][-2:]) <= 96 + 15  # padded to the trunk's stride 16
    # The test loader's mapper caps the same way, so evaluation and prediction agree.
    cfg = load_cfg(TINY)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 0, 96
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((300, 200, 3), np.uint8))
    mapped = IONDatasetMapper(cfg, is_train=False)(
        {"file_name": str(tmp_path / "big.png"), "height": 300, "width": 200, "image_id": 0}
    )
    assert tuple(mapped["image"].shape[1:]) == (96, 64)
    # The synthetic config's bundled images (at most 256 px) keep their size, as before.
    synth = load_cfg(os.path.join(REPO, "configs", "ION_VGG16_synthetic.yaml"))
    assert synth.INPUT.MIN_SIZE_TEST == 0 and synth.INPUT.MAX_SIZE_TEST >= 256


# --- 4. Several processes without CUDA; context outputs nobody reads -------------------------


def test_context_outputs_nobody_reads_are_refused():
    cfg = load_cfg(TINY)
    cfg.MODEL.ION.CONTEXT.NAME = "IRNNAndStackedConv"  # Table 10c: adds "context_conv"
    with pytest.raises(ValueError, match=r"outputs \['context_conv'\], which no head reads"):
        build_model(cfg)
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["conv3", "conv4", "conv5", "context", "context_conv"]
    build_model(cfg)

    cfg = load_cfg(TINY)
    cfg.MODEL.ION.SEG_LOSS_ON = False
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["conv3", "conv4", "conv5"]
    with pytest.raises(ValueError, match=r"\['context'\].*SEG_LOSS_ON is False"):
        build_model(cfg)


_DDP_DRIVER = """
import sys

import torch
from detectron2.utils import comm

from ion_d2 import get_ion_cfg
from ion_d2.data import register_ion_synthetic
from ion_d2.engine import IONTrainer
from ion_d2.engine.launch import launch


def main(config, root, out):
    torch.set_num_threads(1)
    train, _ = register_ion_synthetic(root, num_train=8, num_val=2, seed=3, name_prefix="fault")
    cfg = get_ion_cfg(config)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train,), ()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 96
    cfg.SOLVER.MAX_ITER, cfg.OUTPUT_DIR = 3, out
    trainer = IONTrainer(cfg)
    trainer.resume_or_load(resume=False)
    torch.save(trainer.model.module.state_dict(), f"{out}/initial{comm.get_rank()}.pth")
    trainer.train()
    torch.save(trainer.model.module.state_dict(), f"{out}/rank{comm.get_rank()}.pth")


if __name__ == "__main__":
    launch(main, 2, dist_url="auto", args=tuple(sys.argv[1:]))
"""


def test_two_cpu_processes_train_to_identical_weights(synth_slice, tmp_path):
    root = MetadataCatalog.get(synth_slice[0]).ion_synth_params["root"]
    DatasetCatalog.get(synth_slice[0])  # generated before the processes start
    (tmp_path / "driver.py").write_text(_DDP_DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), TINY, root, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CPU processes per machine (2 in all) on the GLOO backend" in proc.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pth", map_location="cpu") for r in (0, 1)]
    initial = torch.load(tmp_path / "initial0.pth", map_location="cpu")
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key
    assert not torch.equal(
        ranks[0]["roi_heads.box_pooler.reduce.weight"],
        initial["roi_heads.box_pooler.reduce.weight"],
    )


def test_train_net_runs_two_cpu_processes(bundled_datasets, tmp_path):
    proc = _train_net(
        bundled_datasets, tmp_path / "out", "SOLVER.MAX_ITER", "2", flags=["--num-gpus", "2"]
    )
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "GLOO" in log and os.path.isfile(tmp_path / "out" / "model_final.pth")


def test_a_rank_leaves_its_gloo_group_when_main_returns(tmp_path):
    """Torn down by the worker, not at interpreter exit (where GLOO aborted a rank in CI)."""
    import torch.distributed as dist

    from ion_d2.engine.launch import run_then_leave_group

    def main(value):
        assert dist.get_world_size() == 1
        return value * 2

    def broken():
        raise RuntimeError("main failed")

    init = f"file://{tmp_path / 'rendezvous'}"
    try:
        dist.init_process_group("gloo", init_method=init, world_size=1, rank=0)
        assert run_then_leave_group(main, 21) == 42
        assert not dist.is_initialized()
        dist.init_process_group("gloo", init_method=f"{init}2", world_size=1, rank=0)
        with pytest.raises(RuntimeError, match="main failed"):
            run_then_leave_group(broken)
        assert dist.is_initialized()  # left alone: waiting for peers could hang
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- Issue 19: tools/predict.py finishes the folder; config errors; the stock predictor ------


def test_predict_finishes_the_folder_and_lists_every_file_it_skips(tiny_weights, tmp_path, capsys):
    _write_images(tmp_path / "in", ["good.png", "x.tif", "y.webp"])
    _write_images(tmp_path / "in", ["thin.png"], size=(2, 700))
    rng = np.random.RandomState(0)
    cv2.imwrite(str(tmp_path / "in" / "rgb16.png"), rng.randint(0, 65536, (48, 64, 3), np.uint16))
    cv2.imwrite(str(tmp_path / "in" / "grey16.png"), rng.randint(0, 65536, (48, 64), np.uint16))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    code = _predict(
        "--weights",
        tiny_weights,
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "vis"),
    )
    out = capsys.readouterr().out
    assert code == 1
    assert sorted(os.listdir(tmp_path / "vis")) == ["good.png.png", "x.tif.png", "y.webp.png"]
    assert "3 of 7 images written" in out and "4 failed" in out
    summary = dict(
        line.strip().split(": ", 1) for line in out.split("4 failed:")[1].strip().splitlines()
    )
    folder = str(tmp_path / "in")
    assert set(summary) == {
        os.path.join(folder, n) for n in ("thin.png", "rgb16.png", "grey16.png", "notes.txt")
    }
    assert summary[os.path.join(folder, "thin.png")] == (
        "ValueError: too small: 2x700 (HxW) is 0x128 after resizing (INPUT.MIN_SIZE_TEST / "
        "MAX_SIZE_TEST), under the trunk's stride (16 px)"
    )
    assert (
        "is a uint16 image (16-bit, 3 channels); expected an 8-bit image"
        in summary[os.path.join(folder, "rgb16.png")]
    )
    assert "expected an 8-bit image" in summary[os.path.join(folder, "grey16.png")]
    assert summary[os.path.join(folder, "notes.txt")].startswith("UnidentifiedImageError")


def test_config_errors_name_the_key():
    cfg = load_cfg(TINY)
    model = IONTrainer.build_model(cfg)
    for lr in (-0.01, 0.0):
        cfg.SOLVER.BASE_LR = lr
        with pytest.raises(
            ValueError, match=rf"SOLVER.BASE_LR must be a finite number > 0; got {lr}"
        ):
            IONTrainer.build_optimizer(cfg, model)
    cfg.SOLVER.BASE_LR, cfg.SOLVER.ION_END_LR = 0.01, 0.0
    optimizer = IONTrainer.build_optimizer(cfg, model)
    with pytest.raises(ValueError, match="SOLVER.ION_END_LR must be a finite number > 0; got 0.0"):
        IONTrainer.build_lr_scheduler(cfg, optimizer)
    cfg.MODEL.PIXEL_STD = [0.0, 0.0, 0.0]
    with pytest.raises(
        ValueError, match=r"MODEL.PIXEL_STD must hold finite values > 0.*\[0.0, 0.0"
    ):
        IONTrainer.build_model(cfg)


def test_stock_predictor_runs_unresized_and_says_to_use_ion_predictor(tiny_weights, caplog):
    # A preset with MIN_SIZE_TEST 0 (as ION_VGG16_synthetic.yaml): IONPredictor caps the longer
    # edge at MAX_SIZE_TEST; Detectron2's DefaultPredictor runs the image at full size, and the
    # model says so once.
    cfg = load_cfg(TINY)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 0, 96
    cfg.MODEL.WEIGHTS = tiny_weights
    image = np.random.RandomState(2).randint(0, 256, (300, 400, 3), np.uint8)
    seen = {}
    for predictor in (DefaultPredictor(cfg), IONPredictor(cfg)):
        sizes = []
        hook = predictor.model.backbone.register_forward_pre_hook(
            lambda m, x: sizes.append(tuple(x[0].shape[-2:]))
        )
        with caplog.at_level(logging.WARNING, logger="ion_d2.modeling.meta_arch"):
            caplog.clear()
            predictor(image)
            predictor(image)
        hook.remove()
        warned = caplog.text.count("runs at full size")
        seen[type(predictor).__name__] = (sizes[0], warned)
        if warned:
            assert "larger than INPUT.MAX_SIZE_TEST (96)" in caplog.text
            assert "Use ion_d2.IONPredictor" in caplog.text
    assert seen["DefaultPredictor"] == ((304, 400), 1)  # padded to the stride
    assert seen["IONPredictor"] == ((80, 96), 0)


def _tmpfs_works(folder):
    probe = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]
    cmd = probe + [f"mount -t tmpfs -o size=1m tmpfs {folder}"]
    try:
        return subprocess.run(cmd, capture_output=True).returncode == 0
    except OSError:
        return False


def test_a_full_disk_keeps_the_metrics_and_log_written_before_it(bundled_datasets, tmp_path):
    # A real full disk: train_net.py with OUTPUT_DIR on a small tmpfs in a user namespace. The
    # second checkpoint does not fit; the failed write leaves no partial checkpoint, and the
    # metrics and the log (with the error) written after it are kept.
    disk, copy = tmp_path / "disk", tmp_path / "copy"
    disk.mkdir(), copy.mkdir()
    if not _tmpfs_works(disk):
        pytest.skip("needs `unshare --user --map-root-user --mount` to mount a small tmpfs")
    env = dict(os.environ, DETECTRON2_DATASETS=str(bundled_datasets), OMP_NUM_THREADS="1")
    train = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", TINY]
    train += ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "DATASETS.TEST", "()"]
    train += ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", str(disk)]
    script = (
        f'mount -t tmpfs -o size=5m tmpfs "{disk}" && '
        + " ".join(f"'{a}'" for a in train)
        + f' > "{copy}/stdout.txt" 2>&1; echo $? > "{copy}/rc"; cp -a "{disk}"/. "{copy}"/'
    )
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=env)
    assert (copy / "rc").read_text().strip() != "0", (copy / "stdout.txt").read_text()[-3000:]
    assert "No space left on device" in (copy / "stdout.txt").read_text()
    files = sorted(n for n in os.listdir(copy) if ".pth" in n)
    assert files == ["model_0000001.pth"]
    assert (copy / "last_checkpoint").read_text() == "model_0000001.pth"
    torch.load(copy / "model_0000001.pth", map_location="cpu")
    assert _metrics(copy)  # the iterations logged before and at the failure
    assert "Exception during training" in (copy / "log.txt").read_text()
