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
