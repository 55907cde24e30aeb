"""train_net.py as a user runs it: train, resume an interrupted run, evaluate only."""

import json
import os
import subprocess
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")


def _run(tmp_path, *overrides, flags=()):
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
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _iterations(tmp_path):
    with open(tmp_path / "out" / "metrics.json") as f:
        return [json.loads(line)["iteration"] for line in f if line.strip()]


def test_train_resume_and_eval_only(tmp_path):
    # An "interrupted" run: 2 of 4 iterations, checkpointed at iteration 2.
    _run(tmp_path, "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()")
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")
    # --resume continues from the last checkpoint instead of starting over.
    log = _run(tmp_path, "SOLVER.MAX_ITER", "4", "DATASETS.TEST", "()", flags=["--resume"])
    assert "Starting training from iteration 2" in log
    assert max(_iterations(tmp_path)) == 3
    # --eval-only with the stock COCO evaluator on the bundled val split.
    weights = str(tmp_path / "out" / "model_final.pth")
    log = _run(tmp_path, "MODEL.WEIGHTS", weights, flags=["--eval-only"])
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
