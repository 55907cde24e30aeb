"""The accuracy gate's decision (benchmarks/accuracy_gate.py), on fabricated runs: training is
what `make gate` itself does and takes minutes."""

import json
import math
import os
import types

import pytest
from model_utils import load_script

gate = load_script("benchmarks/accuracy_gate.py")


def _fake_runs(monkeypatch, ap_by_model_and_seed):
    def run_one(args, model, seed):
        ap = ap_by_model_and_seed[model][seed]
        return {"AP": ap, "APs": ap / 2, "AP_context": ap - 1}

    monkeypatch.setattr(gate, "run_one", run_one)


BASE = {"baseline": {1: 16.0, 2: 17.0, 3: 18.0}, "ion": {1: 32.0, 2: 34.0, 3: 33.0}}


def _shifted(model, delta):
    runs = {m: dict(v) for m, v in BASE.items()}
    runs[model] = {s: ap + delta for s, ap in runs[model].items()}
    return runs


def test_schedule_is_the_demo_schedule_shortened():
    opts = dict(zip(*[iter(gate.schedule_opts(400, 3))] * 2))
    assert opts["SEED"] == "3" and opts["SOLVER.MAX_ITER"] == "400"
    assert opts["SOLVER.WARMUP_ITERS"] == "20"  # 5 %, as the demo's 50 of 1000
    assert opts["SOLVER.CHECKPOINT_PERIOD"] == "400"


def test_summary_mean_spread_and_gain(monkeypatch, tmp_path):
    _fake_runs(monkeypatch, BASE)
    ref = tmp_path / "ref.json"
    argv = ["--output-dir", str(tmp_path), "--reference", str(ref), "--write-reference"]
    assert gate.main(argv) == 0
    summary = json.loads(ref.read_text())["summary"]
    assert summary["ion"]["AP"] == pytest.approx([33.0, 1.0])
    assert summary["baseline"]["APs"] == pytest.approx([8.5, 0.5])
    assert summary["gain"]["AP"][0] == pytest.approx(16.0)
    assert summary["ion"]["per_seed_AP"] == [32.0, 34.0, 33.0]


@pytest.mark.parametrize(
    "model, delta, passes",
    [
        ("ion", 0.0, True),
        ("ion", +3.0, True),
        ("ion", -0.9, True),  # within the floor (1 AP) and 2 sd of a difference of means
        ("ion", -1.7, False),  # ION's sd 1.0: allowed 2 * 1.0 * sqrt(2/3) = 1.63
        ("baseline", -1.8, False),  # baseline's sd is 1.0 too
    ],
)
def test_gate_fails_only_when_a_mean_drops_beyond_its_noise(
    monkeypatch, tmp_path, capsys, model, delta, passes
):
    ref = tmp_path / "ref.json"
    _fake_runs(monkeypatch, BASE)
    common = ["--output-dir", str(tmp_path), "--reference", str(ref)]
    gate.main(common + ["--write-reference"])
    _fake_runs(monkeypatch, _shifted(model, delta))
    assert gate.main(common) == (0 if passes else 1)
    out = capsys.readouterr().out
    assert ("GATE PASSED" in out) == passes
    if not passes:
        assert f"GATE FAILED: {model} AP" in out


def test_allowed_drop_formula():
    reference = {"seeds": [1, 2, 3, 4], "summary": {"ion": {"AP": [30.0, 2.0]}}}
    allowed = 2.0 * 2.0 * math.sqrt(2.0 / 4)
    summary = {"ion": {"AP": [30.0 - allowed + 0.01, 0.0]}}
    assert gate.compare(summary, reference, sigmas=2.0, floor=1.0) == []
    summary = {"ion": {"AP": [30.0 - allowed - 0.01, 0.0]}}
    assert len(gate.compare(summary, reference, sigmas=2.0, floor=1.0)) == 1


