"""train_net.py as a user runs it: train, resume an interrupted run, evaluate only."""

import json
import os
import subprocess
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")


def _run(tmp_path, *overrides, flags=(), expect_failure=False):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", TINY, *flags]
    common = [
        "DATASETS.TRAIN",
        "('ion_synth_train',)",
        "DATASETS.TEST",
        "('ion_synth_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "6",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        "10",
        "INPUT.MIN_SIZE_TEST",
        "64",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(
        cmd + common + list(overrides), env=env, capture_output=True, text=True, timeout=600
    )
    if expect_failure:
        assert proc.returncode != 0
    else:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _iterations(tmp_path):
    with open(tmp_path / "out" / "metrics.json") as f:
        return [json.loads(line)["iteration"] for line in f if line.strip()]


def test_train_resume_and_eval_only(tmp_path):
    # A run of 4 iterations checkpointed at iteration 2, then "interrupted" there: its
    # last_checkpoint points back at the iteration-2 checkpoint.
    run = ("SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()")
    _run(tmp_path, *run)
    assert os.path.isfile(tmp_path / "out" / "model_0000001.pth")
    (tmp_path / "out" / "last_checkpoint").write_text("model_0000001.pth")
    # --resume continues from the last checkpoint instead of starting over.
    log = _run(tmp_path, *run, flags=["--resume"])
    assert "Starting training from iteration 2" in log
    assert max(_iterations(tmp_path)) == 3
    # The folder holds a run of this config: another config is refused, naming the key
    # (the run-folder policy of train_and_evaluate), until --retrain moves the run aside.
    other = ("SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()")
    refused = _run(tmp_path, *other, flags=["--resume"], expect_failure=True)
    assert "holds a run trained with another config" in refused and "SOLVER.MAX_ITER" in refused
    _run(tmp_path, *other, flags=["--retrain"])
    assert [p.name.startswith("replaced_") for p in (tmp_path / "out").iterdir()].count(True) == 1
    assert max(_iterations(tmp_path)) == 4
    # --eval-only with the stock COCO evaluator on the bundled val split.
    weights = str(tmp_path / "out" / "model_final.pth")
    log = _run(tmp_path, "MODEL.WEIGHTS", weights, flags=["--eval-only"])
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
