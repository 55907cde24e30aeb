"""
Issue 19's checkpoint faults: a file that is not a checkpoint is refused naming it and what it
is; ``--resume`` falls back to the newest readable checkpoint; no file under a checkpoint's name
is ever partial, whether the write fails (a full disk) or the process is killed mid-write.
Issue 29's: a file holding no weights is named with what it holds; the fallback works on
upstream Detectron2 too; a full disk is the error's last line.
"""

import errno
import logging
import os
import subprocess
import sys
import textwrap
from urllib.parse import urlparse

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from fvcore.common.checkpoint import Checkpointer
from model_utils import load_cfg, synthetic_slice

from ion_d2.engine import IONTrainer
from ion_d2.engine.checkpoint import IONCheckpointer
from ion_d2.engine.predictor import IONPredictor

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")


@pytest.fixture(scope="module")
def slice_names(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    with synthetic_slice(root, num_train=4, num_val=1, seed=3, name_prefix="ckfiles") as names:
        yield root, names


def _cfg(names, out, **solver):
    cfg = load_cfg(TINY)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (names[0],), ()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 96
    cfg.OUTPUT_DIR = str(out)
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


@pytest.fixture(scope="module")
def trained(slice_names, tmp_path_factory):
    """A 4-iteration run checkpointed after iterations 1 and 3 (and model_final)."""
    out = tmp_path_factory.mktemp("run")
    cfg = _cfg(slice_names[1], out, MAX_ITER=4, CHECKPOINT_PERIOD=2)
    trainer = IONTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return cfg, out


def _bad_files(folder, good):
    data = open(good, "rb").read()
    png = os.path.join(folder, "image.png")
    cv2.imwrite(png, np.zeros((8, 8, 3), np.uint8))
    files = {"empty.pth": b"", "truncated.pth": data[: len(data) // 2]}
    for name, content in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
    return {
        os.path.join(folder, "empty.pth"): r"is empty \(0 bytes\)",
        os.path.join(folder, "truncated.pth"): r"is truncated \(\d+ bytes",
        png: r"is not a torch file \(a PNG image, \d+ bytes\)",
    }


def test_weights_that_are_not_a_checkpoint_are_named(trained, tmp_path):
    cfg, out = trained
    for path, what in _bad_files(str(tmp_path), str(out / "model_final.pth")).items():
        bad = cfg.clone()
        bad.MODEL.WEIGHTS = path
        bad.OUTPUT_DIR = str(tmp_path / "fresh")
        trainer = IONTrainer(bad)
        with pytest.raises(ValueError, match=rf"^{path} {what}"):
            trainer.resume_or_load(resume=False)
        with pytest.raises(ValueError, match=rf"MODEL.WEIGHTS {path} {what}"):
            IONPredictor(bad)


def test_resume_skips_an_unreadable_newest_checkpoint(trained, tmp_path, caplog):
    cfg, out = trained
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model_0000001.pth", "model_0000003.pth", "model_final.pth", "last_checkpoint"):
        (run / name).write_bytes((out / name).read_bytes())
    assert (run / "last_checkpoint").read_text() == "model_final.pth"
    final = (run / "model_final.pth").read_bytes()
    (run / "model_final.pth").write_bytes(final[: len(final) // 3])
    (run / "model_0000003.pth").write_bytes(b"")
    resumed = IONTrainer(_cfg((cfg.DATASETS.TRAIN[0],), run, MAX_ITER=4, CHECKPOINT_PERIOD=2))
    with caplog.at_level(logging.WARNING, logger="ion_d2.engine.checkpoint"):
        resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    assert f"Not resuming from {run / 'model_final.pth'}: " in caplog.text
    assert "is truncated" in caplog.text and "is empty (0 bytes)" in caplog.text
    assert f"Resumed from {run / 'model_0000001.pth'}" in caplog.text
    expected = torch.load(out / "model_0000001.pth", map_location="cpu")["model"]
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    # Nothing readable at all: one error listing each file.
    (run / "model_0000001.pth").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match=r"No checkpoint in .* can be read: .*not a torch file"):
        IONTrainer(resumed.cfg).resume_or_load(resume=True)


def test_a_failed_checkpoint_write_leaves_no_partial_file(slice_names, tmp_path, monkeypatch):
    cfg = _cfg(slice_names[1], tmp_path, MAX_ITER=4, CHECKPOINT_PERIOD=2)
    trainer = IONTrainer(cfg)
    trainer.resume_or_load(resume=False)
    real_save = torch.save

    def disk_full_at_the_second_checkpoint(obj, f, *args, **kwargs):
        if trainer.iter < 3:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04" + b"\0" * 1000)  # what was written before the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full_at_the_second_checkpoint)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    files = sorted(n for n in os.listdir(tmp_path) if ".pth" in n or n == "last_checkpoint")
    assert files == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


_KILLED_MID_WRITE = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from model_utils import load_cfg, register_ion_synthetic
from ion_d2.engine import IONTrainer
names = register_ion_synthetic({root!r}, num_train=4, num_val=1, seed=3, name_prefix="ckfiles")
cfg = load_cfg({tiny!r})
cfg.DATASETS.TRAIN, cfg.DATASETS.TEST, cfg.OUTPUT_DIR = (names[0],), (), {out!r}
trainer = IONTrainer(cfg)
def killed_mid_write(obj, f, *args, **kwargs):
    f.write(b"PK\\x03\\x04" + b"\\0" * 1000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = killed_mid_write
trainer.checkpointer.save("model_0000019", iteration=19)
"""


def test_a_process_killed_mid_checkpoint_leaves_no_partial_checkpoint(slice_names, tmp_path):
    root, _ = slice_names
    script = _KILLED_MID_WRITE.format(
        tests=os.path.dirname(os.path.abspath(__file__)), root=root, tiny=TINY, out=str(tmp_path)
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env)
    assert proc.returncode == -9
    assert [n for n in os.listdir(tmp_path) if ".pth" in n] == ["model_0000019.pth.partial"]


def test_files_holding_no_weights_are_named_with_what_they_hold(tmp_path):
    folder = str(tmp_path)
    cv2.imwrite(os.path.join(folder, "image.png"), np.zeros((8, 8, 3), np.uint8))
    os.rename(os.path.join(folder, "image.png"), os.path.join(folder, "image.pkl"))
    torch.save(torch.zeros(3, 4), os.path.join(folder, "tensor.pth"))
    torch.save({"iteration": 3}, os.path.join(folder, "iteration.pth"))
    torch.save(build_model(load_cfg(TINY)), os.path.join(folder, "model.pth"))
    expected = "expected a dict with 'model' \\(a state dict"
    files = {
        "image.pkl": r"is not a pickle \(a PNG image, \d+ bytes\)",
        "tensor.pth": rf"is not a checkpoint: it holds a Tensor of shape \(3, 4\); {expected}",
        "iteration.pth": r"is not a checkpoint: it holds a dict without weights \(keys: "
        rf"'iteration'\); {expected}",
        "model.pth": r"is not a checkpoint: it holds pickled Python objects \(detectron2\."
        r".*\), not only tensors \(save model.state_dict\(\), not the model\)",
    }
    for name, what in files.items():
        path = os.path.join(folder, name)
        with pytest.raises(ValueError, match=rf"^{path} {what}"):
            IONCheckpointer(build_model(load_cfg(TINY))).load(path)
        cfg = load_cfg(TINY)
        cfg.MODEL.WEIGHTS = path
        with pytest.raises(ValueError, match=rf"^(MODEL.WEIGHTS )?{path} {what}"):
            IONPredictor(cfg)


def _upstream_load(self, path, *args, **kwargs):
    # DetectionCheckpointer.load of upstream Detectron2 (facebookresearch/detectron2 main,
    # detectron2/checkpoint/detection_checkpoint.py) without its DistributedDataParallel branch:
    # v0.6 has no _parsed_url_during_load. It resets the attribute only when loading succeeds.
    assert self._parsed_url_during_load is None
    logging.getLogger(DetectionCheckpointer.__module__).info(
        "[DetectionCheckpointer] Loading from {} ...".format(path)
    )
    if path:
        parsed_url = urlparse(path)
        self._parsed_url_during_load = parsed_url
        path = parsed_url._replace(query="").geturl()  # remove query from filename
        path = self.path_manager.get_local_path(path)
    ret = Checkpointer.load(self, path, *args, **kwargs)
    self._parsed_url_during_load = None  # reset to None
    return ret


def test_resume_skips_an_unreadable_newest_checkpoint_on_upstream_detectron2(tmp_path, monkeypatch):
    monkeypatch.setattr(DetectionCheckpointer, "_parsed_url_during_load", None, raising=False)
    monkeypatch.setattr(DetectionCheckpointer, "load", _upstream_load)
    model = build_model(load_cfg(TINY))
    IONCheckpointer(model, save_dir=str(tmp_path)).save("model_0000001", iteration=1)
    final = (tmp_path / "model_0000001.pth").read_bytes()
    (tmp_path / "model_final.pth").write_bytes(final[: len(final) // 3])
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    resumed = build_model(load_cfg(TINY))
    checkpointer = IONCheckpointer(resumed, save_dir=str(tmp_path))
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 1
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    # The checkpointer loads again after a failed load.
    with pytest.raises(ValueError, match="is truncated"):
        checkpointer.load(str(tmp_path / "model_final.pth"))
    checkpointer.load(str(tmp_path / "model_0000001.pth"))


def _torch_save_on_a_full_disk(obj, f, *args, **kwargs):
    f.write(b"PK\x03\x04" + b"\0" * 1000)
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        # What torch.save raises then (its zip writer's end-of-file check), the OSError as
        # its context.
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")


def test_a_full_disk_is_named_with_the_file_being_written(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _torch_save_on_a_full_disk)
    path = tmp_path / "model_0000003.pth"
    full = rf"^\[Errno 28\] No space left on device while writing {path} "
    with pytest.raises(OSError, match=full) as e:
        IONCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path)).save("model_0000003")
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


_FILL_A_SMALL_DISK = """
import torch
from ion_d2.engine.checkpoint import IONCheckpointer
IONCheckpointer(torch.nn.Linear(1000, 1000), save_dir={disk!r}).save("model_0000001")
"""


def test_a_real_full_disk_is_the_last_line_of_the_error(tmp_path):
    # A 1 MiB tmpfs in a user namespace (as test_fault_injection's full-disk test) and a 4 MB
    # checkpoint: the traceback's last line names the disk and the file.
    disk = tmp_path / "disk"
    disk.mkdir()
    script = textwrap.dedent(_FILL_A_SMALL_DISK.format(disk=str(disk)))
    mount = f'mount -t tmpfs -o size=1m tmpfs "{disk}" && exec "$0" -c "$1"'
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    try:
        proc = subprocess.run(
            cmd + [sys.executable, script], env=env, capture_output=True, text=True, timeout=120
        )
    except OSError:
        pytest.skip("needs `unshare` to mount a small tmpfs")
    if proc.returncode != 0 and "Traceback" not in proc.stderr:
        pytest.skip(f"needs `unshare --user --map-root-user --mount`: {proc.stderr[:300]}")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert last.startswith(
        f"OSError: [Errno 28] No space left on device while writing {disk}/model_0000001.pth "
    ), last
