#!/usr/bin/env python
"""
The accuracy gate (`make gate`): train the bundled Fast R-CNN baseline and ION configs with
several seeds on a short schedule, print mean and spread of AP (all, small, context classes)
per model and the ION - baseline gain, compare the means with the reference kept in
``benchmarks/accuracy_gate_reference.json`` and exit with status 1 when a mean falls below its
reference by more than the reference's noise allows.

Each run trains in its own process (``--worker``), so that no registry or RNG state leaks from
one run into the next, and writes ``result.json`` in its folder; a folder whose ``result.json``
was written by the same config is reused (``--retrain`` trains everything again).

The schedule is the demo's (``configs/ION_VGG16_synthetic.yaml``: exponential LR decay over
MAX_ITER, warm-up 5 % of it) shortened to ``--iters`` iterations (default 400); the "Accuracy
gate" section of docs/BENCHMARKS.md shows that it ranks code versions as the 1000-iteration demo
does.
"""

import argparse
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
# The pairs of configs it trains (``--pair``), each model a config file with overrides: the
# gate's (VGG16, compared with the reference); the ResNet comparison of the README (stock
# R50-FPN Faster R-CNN vs ION-R50-FPN, one from-scratch recipe); and context just outside the
# box (the local preset with MODEL.ION.LOCAL_CONTEXT off as "baseline" and on as "ion", on the
# local-context data). A pair with a reference file (reference_path) is gated against it
# (`make gate GATE_ARGS="--pair r50_fpn"` for the ResNet pair); one without is reported.
PAIRS = {
    "vgg16": {
        "baseline": ("FastRCNN_VGG16_synthetic.yaml", []),
        "ion": ("ION_VGG16_synthetic.yaml", []),
    },
    "r50_fpn": {
        "baseline": ("FasterRCNN_R50_FPN_synthetic.yaml", []),
        "ion": ("ION_R50_FPN_synthetic.yaml", []),
    },
    "local": {
        "baseline": (
            "ION_VGG16_synthetic_local.yaml",
            ["MODEL.ION.LOCAL_CONTEXT.IN_FEATURE", ""],
        ),
        "ion": ("ION_VGG16_synthetic_local.yaml", []),
    },
}
MODELS = PAIRS["vgg16"]
METRICS = ("AP", "APs", "AP_context")
DEFAULT_SEEDS = (1, 2, 3)
DEFAULT_ITERS = 400
CPUINFO = "/proc/cpuinfo"


def reference_path(pair: str) -> str:
    """
    The reference file of ``pair``: ``benchmarks/accuracy_gate_reference.json`` for the gate's
    VGG16 pair, ``benchmarks/accuracy_gate_reference_<pair>.json`` for another.
    """
    suffix = "" if pair == "vgg16" else f"_{pair}"
    return os.path.join(BENCHMARKS, f"accuracy_gate_reference{suffix}.json")


