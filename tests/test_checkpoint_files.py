"""
Issue 19's checkpoint faults: a file that is not a checkpoint is refused naming it and what it
is; ``--resume`` falls back to the newest readable checkpoint; no file under a checkpoint's name
is ever partial, whether the write fails (a full disk) or the process is killed mid-write.
"""

import errno
import logging
import os
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch
from model_utils import load_cfg, synthetic_slice

from ion_d2.engine import IONTrainer
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
