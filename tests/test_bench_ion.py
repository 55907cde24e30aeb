"""benchmarks/bench_ion.py (`make bench`) at toy widths: what it reports, not how fast it runs."""

import json
import os

import pytest
from model_utils import load_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ["fast_rcnn", "ion_whh_learned", "ion_whh_removed_box_voting"]
HEIGHT, WIDTH, PROPOSALS = 64, 96, 20
TINY = ["--tiny", "--height", str(HEIGHT), "--width", str(WIDTH), "--repeats", "1"]


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_ion.py")


@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench_ion.json"
    argv = TINY + ["--proposals", str(PROPOSALS), "--train-proposals", "50", "--no-memory"]
    argv += ["--variants", *VARIANTS, "--output-json", str(path)]
    returned = bench.main(argv)
    with open(path) as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(returned))
    return written


def test_every_stage_of_every_variant_in_both_modes(bench, report):
    assert [(s["mode"], s["proposals"]) for s in report["inference"]] == [
        ("precomputed", PROPOSALS),
        ("rpn", PROPOSALS),
    ]
    pools = ["pool conv3", "pool conv4", "pool conv5", "pool context"]
    rows = bench.STAGES_BEFORE_POOL + pools + bench.STAGES_AFTER_POOL
    for setting in report["inference"]:
        assert list(setting["variants"]) == VARIANTS
        for name, res in setting["variants"].items():
            stages = res["stages"]
            assert list(stages) == rows
            assert all(v is None or v >= 0 for v in stages.values()), (name, stages)
            assert sum(v for v in stages.values() if v is not None) <= res["total"] * (1 + 1e-9)
            assert res["images_per_s"] == pytest.approx(1 / res["total"])
            assert res["trunk_input"] == [HEIGHT, WIDTH]
        base, ion, voting = (setting["variants"][n]["stages"] for n in VARIANTS)
        # Modules a variant lacks are "-", those it has are timed.
        assert base["context"] is None and base["pool conv3"] is None and base["reduction"] is None
        assert base["round 2"] is None and ion["round 2"] is None and voting["round 2"] > 0
        assert ion["context"] > 0 and ion["reduction"] > 0 and ion["pool context"] > 0
        assert (base["rpn"] is None) == (setting["mode"] == "precomputed")
        assert setting["variants"]["fast_rcnn"]["ratio_to_baseline"] == 1.0
    rpn = report["inference"][1]["variants"]
    assert all(rpn[n]["rpn_proposals"] == PROPOSALS for n in VARIANTS)


