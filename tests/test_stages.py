"""Section 4.1's two stages from one config (ion_d2.engine.stages, SOLVER.ION_STAGE2), and
the one loop that runs them (ion_d2.engine.trainer.train_stages) under train_net.py and
train_and_evaluate. A fresh run of train_net.py as a command: test_train_net_cli.py."""

import json
import os
import shutil

import pytest
import torch
from detectron2.data import MetadataCatalog
from model_utils import ion_cfg, load_cfg, load_script, synthetic_slice

from ion_d2.engine import train_and_evaluate
from ion_d2.engine.stages import training_stages

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(REPO, "configs", "ION_VGG16_tiny_cpu.yaml")


def test_one_stage_unless_enabled():
    cfg = ion_cfg()
    assert cfg.SOLVER.ION_STAGE2.ENABLED is False
    assert training_stages(cfg) == [cfg]


def test_stage_2_is_stage_1_with_the_stage_2_keys():
    cfg = load_cfg(os.path.join(REPO, "configs", "ION_VGG16_VOC0712_stage1.yaml"))
    cfg.SOLVER.ION_STAGE2.ENABLED = True
    cfg.OUTPUT_DIR = "runs/x"
    first, second = training_stages(cfg)
    assert first.OUTPUT_DIR == os.path.join("runs/x", "stage1")
    assert second.OUTPUT_DIR == os.path.join("runs/x", "stage2")
    assert second.MODEL.WEIGHTS == os.path.join("runs/x", "stage1", "model_final.pth")
    # Section 4.1's stages: 40k iterations, conv1-conv5 frozen, 5e-3 -> 1e-4; then 100k,
    # conv1-conv2 frozen, 1e-3 -> 1e-5.
    assert (first.SOLVER.MAX_ITER, first.MODEL.BACKBONE.FREEZE_AT) == (40000, 5)
    assert (first.SOLVER.BASE_LR, first.SOLVER.ION_END_LR) == (5e-3, 1e-4)
    assert (second.SOLVER.MAX_ITER, second.MODEL.BACKBONE.FREEZE_AT) == (100000, 2)
    assert (second.SOLVER.BASE_LR, second.SOLVER.ION_END_LR) == (1e-3, 1e-5)
    # Stage 1 is the config itself; each stage's stored config trains that stage alone.
    assert first.MODEL.WEIGHTS == cfg.MODEL.WEIGHTS
    for stage in (first, second):
        assert stage.SOLVER.ION_STAGE2.ENABLED is False and stage.is_frozen()
    assert cfg.OUTPUT_DIR == "runs/x" and cfg.SOLVER.ION_STAGE2.ENABLED  # not mutated


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "'WarmupMultiStepLR'"),
        ("SOLVER.ION_STAGE2.MAX_ITER", 0, "MAX_ITER must be >= 1"),
    ],
)
def test_stage_2_that_could_not_act_is_refused(key, value, message):
    cfg = load_cfg(os.path.join(REPO, "configs", "ION_VGG16_VOC0712_stage1.yaml"))
    cfg.merge_from_list(["SOLVER.ION_STAGE2.ENABLED", True, key, value])
    with pytest.raises(ValueError, match=message):
        training_stages(cfg)


def _evaluations(folder):
    """The records of evaluations in ``folder``'s metrics.json (those with an AP)."""
    with open(os.path.join(folder, "metrics.json")) as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if "bbox/AP" in r]


def _observed(out):
    """Per stage of the run in ``out``: (its final iteration, its evaluations), its final
    checkpoint's time, its final weights."""
    seen = {}
    for stage in ("stage1", "stage2"):
        final = os.path.join(out, stage, "model_final.pth")
        checkpoint = torch.load(final, map_location="cpu", weights_only=False)
        seen[stage] = (checkpoint["iteration"], len(_evaluations(os.path.join(out, stage))))
        seen[stage + " time"] = os.path.getmtime(final)
        seen[stage + " weights"] = checkpoint["model"]
    return seen