def test_reference_of_another_schedule_is_refused(monkeypatch, tmp_path):
    _fake_runs(monkeypatch, BASE)
    ref = tmp_path / "ref.json"
    common = ["--output-dir", str(tmp_path), "--reference", str(ref)]
    gate.main(common + ["--write-reference", "--iters", "400"])
    with pytest.raises(SystemExit, match="measured at 400 iterations, this run at 200"):
        gate.main(common + ["--iters", "200"])


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC

processor\t: 1
model name\t: another processor
"""


def test_machine_names_the_first_processor_and_torch(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    where = gate.machine(str(info))
    assert where.startswith("AMD EPYC (family 25, model 17), ")
    assert "another processor" not in where
    assert where.endswith(f"torch {gate.importlib.metadata.version('torch')}")
    assert gate.machine(str(tmp_path / "missing")).startswith("unknown processor, ")


def test_summary_records_the_machine_and_a_reference_of_another_is_pointed_out(
    monkeypatch, tmp_path, capsys
):
    _fake_runs(monkeypatch, BASE)
    ref = tmp_path / "ref.json"
    common = ["--output-dir", str(tmp_path), "--reference", str(ref)]
    monkeypatch.setattr(gate, "machine", lambda: "processor A")
    gate.main(common + ["--write-reference"])
    assert json.loads(ref.read_text())["machine"] == "processor A"
    assert json.loads((tmp_path / "summary.json").read_text())["machine"] == "processor A"
    assert gate.main(common) == 0
    out = capsys.readouterr().out
    assert "machine: processor A" in out and "reference was measured on" not in out
    monkeypatch.setattr(gate, "machine", lambda: "processor B")
    assert gate.main(common) == 0
    assert "the reference was measured on processor A" in capsys.readouterr().out


def test_each_pair_is_gated_against_its_own_reference(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gate, "BENCHMARKS", str(tmp_path))
    assert gate.reference_path("vgg16") == str(tmp_path / "accuracy_gate_reference.json")
    resnet = tmp_path / "accuracy_gate_reference_r50_fpn.json"
    assert gate.reference_path("r50_fpn") == str(resnet)
    common = ["--output-dir", str(tmp_path), "--pair", "r50_fpn"]
    _fake_runs(monkeypatch, BASE)
    assert gate.main(common) == 0  # no reference yet: reported
    assert "No reference for the pair 'r50_fpn'" in capsys.readouterr().out
    assert gate.main(common + ["--write-reference"]) == 0 and resnet.exists()
    assert not (tmp_path / "accuracy_gate_reference.json").exists()
    _fake_runs(monkeypatch, _shifted("ion", -1.7))
    assert gate.main(common) == 1
    assert "GATE FAILED: ion AP" in capsys.readouterr().out


def test_worker_imports_the_code_roots_ion_d2(monkeypatch, tmp_path):
    """The worker's PYTHONPATH names the code root even when it is this checkout (a worktree
    sharing a venv would otherwise train the editable install's ion_d2), and a run whose worker
    imported ion_d2 from elsewhere is refused."""
    seen = {}

    def fake_run(cmd, env, stdout, stderr, cwd):
        seen["pythonpath"] = env["PYTHONPATH"]
        out = cmd[cmd.index("--worker") + 2]
        os.makedirs(out, exist_ok=True)
        imported = os.path.join(str(tmp_path / "elsewhere"), "ion_d2")
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(
                {"AP": 1.0, "APs": 1.0, "AP_context": 1.0, "seconds": 1.0, "ion_d2": imported}, f
            )
        return types.SimpleNamespace(returncode=0)

    monkeypatch.setattr(gate.subprocess, "run", fake_run)
    args = types.SimpleNamespace(
        pair="vgg16",
        iters=4,
        opts=[],
        output_dir=str(tmp_path / "gate"),
        retrain=True,
        code_root=os.path.abspath(gate.REPO),
    )
    with pytest.raises(SystemExit, match=r"imported ion_d2 from .*elsewhere.*not from"):
        gate.run_one(args, "ion", 1)
    assert seen["pythonpath"].split(os.pathsep)[0] == args.code_root
    gate.check_imported_from(os.path.join(args.code_root, "ion_d2"), args.code_root)