def test_flops_match_a_hand_count(report):
    res = report["inference"][0]["variants"]
    # VGG16 conv1_1 ... conv5_3 at 1/8 width, 3x3 convs, a 2x2 max pool before each stage.
    flops, c_in = 0, 3
    for stage, (channels, convs) in enumerate([(8, 2), (16, 2), (32, 3), (64, 3), (64, 3)]):
        cells = (HEIGHT >> stage) * (WIDTH >> stage)
        for _ in range(convs):
            flops += 2 * cells * channels * c_in * 9
            c_in = channels
    for name in VARIANTS:
        assert res[name]["gflop"]["trunk"] * 1e9 == pytest.approx(flops)
    # The baseline's fc6/fc7: 64 x 7 x 7 -> 64 -> 64 for each of the 20 boxes.
    assert res["fast_rcnn"]["gflop"]["fc6/fc7"] * 1e9 == pytest.approx(
        2 * PROPOSALS * (64 * 49 * 64 + 64 * 64)
    )
    # The same IRNN with Whh learned and removed: 2 layers x 4 directions x one 16x16 matvec per
    # conv5 cell (4 x 6 cells) apart.
    recurrence = 2 * 4 * 2 * 16 * 16 * (HEIGHT // 16) * (WIDTH // 16)
    learned = res["ion_whh_learned"]["gflop"]["context"]
    removed = res["ion_whh_removed_box_voting"]["gflop"]["context"]
    assert (learned - removed) * 1e9 == pytest.approx(recurrence)
    # Box voting's second round runs the pooler's reduction and the head on the same boxes again.
    voting = res["ion_whh_removed_box_voting"]["gflop"]
    assert voting["round 2"] == pytest.approx(
        voting["reduction"] + voting["fc6/fc7"] + voting["predictor"]
    )


def test_training_step_and_targets(report):
    training = report["training"]["variants"]
    # Box voting acts at inference only: its training step is Whh removed's, not timed twice.
    assert list(training) == ["fast_rcnn", "ion_whh_learned"]
    assert training["fast_rcnn"]["ratio_to_baseline"] == 1.0
    assert "loss_sem_seg" in training["ion_whh_learned"]["losses"]
    assert all(r["seconds"] > 0 for r in training.values())
    targets = {t["target"]: t for t in report["targets"]}
    learned = targets["ION inference, Whh learned / baseline (precomputed, 20)"]
    assert (
        learned["value"]
        == report["inference"][0]["variants"]["ion_whh_learned"]["ratio_to_baseline"]
    )
    assert learned["pass"] == (learned["value"] <= 1.4)
    # Whh removed alone was not run: its targets are not evaluated.
    assert targets["ION inference, Whh removed / baseline (rpn, 20)"]["pass"] is None
    assert report["machine"]["threads"] == 2 and report["settings"]["tiny"] is True


def test_peak_memory_probe_runs_in_a_fresh_process(bench):
    args = bench.parse_args(TINY)
    mib = bench.measure_memory(args, "ion_whh_removed", "precomputed", PROPOSALS)
    assert 0 < mib < 1024


def test_quick_defaults_give_way_to_explicit_options(bench):
    quick = bench.parse_args(["--quick"])
    assert (quick.height, quick.width, quick.proposals, quick.repeats) == (300, 500, [100], 1)
    assert quick.variants == bench.QUICK_VARIANTS and quick.train_proposals == 100
    full = bench.parse_args([])
    assert (full.height, full.width, full.proposals, full.repeats) == (600, 1000, [1000, 2000], 3)
    assert full.variants == list(bench.VARIANTS) and full.train_proposals == 2000
    assert bench.parse_args(["--quick", "--proposals", "7", "--repeats", "2"]).proposals == [7]


@pytest.mark.parametrize("proposals", [1000, 2000])
def test_min_score_variant_runs_round_2_on_its_measured_share(bench, proposals):
    """ "vote >=.001" times round 2 on the share of proposals RESCORE_MIN_SCORE 0.001 kept on the
    demo's model (random weights would pass all): RESCORE_TOPK is that share of each setting's
    proposals; the other voting variants keep theirs."""
    args = bench.parse_args(["--tiny"])
    name = "ion_whh_removed_box_voting_min_score"
    cfg = bench.build_cfg(name, "rpn", proposals, args)
    share = bench.VARIANTS[name].rescore_share
    assert 0.40 < share < 0.41
    assert cfg.MODEL.ION.BOX_VOTING.ENABLED
    assert cfg.MODEL.ION.BOX_VOTING.RESCORE_TOPK == round(share * proposals)
    every = bench.build_cfg("ion_whh_removed_box_voting", "rpn", proposals, args)
    assert every.MODEL.ION.BOX_VOTING.RESCORE_TOPK == 0


def test_against_another_checkout_alternates_training_steps(bench, capsys):
    """``--against DIR`` runs the training step only, in a process per checkout that imports
    that checkout's ion_d2 (checked), alternated, and prints both and the ratio of ION's steps;
    here the other checkout is this one."""
    argv = TINY + ["--train-proposals", "30", "--variants", "fast_rcnn", "ion_whh_learned"]
    result = bench.main(argv + ["--against", REPO, "--alternations", "2"])
    out = capsys.readouterr().out
    for name in ("this", "other"):
        assert set(result["seconds"][name]) == {"fast_rcnn", "ion_whh_learned"}
        assert all(len(v) == 2 and min(v) > 0 for v in result["seconds"][name].values())
        assert f"  {name:<6} baseline " in out
    assert "whh learned's step, this / other: " in out
    assert bench._without_against(["--against", "x", "--tiny", "--alternations=2"]) == ["--tiny"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--against", REPO, "--no-train"])


def test_no_inference_times_the_training_step_only(bench, tmp_path):
    argv = TINY + ["--train-proposals", "30", "--variants", "fast_rcnn", "ion_whh_learned"]
    report = bench.main(argv + ["--no-inference", "--output-json", str(tmp_path / "r.json")])
    assert report["inference"] == []
    assert list(report["training"]["variants"]) == ["fast_rcnn", "ion_whh_learned"]
    assert report["machine"]["ion_d2"] == os.path.join(REPO, "ion_d2")


def test_profile_prints_each_variants_training_operators(bench, tmp_path, capsys):
    argv = TINY + ["--train-proposals", "30", "--variants", "fast_rcnn", "ion_whh_learned"]
    bench.main(argv + ["--no-inference", "--profile", "--output-json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    for label in ("baseline", "whh learned"):
        assert f"== training step of {label}, by self CPU time" in err
    assert "aten::convolution_backward" in err
