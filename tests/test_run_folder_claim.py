"""ion_d2.engine.run_folder: a run folder is claimed when a run starts, before its first
checkpoint; its config.yaml is written atomically and, when damaged, named as such; --resume
accepts a new schedule and nothing else."""

import logging
import os
import signal
import subprocess
import sys

import pytest

from ion_d2.config import get_ion_cfg
from ion_d2.engine import run_folder
from ion_d2.engine.run_folder import CONFIG_FILE, prepare_run_dir


def _cfg(output_dir, **solver):
    cfg = get_ion_cfg()
    cfg.OUTPUT_DIR = str(output_dir)
    for key, value in solver.items():
        setattr(cfg.SOLVER, key, value)
    return cfg


def _finished_run(folder, cfg):
    """A folder as a run of ``cfg`` leaves it after its first checkpoint."""
    run_folder.write_run_config(cfg)
    (folder / "last_checkpoint").write_text("model_final.pth")
    (folder / "model_final.pth").write_bytes(b"weights")


def test_another_config_is_refused_before_the_first_checkpoint(tmp_path):
    first = _cfg(tmp_path, BASE_LR=0.01)
    # Started and stopped before its first checkpoint (a claim this process holds is taken
    # again by it, so only other processes see the folder locked).
    prepare_run_dir(first)
    assert (tmp_path / CONFIG_FILE).read_text() == first.dump()
    second = _cfg(tmp_path, BASE_LR=0.02)
    with pytest.raises(ValueError) as refused:
        prepare_run_dir(second)
    assert f"{tmp_path} holds a run of another config" in str(refused.value)
    assert "SOLVER.BASE_LR: 0.01 -> 0.02" in str(refused.value)
    assert (tmp_path / CONFIG_FILE).read_text() == first.dump()  # the claim is kept
    # The same config resumes; --retrain moves the first run's config aside.
    prepare_run_dir(first, resume=True).release()
    prepare_run_dir(second, retrain=True).release()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("replaced_")]
    assert (aside / CONFIG_FILE).read_text() == first.dump()
    assert (tmp_path / CONFIG_FILE).read_text() == second.dump()


def test_a_second_live_run_is_refused_until_the_first_dies(tmp_path):
    cfg = _cfg(tmp_path)
    holder = (
        "import sys\n"
        "from ion_d2.config import get_ion_cfg\n"
        "from ion_d2.engine.run_folder import prepare_run_dir\n"
        "cfg = get_ion_cfg(); cfg.OUTPUT_DIR = sys.argv[1]\n"
        "claim = prepare_run_dir(cfg)\n"
        "print('claimed', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "claimed"
        # The same config, started again while the first one trains.
        with pytest.raises(RuntimeError) as refused:
            prepare_run_dir(cfg)
        message = str(refused.value)
        assert f"{tmp_path} is in use by another training run (pid {proc.pid} on " in message
        assert "choose another OUTPUT_DIR" in message
    finally:
        proc.send_signal(signal.SIGKILL)  # the kernel drops its lock, as after a crash
        proc.wait()
    prepare_run_dir(cfg).release()


def test_config_yaml_is_replaced_atomically(tmp_path, monkeypatch):
    first = _cfg(tmp_path, BASE_LR=0.01)
    run_folder.write_run_config(first)

    def crash(*args):
        raise OSError("killed")

    # A crash before the rename leaves the stored config whole, and no temporary file.
    monkeypatch.setattr(run_folder.os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        run_folder.write_run_config(_cfg(tmp_path, BASE_LR=0.02))
    assert (tmp_path / CONFIG_FILE).read_text() == first.dump()
    assert os.listdir(tmp_path) == [CONFIG_FILE]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "it is empty"),
        ("# only a comment\n", "it holds no YAML value, only comments"),
        ("MODEL: {DEVICE: cpu\n", "it is not YAML"),
        ("- MODEL\n- SOLVER\n", "it holds a list, not a config's mapping"),
        (None, "it lacks SOLVER, TEST, VERSION, VIS_PERIOD, which every Detectron2 config has"),
    ],
)
def test_a_damaged_config_yaml_is_named_as_damaged(tmp_path, text, problem):
    cfg = _cfg(tmp_path)
    _finished_run(tmp_path, cfg)
    if text is None:  # cut short after the last line before SOLVER
        dump = cfg.dump()
        text = dump[: dump.index("\nSOLVER:") + 1]
    (tmp_path / CONFIG_FILE).write_text(text)
    with pytest.raises(ValueError) as refused:
        prepare_run_dir(cfg)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / CONFIG_FILE} is damaged: {problem}")
    assert "differs" not in message and "--retrain" in message
    # --retrain moves the run and its damaged config aside.
    prepare_run_dir(cfg, retrain=True).release()
    assert (tmp_path / CONFIG_FILE).read_text() == cfg.dump()


def test_resume_accepts_a_new_schedule_and_logs_it(tmp_path, caplog):
    _finished_run(tmp_path, _cfg(tmp_path, MAX_ITER=100, STEPS=(60,)))
    longer = _cfg(tmp_path, MAX_ITER=200, STEPS=(60, 150))
    # Without resume, a run of another schedule would train from its first step.
    with pytest.raises(ValueError, match=r"(?s)SOLVER.MAX_ITER: 100 -> 200.*pass resume=True"):
        prepare_run_dir(longer)
    with caplog.at_level(logging.INFO, logger="ion_d2.engine.run_folder"):
        prepare_run_dir(longer, resume=True).release()
    assert (
        f"Resuming the run in {tmp_path} with another schedule: SOLVER.MAX_ITER: 100 -> 200; "
        "SOLVER.STEPS: [60] -> [60, 150]"
    ) in caplog.text
    assert (tmp_path / CONFIG_FILE).read_text() == longer.dump()
    # A key of the model or the data is still another run's, even with resume.
    other = _cfg(tmp_path, MAX_ITER=300)
    other.MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM = 64
    with pytest.raises(ValueError, match=r"HIDDEN_DIM: 512 -> 64") as refused:
        prepare_run_dir(other, resume=True)
    assert "only set the schedule" not in str(refused.value)


def test_resume_refuses_stage_1_trained_longer_under_a_trained_stage_2(tmp_path):
    from ion_d2.engine.run_folder import claim_run

    cfg = _cfg(tmp_path, MAX_ITER=100, LR_SCHEDULER_NAME="IONExponentialLR")
    cfg.SOLVER.ION_STAGE2.ENABLED = True
    claim_run(cfg).release()
    assert {p.name for p in tmp_path.iterdir()} >= {CONFIG_FILE, "stage1", "stage2"}
    (tmp_path / "stage2" / "last_checkpoint").write_text("model_final.pth")
    longer = cfg.clone()
    longer.SOLVER.MAX_ITER = 200
    with pytest.raises(ValueError, match="holds a run trained from its earlier final weights"):
        claim_run(longer, resume=True)
    # Nothing was written: each folder still stores the first config.
    assert "  MAX_ITER: 100\n" in (tmp_path / "stage1" / CONFIG_FILE).read_text()
    assert "  MAX_ITER: 100\n" in (tmp_path / CONFIG_FILE).read_text()
    # Stage 2 trained longer is fine.
    stage2_longer = cfg.clone()
    stage2_longer.SOLVER.ION_STAGE2.MAX_ITER = 200000
    claim_run(stage2_longer, resume=True).release()
    assert "MAX_ITER: 200000" in (tmp_path / "stage2" / CONFIG_FILE).read_text()