def test_train_net_and_train_and_evaluate_follow_one_rule_on_a_resumed_two_stage_run(
    tmp_path, monkeypatch
):
    """Both run train_stages: resumed, an interrupted stage 1 trains on and is not evaluated,
    stage 2 trains from its weights and is evaluated once at its end (with TEST.AUG's TTA);
    run again, neither stage trains and stage 2 alone is evaluated again. (A fresh two-stage
    run: test_train_net_cli.py.)"""
    train_net = load_script("train_net.py")
    # default_setup and setup_logger would attach file loggers to the test process.
    monkeypatch.setattr(train_net, "default_setup", lambda cfg, args: None)
    monkeypatch.setattr(train_net, "setup_logger", lambda *args, **kwargs: None)
    with synthetic_slice(
        str(tmp_path / "data"), num_train=2, num_val=1, seed=5, name_prefix="rule"
    ) as (train, val):
        opts = {
            "DATASETS.TRAIN": (train,),
            "DATASETS.TEST": (val,),
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES": MetadataCatalog.get(train).num_sem_seg_classes,
            "INPUT.MIN_SIZE_TEST": 64,
            "SOLVER.MAX_ITER": 2,
            "SOLVER.CHECKPOINT_PERIOD": 1,
            "SOLVER.ION_STAGE2.ENABLED": True,
            "SOLVER.ION_STAGE2.MAX_ITER": 1,
            "SOLVER.ION_STAGE2.FREEZE_AT": 2,
            "TEST.AUG.ENABLED": True,
            "TEST.AUG.MIN_SIZES": (64,),
            "TEST.AUG.MAX_SIZE": 128,
        }
        cfg = load_cfg(TINY, opts)
        cfg.OUTPUT_DIR = str(tmp_path / "prepared")
        # Stage 1 interrupted after its first iteration's checkpoint, stage 2 not begun (its
        # test set left out, which the run folder's check ignores: no evaluation here).
        stage1 = training_stages(cfg)[0].clone()
        stage1.defrost()
        stage1.DATASETS.TEST = ()
        train_and_evaluate(stage1)
        os.remove(os.path.join(stage1.OUTPUT_DIR, "model_final.pth"))
        with open(os.path.join(stage1.OUTPUT_DIR, "last_checkpoint"), "w") as f:
            f.write("model_0000000.pth")

        def by_train_net(out):
            flat = [str(x) for item in {**opts, "OUTPUT_DIR": out}.items() for x in item]
            args = train_net.argument_parser().parse_args(
                ["--config-file", TINY, "--resume", *flat]
            )
            return train_net.main(args)

        def by_train_and_evaluate(out):
            run = cfg.clone()
            run.OUTPUT_DIR = out
            return train_and_evaluate(run, resume=True)[1]

        seen = {}
        for name, entry_point in (("train_net", by_train_net), ("api", by_train_and_evaluate)):
            out = str(tmp_path / name)
            shutil.copytree(stage1.OUTPUT_DIR, os.path.join(out, "stage1"))
            results = [entry_point(out)]
            first = _observed(out)
            results.append(entry_point(out))
            again = _observed(out)
            # Stage 1 trained on to its end (iteration 1) and was not evaluated; stage 2 (one
            # iteration) was evaluated once, and once more when run again, where neither stage
            # trained.
            assert (first["stage1"], first["stage2"]) == ((1, 0), (0, 1)), name
            assert (again["stage1"], again["stage2"]) == ((1, 0), (0, 2)), name
            assert [again[k] == first[k] for k in ("stage1 time", "stage2 time")] == [True] * 2
            # Stage 2 (FREEZE_AT 2) started from stage 1's final weights.
            w1, w2 = first["stage1 weights"], first["stage2 weights"]
            assert torch.equal(w1["backbone.conv2_2.weight"], w2["backbone.conv2_2.weight"])
            assert not torch.equal(w1["backbone.conv4_1.weight"], w2["backbone.conv4_1.weight"])
            seen[name] = ([sorted(r or {}) for r in results], w2)
        # Both returned the same results each time (with TTA: COCO's and, the bundled data naming
        # context pairs, ContextPairEvaluator's), and trained the same weights.
        tasks = ["bbox", "bbox_TTA", "context_pairs", "context_pairs_TTA"]
        assert seen["train_net"][0] == seen["api"][0] == [tasks] * 2
        a, b = seen["train_net"][1], seen["api"][1]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
