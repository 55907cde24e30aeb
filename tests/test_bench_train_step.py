"""benchmarks/bench_train_step.py (`make bench`): what it reports, not how fast it runs."""

import re

from model_utils import load_script


def test_reports_each_models_step_and_the_ratio_with_its_verdict(capsys):
    bench = load_script("benchmarks/bench_train_step.py")
    assert bench.main(["--rounds", "2", "--batches", "1", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    seconds = {}
    for name in ("baseline", "ion"):
        match = re.search(
            rf"^  {name}\s+([0-9.]+) s per step \(median; rounds ([0-9., ]+)\)", out, re.M
        )
        assert match, out
        rounds = [float(v) for v in match.group(2).split(", ")]
        assert len(rounds) == 2 and all(v > 0 for v in rounds)
        seconds[name] = float(match.group(1))
    verdict = re.search(r"^  (PASS|FAIL)  ION / baseline ([0-9.]+)x \(<= 1.35", out, re.M)
    assert verdict, out
    ratio = seconds["ion"] / seconds["baseline"]
    assert abs(float(verdict.group(2)) - ratio) <= 0.01
    assert verdict.group(1) == ("PASS" if float(verdict.group(2)) <= 1.35 else "FAIL")


def test_times_the_resnet_pair_in_training_and_inference_against_issue_25s_targets(capsys):
    bench = load_script("benchmarks/bench_train_step.py")
    assert bench.PAIRS["r50_fpn"] == load_script("benchmarks/accuracy_gate.py").PAIRS["r50_fpn"]
    args = ["--pair", "r50_fpn", "--inference", "--rounds", "1", "--batches", "1"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    for config, _ in bench.PAIRS["r50_fpn"].values():
        assert config in out
    for mode, unit, target in (("training", "step", 1.3), ("inference", "image", 1.2)):
        section = out.split(f" {mode}:\n")[1]
        seconds = {}
        for name in ("baseline", "ion"):
            match = re.search(rf"^  {name}\s+([0-9.]+) s per {unit} \(median", section, re.M)
            assert match, out
            seconds[name] = float(match.group(1))
        verdict = re.search(
            rf"^  (PASS|FAIL)  ION / baseline ([0-9.]+)x \(<= {target}, issue 25", section, re.M
        )
        assert verdict, out
        assert abs(float(verdict.group(2)) - seconds["ion"] / seconds["baseline"]) <= 0.01