def schedule_opts(iters: int, seed: int) -> List[str]:
    """Config overrides for ``iters`` iterations of the demo's schedule, with ``seed``."""
    return [
        "SEED", str(seed),
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.WARMUP_ITERS", str(max(1, round(iters * 0.05))),
        "SOLVER.CHECKPOINT_PERIOD", str(iters),
        "TEST.EVAL_PERIOD", "0",
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------
# Worker: one training run, in its own process.
# ------------------------------------------------------------------------------------------
def run_worker(config_file: str, output_dir: str, opts: List[str]) -> None:
    from detectron2.data import MetadataCatalog
    from detectron2.utils.logger import setup_logger

    import ion_d2
    from ion_d2 import get_ion_cfg
    from ion_d2.engine import train_and_evaluate

    cfg = get_ion_cfg(config_file, opts)
    cfg.OUTPUT_DIR = output_dir
    cfg.freeze()
    os.makedirs(output_dir, exist_ok=True)
    setup_logger(output=output_dir)
    setup_logger(output=output_dir, name="ion_d2")
    start = time.perf_counter()
    _, results = train_and_evaluate(cfg, resume=True)
    bbox = results["bbox"]
    context_classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("context_classes", [])
    ctx = [bbox[f"AP-{c}"] for c in context_classes if f"AP-{c}" in bbox]
    out = {
        "AP": bbox["AP"],
        "AP50": bbox["AP50"],
        "APs": bbox["APs"],
        "AP_context": sum(ctx) / len(ctx) if ctx else float("nan"),
        # ContextPairEvaluator's, per context pair: "<a>/<b> found" and "<a>/<b> right class".
        "pairs": {
            k: v for k, v in results.get("context_pairs", {}).items() if not k.endswith("objects")
        },
        "seconds": time.perf_counter() - start,
        "ion_d2": os.path.dirname(os.path.abspath(ion_d2.__file__)),
        "config_dump": cfg.dump(),
    }
    with open(os.path.join(output_dir, "result.json"), "w") as f:
        json.dump(out, f, indent=1)


# ------------------------------------------------------------------------------------------
# Driver.
# ------------------------------------------------------------------------------------------
def run_one(args, model: str, seed: int) -> Dict[str, float]:
    config_name, model_opts = PAIRS[args.pair][model]
    config_file = os.path.join(args.code_root, "configs", config_name)
    output_dir = os.path.join(args.output_dir, f"{model}_seed{seed}")
    opts = schedule_opts(args.iters, seed) + list(model_opts) + list(args.opts)
    result_file = os.path.join(output_dir, "result.json")
    if os.path.exists(result_file) and not args.retrain:
        with open(result_file) as f:
            result = json.load(f)
        if result.get("opts") == opts and result.get("config_file") == config_file:
            print(f"[gate] {model} seed {seed}: reusing {result_file}", flush=True)
            return result
    if os.path.isdir(output_dir):
        # A fresh run: nothing of an earlier one (checkpoints, config) may be resumed.
        import shutil

        shutil.rmtree(output_dir)
    # The code root's ion_d2 (another checkout's for an ablation; this worker either way). Set
    # for this checkout too: the worker runs from benchmarks/, so without it an installed
    # ion_d2 (an editable install of another checkout, e.g. a worktree sharing a venv) would
    # be imported; the worker's result names the one it imported, checked below.
    env = dict(os.environ)
    env["PYTHONPATH"] = args.code_root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", config_file, output_dir]
    cmd += ["--"] + opts
    print(f"[gate] {model} seed {seed}: training {args.iters} iterations ...", flush=True)
    log_file = os.path.join(args.output_dir, f"{model}_seed{seed}.log")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(log_file, "w") as log:
        proc = subprocess.run(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=args.code_root
        )
    if proc.returncode != 0:
        raise SystemExit(
            f"[gate] {model} seed {seed} failed (status {proc.returncode}); see {log_file}"
        )
    with open(result_file) as f:
        result = json.load(f)
    check_imported_from(result.get("ion_d2"), args.code_root)
    result.update(opts=opts, config_file=config_file)
    with open(result_file, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"[gate] {model} seed {seed}: AP {result['AP']:.2f}  APs {result['APs']:.2f}  "
        f"AP_context {result['AP_context']:.2f}  ({result['seconds'] / 60:.1f} min)",
        flush=True,
    )
    return result


def check_imported_from(ion_d2_dir: str, code_root: str) -> None:
    """Refuse a run whose worker imported ion_d2 from elsewhere than ``code_root``."""
    if ion_d2_dir is None or not os.path.abspath(ion_d2_dir).startswith(
        os.path.join(os.path.abspath(code_root), "")
    ):
        raise SystemExit(
            f"[gate] the worker imported ion_d2 from {ion_d2_dir}, not from {code_root}: its "
            "figures would be another checkout's. Check PYTHONPATH and installed copies of "
            "ion_d2 (pip show ion_d2)."
        )


def machine(cpuinfo: str = CPUINFO) -> str:
    """
    The processor (name, family, model), its CPU count and the torch version, as the gate's runs
    were trained on: the same seed gives other figures on another processor (docs/BENCHMARKS.md,
    "Accuracy gate"), so a summary says where it was measured.
    """
    fields: Dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    break  # the first processor's block ends at the first empty line
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name", "unknown processor")
    if "cpu family" in fields and "model" in fields:
        cpu += f" (family {fields['cpu family']}, model {fields['model']})"
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch_version}"


def mean_std(values: List[float]):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def summarise(results: Dict[str, List[Dict[str, float]]]) -> Dict[str, Dict[str, list]]:
    summary: Dict[str, Dict[str, list]] = {}
    for model, runs in results.items():
        summary[model] = {m: list(mean_std([r[m] for r in runs])) for m in METRICS}
        summary[model]["per_seed_AP"] = [r["AP"] for r in runs]
        names = [k for k in runs[0].get("pairs", {}) if all(k in r.get("pairs", {}) for r in runs)]
        if names:
            pairs = summary.setdefault("pairs", {})
            pairs[model] = {k: list(mean_std([r["pairs"][k] for r in runs])) for k in names}
    if "ion" in results and "baseline" in results:
        gains = [i["AP"] - b["AP"] for i, b in zip(results["ion"], results["baseline"])]
        summary["gain"] = {"AP": list(mean_std(gains))}
    return summary


def compare(summary, reference, sigmas: float, floor: float) -> List[str]:
    """
    The failures: a mean below the reference mean by more than ``max(floor, sigmas * sd)``,
    ``sd`` the standard deviation of a difference of two means of n seeds each with the
    reference's spread (sqrt(2 / n) times it).
    """
    failures = []
    for model, metrics in reference["summary"].items():
        if model == "pairs":
            continue  # reported, not gated
        for metric, values in metrics.items():
            if metric == "per_seed_AP" or model not in summary or metric not in summary[model]:
                continue
            ref_mean, ref_std = values
            n = len(reference["seeds"])
            allowed = max(floor, sigmas * ref_std * math.sqrt(2.0 / n))
            mean = summary[model][metric][0]
            status = "ok" if mean >= ref_mean - allowed else "FAIL"
            print(
                f"  {model:<9}{metric:<11} {mean:7.2f}  reference {ref_mean:6.2f}  "
                f"allowed drop {allowed:5.2f}  {status}"
            )
            if status == "FAIL":
                failures.append(f"{model} {metric} {mean:.2f} < {ref_mean:.2f} - {allowed:.2f}")
    return failures


