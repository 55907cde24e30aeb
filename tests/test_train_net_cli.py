"""train_net.py as a user runs it: train, resume an interrupted run, evaluate only."""

import json
import math
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
    # --resume with a longer schedule trains the finished run on, saying what changed.
    out = tmp_path / "out"
    longer = ("SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()")
    log = _run(tmp_path, *longer, flags=["--resume"])
    assert f"Resuming the run in {out} with another schedule: SOLVER.MAX_ITER: 4 -> 6" in log
    assert "Starting training from iteration 4" in log
    assert max(_iterations(tmp_path)) == 5
    # The folder holds a run of this config: another config is refused, naming the folder and
    # the key (the run-folder policy of train_and_evaluate), until --retrain moves it aside.
    other = longer + ("SOLVER.BASE_LR", "0.02")
    refused = _run(tmp_path, *other, flags=["--resume"], expect_failure=True)
    assert f"{out} holds a run of another config" in refused and "SOLVER.BASE_LR: " in refused
    _run(tmp_path, *other, flags=["--retrain"])
    assert [p.name.startswith("replaced_") for p in out.iterdir()].count(True) == 1
    assert max(_iterations(tmp_path)) == 5
    # --eval-only with the stock COCO evaluator on the bundled val split; the run's stored
    # config stays the run's (Detectron2's default_setup writes the evaluation's there).
    stored = (out / "config.yaml").read_text()
    log = _run(tmp_path, "MODEL.WEIGHTS", str(out / "model_final.pth"), flags=["--eval-only"])
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    assert (out / "config.yaml").read_text() == stored


def _metrics(folder):
    with open(folder / "metrics.json") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_both_stages_of_section_4_1_in_one_command(tmp_path):
    """SOLVER.ION_STAGE2: stage 1 as configured, then stage 2 from its model_final.pth with the
    stage-2 keys; only stage 2 is evaluated; --resume skips a finished stage 1 instead of
    training it again (the rule of train_stages, test_stages.py)."""
    import torch

    run = (
        "SOLVER.ION_STAGE2.ENABLED", "True",
        "SOLVER.MAX_ITER", "2",
        "SOLVER.BASE_LR", "0.004",
        "SOLVER.ION_STAGE2.MAX_ITER", "3",
        "SOLVER.ION_STAGE2.BASE_LR", "0.002",
        "SOLVER.ION_STAGE2.FREEZE_AT", "2",
    )  # fmt: skip
    log = _run(tmp_path, *run)
    out = tmp_path / "out"
    stage1, stage2 = out / "stage1", out / "stage2"
    assert log.count("copypaste: AP,AP50,AP75,APs,APm,APl") == 1  # stage 2 alone evaluates
    assert not (stage1 / "inference").exists()
    # The training steps' records (the evaluation's come after them).
    m1 = [m for m in _metrics(stage1) if "lr" in m]
    m2 = [m for m in _metrics(stage2) if "lr" in m]
    assert m1[-1]["iteration"] == 1 and m2[-1]["iteration"] == 2
    # Each stage's LR decays exponentially from its BASE_LR to its end over its MAX_ITER
    # (IONExponentialLR, no warmup in the tiny preset): stage 1 1e-4 (Base-ION-VGG16.yaml),
    # stage 2 SOLVER.ION_STAGE2.END_LR's 1e-5; the records are of the last step.
    assert math.isclose(m1[-1]["lr"], 0.004 * (1e-4 / 0.004) ** (1 / 2), rel_tol=1e-6)
    assert math.isclose(m2[-1]["lr"], 0.002 * (1e-5 / 0.002) ** (2 / 3), rel_tol=1e-6)
    # Stage 2 starts from stage 1's weights: what it freezes (conv1, conv2) is stage 1's, what
    # it trains moved on.
    w1 = torch.load(stage1 / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    w2 = torch.load(stage2 / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    for key in ("backbone.conv1_1.weight", "backbone.conv2_2.weight"):
        assert torch.equal(w1[key], w2[key]), key
    for key in ("backbone.conv3_1.weight", "roi_heads.box_predictor.cls_score.weight"):
        assert not torch.equal(w1[key], w2[key]), key
    stored = (stage2 / "config.yaml").read_text()
    assert f"WEIGHTS: {stage1 / 'model_final.pth'}" in stored and "FREEZE_AT: 2" in stored
    # --resume: stage 1 is finished, so it is skipped; stage 2 (finished too) evaluates again,
    # as Detectron2's trainer does for a finished run.
    mtime = os.path.getmtime(stage1 / "model_final.pth")
    log = _run(tmp_path, *run, flags=["--resume"])
    assert f"{stage1} holds a finished run; not training it again." in log
    assert log.count("copypaste: AP,AP50,AP75,APs,APm,APl") == 1
    assert os.path.getmtime(stage1 / "model_final.pth") == mtime


def test_local_context_preset_trains_and_evaluates_its_pairs(tmp_path):
    """configs/ION_VGG16_synthetic_local.yaml as a user runs it (at a tiny width): train_net.py
    trains it on the bundled local-context data, then --eval-only reports COCO AP and the
    three context pairs, kite/bird included."""
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"))
    preset = os.path.join(REPO, "configs", "ION_VGG16_synthetic_local.yaml")
    out = tmp_path / "out"
    tiny = [
        "MODEL.ION.VGG16.WIDTH_MULT", "0.125",
        "MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM", "16",
        "MODEL.ION.SKIP_POOL.REDUCE_DIM", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
        "SOLVER.MAX_ITER", "2",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.WARMUP_ITERS", "1",
        "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", preset]
    train = subprocess.run(
        cmd + tiny + ["DATASETS.TEST", "()"], env=env, capture_output=True, text=True, timeout=600
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    # The preset's local-context branch trains (its own loss is logged).
    assert "loss_local_context" in train.stdout + train.stderr
    evaluate = subprocess.run(
        cmd + ["--eval-only"] + tiny + ["MODEL.WEIGHTS", str(out / "model_final.pth")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = evaluate.stdout + evaluate.stderr
    assert evaluate.returncode == 0, log[-3000:]
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    for pair in ("car/boat", "lamp/ball", "kite/bird"):
        assert f"{pair} right class" in log, log[-3000:]
