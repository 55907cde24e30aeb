#!/usr/bin/env python
"""
ION's training step against the Fast R-CNN baseline's on the bundled data (`make bench` runs it).

Builds configs/ION_VGG16_synthetic.yaml and configs/FastRCNN_VGG16_synthetic.yaml (the demo's
models, at their initialisation for one seed), takes the same batches from ION's training loader
(the demo's batch of 4 images of 160-256 px), and times a training step (forward of the losses,
backward of their sum; no optimizer step) of each model, the two alternated batch by batch, for
``--rounds`` rounds after a warm-up. It prints the median seconds per step of each model and
their ratio (issue 27's target: ION at most 1.35x), the machine and the threads. With
``--profile`` it also prints the operators of ION's step by self CPU time (torch.profiler, one
round), with their call counts. With ``--against DIR`` it times another checkout's ion_d2
(e.g. a ``git worktree`` of the parent commit) against this one: the two run in turn, each in
its own process, ``--alternations`` times, and it prints each one's median ION and baseline
step and the ratio of ION's steps (speed work's before/after, measured in one run).

``--pair r50_fpn`` times the accuracy gate's ResNet pair instead (the stock R50-FPN Faster R-CNN
and ION-R50-FPN, as ``accuracy_gate.py --pair r50_fpn`` trains them; issue 25's target: ION's
training step at most 1.3x); ``--inference`` also times inference on the same images, one image
at a time in eval mode (issue 25's target on R50-FPN: at most 1.2x). Trailing ``KEY VALUE``
overrides apply to the ION model (a variant of the pair's).
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from ion_d2 import get_ion_cfg
from ion_d2.engine import IONTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gate_pairs() -> Dict[str, Dict[str, tuple]]:
    """The accuracy gate's pairs of models (config file, overrides): timed as they are trained."""
    path = os.path.join(REPO, "benchmarks", "accuracy_gate.py")
    spec = importlib.util.spec_from_file_location("ion_d2_accuracy_gate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PAIRS


PAIRS = {name: models for name, models in _gate_pairs().items() if name in ("vgg16", "r50_fpn")}
# The largest ION / baseline ratio each pair's issue allows: issue 27 (VGG16, training) and
# issue 25 (R50-FPN: training 1.3x, inference 1.2x).
TARGETS = {"vgg16": {"training": 1.35}, "r50_fpn": {"training": 1.3, "inference": 1.2}}


def _timed_pair(args) -> Dict[str, tuple]:
    """``--pair``'s models (config file, overrides), the ION model with ``args.opts`` added."""
    config, opts = PAIRS[args.pair]["ion"]
    return {**PAIRS[args.pair], "ion": (config, list(opts) + list(args.opts))}


def _cfg(model: tuple, seed: int):
    config_name, opts = model
    cfg = get_ion_cfg(os.path.join(REPO, "configs", config_name), list(opts) + ["SEED", seed])
    cfg.freeze()
    return cfg


def _batches(cfg, count: int) -> List[List[dict]]:
    loader = iter(IONTrainer.build_train_loader(cfg))
    return [next(loader) for _ in range(count)]


def _step(model: torch.nn.Module, batch: List[dict]) -> float:
    start = time.perf_counter()
    losses = model(batch)
    sum(losses.values()).backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def _inference(model: torch.nn.Module, batch: List[dict]) -> float:
    """Seconds of inference on the batch's images, one at a time (as DefaultPredictor)."""
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for x in batch:
            model([{"image": x["image"], "height": x["height"], "width": x["width"]}])
    seconds = time.perf_counter() - start
    model.train()
    return seconds / len(batch)


def _set_pending_scale(model: torch.nn.Module) -> None:
    """A skip pooler whose scale is measured before training (SCALE_INIT -1) gets 1: its value
    does not change the time of a step."""
    from ion_d2.modeling.skip_pooling import find_skip_pooler

    pooler = find_skip_pooler(getattr(model, "roi_heads", None))
    if pooler is not None and pooler.scale is not None and pooler.scale_pending:
        pooler.set_scale(1.0)


def measure(args) -> Dict[str, Dict[str, List[float]]]:
    """Per mode ("training", and "inference" with ``--inference``), per model, seconds per
    step (per image at inference) of each round."""
    torch.set_num_threads(args.threads)
    cfgs = {name: _cfg(model, args.seed) for name, model in _timed_pair(args).items()}
    args.freed_memory_kept = _malloc_as_trained(cfgs["ion"], args)
    batches = _batches(cfgs["ion"], args.batches)
    models = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(args.seed)
        models[name] = build_model(cfg).train()
        _set_pending_scale(models[name])
    timers = {"training": _step}
    if args.inference:
        timers["inference"] = _inference
    seconds = {mode: {name: [] for name in models} for mode in timers}
    with EventStorage():
        for batch in batches:  # warm-up
            for model in models.values():
                for timer in timers.values():
                    timer(model, batch)
        for _ in range(args.rounds):
            for mode, timer in timers.items():
                per_round = {name: 0.0 for name in models}
                for batch in batches:
                    for name, model in models.items():
                        per_round[name] += timer(model, batch)
                for name in models:
                    seconds[mode][name].append(per_round[name] / len(batches))
        if args.profile:
            _profile(models["ion"], batches, args.profile_rows)
    return seconds


def _malloc_as_trained(cfg, args) -> bool:
    """The allocator of the training run: IONTrainer keeps freed memory for the next step
    under ION_KEEP_FREED_CPU_MEMORY (the default); ``--default-malloc`` times glibc's defaults,
    as does a checkout without the setting (``--against`` an older one). Returns whether kept."""
    if args.default_malloc or not cfg.get("ION_KEEP_FREED_CPU_MEMORY", False):
        return False
    from ion_d2.engine.cpu_memory import keep_freed_cpu_memory

    return keep_freed_cpu_memory()


def _profile(model: torch.nn.Module, batches: List[List[dict]], rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            _step(model, batch)
    print(f"\nION's training step, {len(batches)} batches, by self CPU time (torch.profiler):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def _against(args) -> int:
    """This checkout's ion_d2 against ``args.against``'s, alternated process by process."""
    here = os.path.dirname(os.path.abspath(__file__))
    codes = {"this": os.path.dirname(here), "other": os.path.abspath(args.against)}
    medians = {name: {"ion": [], "baseline": []} for name in codes}
    for _ in range(args.alternations):
        for name, root in codes.items():
            env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
            cmd = [sys.executable, os.path.abspath(__file__), "--json"]
            cmd += ["--threads", str(args.threads), "--rounds", str(args.rounds)]
            cmd += ["--batches", str(args.batches), "--seed", str(args.seed)]
            cmd += ["--pair", args.pair] + (["--default-malloc"] if args.default_malloc else [])
            cmd += list(args.opts)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if not result["ion_d2"].startswith(root):
                raise SystemExit(f"{name}: imported ion_d2 from {result['ion_d2']}, not {root}")
            for model in ("ion", "baseline"):
                seconds = result["seconds"]["training"][model]
                medians[name][model].append(statistics.median(seconds))
    print(
        f"This checkout ({codes['this']}) against {codes['other']}, {args.alternations} "
        f"alternations of {args.rounds} rounds x {args.batches} batches, {args.threads} threads:"
    )
    for name in codes:
        m = {k: statistics.median(v) for k, v in medians[name].items()}
        runs = ", ".join(f"{v:.3f}" for v in medians[name]["ion"])
        print(
            f"  {name:<6} ION {m['ion']:.3f} s (runs {runs}), baseline {m['baseline']:.3f} s, "
            f"ION / baseline {m['ion'] / m['baseline']:.2f}x"
        )
    this, other = (statistics.median(medians[n]["ion"]) for n in codes)
    print(f"  ION's step, this / other: {this / other:.3f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up")
    parser.add_argument("--batches", type=int, default=4, help="batches per round")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--pair",
        choices=sorted(PAIRS),
        default="vgg16",
        help="the accuracy gate's pair of models to time: vgg16 (the demo's) or r50_fpn",
    )
    parser.add_argument(
        "--inference", action="store_true", help="also time inference, one image at a time"
    )
    parser.add_argument(
        "opts", nargs="*", help="config overrides KEY VALUE ... for the ION model (a variant)"
    )
    parser.add_argument("--profile", action="store_true", help="also profile ION's step")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--against", metavar="DIR", help="another checkout to time against")
    parser.add_argument("--alternations", type=int, default=3, help="with --against")
    parser.add_argument("--json", action="store_true", help="print only the seconds, as JSON")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="time with the C library's allocator defaults, not as IONTrainer trains "
        "(ION_KEEP_FREED_CPU_MEMORY: freed memory kept for the next step)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batches < 1 or args.threads < 1 or args.alternations < 1:
        raise SystemExit("--rounds, --batches, --threads and --alternations must be at least 1.")
    if args.against:
        return _against(args)
    seconds = measure(args)
    if args.json:
        import ion_d2

        print(json.dumps({"seconds": seconds, "ion_d2": os.path.dirname(ion_d2.__file__)}))
        return 0
    pair = _timed_pair(args)
    print(
        f"Training step on the bundled data (benchmarks/bench_train_step.py): "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {args.threads} threads, {args.batches} batches of "
        f"{pair['ion'][0]}'s loader x {args.rounds} rounds, models alternated; freed memory "
        f"{'kept for the next step' if args.freed_memory_kept else 'the allocator default'}"
    )
    for name, (config, opts) in pair.items():
        print(f"  {name:<9} {config} {' '.join(opts)}".rstrip())
    issue = "issue 27" if args.pair == "vgg16" else "issue 25"
    for mode, per_model in seconds.items():
        unit = "step" if mode == "training" else "image"
        median = {name: statistics.median(v) for name, v in per_model.items()}
        print(f" {mode}:")
        for name, values in per_model.items():
            rounds = ", ".join(f"{v:.3f}" for v in values)
            print(f"  {name:<9} {median[name]:.3f} s per {unit} (median; rounds {rounds})")
        ratio = median["ion"] / median["baseline"]
        target = TARGETS[args.pair].get(mode)
        if target is None:
            print(f"  ION / baseline {ratio:.2f}x")
            continue
        verdict = "PASS" if ratio <= target else "FAIL"
        print(f"  {verdict}  ION / baseline {ratio:.2f}x (<= {target}, {issue})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