def print_table(summary) -> None:
    print(f"\n{'model':<10}" + "".join(f"{m + ' mean±sd':>20}" for m in METRICS) + "  per-seed AP")
    for model in ("baseline", "ion"):
        if model not in summary:
            continue
        cells = "".join(
            f"{summary[model][m][0]:>13.2f} ± {summary[model][m][1]:4.2f}" for m in METRICS
        )
        seeds = ", ".join(f"{v:.2f}" for v in summary[model]["per_seed_AP"])
        print(f"{model:<10}{cells}  [{seeds}]")
    if "gain" in summary:
        g = summary["gain"]["AP"]
        print(f"{'ION - baseline AP':<30}{g[0]:+.2f} ± {g[1]:.2f}")
    for model, pairs in summary.get("pairs", {}).items():
        print(
            f"{model} context pairs (% mean ± sd): "
            + "; ".join(f"{k} {v[0]:.1f} ± {v[1]:.1f}" for k, v in pairs.items())
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--iters", type=int, default=DEFAULT_ITERS)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--output-dir", default=os.path.join(REPO, "output", "gate"))
    parser.add_argument("--retrain", action="store_true", help="train every run again")
    parser.add_argument(
        "--pair",
        choices=sorted(PAIRS),
        default="vgg16",
        help="vgg16: the gate; r50_fpn: the ResNet comparison; local: context just outside the "
        "box, off ('baseline') and on ('ion') (both reported, no reference)",
    )
    parser.add_argument(
        "--reference",
        help="reference file the means are compared with (default: the pair's, "
        "benchmarks/accuracy_gate_reference[_<pair>].json)",
    )
    parser.add_argument(
        "--write-reference",
        action="store_true",
        help="store this run's summary as the reference instead of comparing with it",
    )
    parser.add_argument(
        "--sigmas", type=float, default=2.0, help="allowed drop, in standard deviations"
    )
    parser.add_argument("--floor", type=float, default=1.0, help="smallest allowed drop (AP)")
    parser.add_argument(
        "--code-root",
        default=REPO,
        help="checkout whose ion_d2 and configs are trained (for ablations against another "
        "version); default: this one",
    )
    parser.add_argument("opts", nargs="*", help="config overrides KEY VALUE ... for every run")
    args = parser.parse_args(argv)
    args.code_root = os.path.abspath(args.code_root)
    args.reference = args.reference or reference_path(args.pair)

    start = time.time()
    results = {m: [run_one(args, m, s) for s in args.seeds] for m in args.models}
    summary = summarise(results)
    where = machine()
    print(
        f"\nAccuracy gate ({args.pair}): {args.iters} iterations, seeds {args.seeds}, code "
        f"{args.code_root}"
        + (f", overrides {args.opts}" if args.opts else "")
        + f" ({(time.time() - start) / 60:.1f} min)\nmachine: {where}"
    )
    print_table(summary)
    record = {
        "iters": args.iters,
        "seeds": args.seeds,
        "opts": args.opts,
        "machine": where,
        "summary": summary,
    }
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(record, f, indent=1)
    if args.write_reference:
        with open(args.reference, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        print(f"\nWrote the reference {args.reference}")
        return 0
    if not os.path.exists(args.reference):
        print(
            f"\nNo reference for the pair {args.pair!r} ({os.path.relpath(args.reference, REPO)}):"
            " reported, not gated."
        )
        return 0
    with open(args.reference) as f:
        reference = json.load(f)
    if reference["iters"] != args.iters:
        raise SystemExit(
            f"The reference was measured at {reference['iters']} iterations, this run at "
            f"{args.iters}; compare like with like (--iters {reference['iters']})."
        )
    print(f"\nAgainst {os.path.relpath(args.reference, REPO)} (seeds {reference['seeds']}):")
    if reference.get("machine", where) != where:
        print(
            f"  (the reference was measured on {reference['machine']}: per-seed figures differ "
            "between processors; compare with the parent commit on this machine when a figure "
            "matters more than the allowed drop)"
        )
    failures = compare(summary, reference, args.sigmas, args.floor)
    if failures:
        print("\nGATE FAILED: " + "; ".join(failures))
        return 1
    print("\nGATE PASSED")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rest = sys.argv[2:]
        sep = rest.index("--") if "--" in rest else len(rest)
        run_worker(rest[0], rest[1], rest[sep + 1 :])
    else:
        sys.exit(main())
