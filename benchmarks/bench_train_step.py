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
round), with their call counts.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from ion_d2 import get_ion_cfg
from ion_d2.engine import IONTrainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "baseline": "FastRCNN_VGG16_synthetic.yaml",
    "ion": "ION_VGG16_synthetic.yaml",
}


def _cfg(config_name: str, seed: int):
    cfg = get_ion_cfg(os.path.join(REPO, "configs", config_name), ["SEED", seed])
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


def measure(args) -> Dict[str, List[float]]:
    torch.set_num_threads(args.threads)
    cfgs = {name: _cfg(config, args.seed) for name, config in MODELS.items()}
    batches = _batches(cfgs["ion"], args.batches)
    models = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(args.seed)
        models[name] = build_model(cfg).train()
    seconds = {name: [] for name in models}
    with EventStorage():
        for batch in batches:  # warm-up
            for model in models.values():
                _step(model, batch)
        for _ in range(args.rounds):
            per_round = {name: 0.0 for name in models}
            for batch in batches:
                for name, model in models.items():
                    per_round[name] += _step(model, batch)
            for name in models:
                seconds[name].append(per_round[name] / len(batches))
        if args.profile:
            _profile(models["ion"], batches, args.profile_rows)
    return seconds


def _profile(model: torch.nn.Module, batches: List[List[dict]], rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            _step(model, batch)
    print(f"\nION's training step, {len(batches)} batches, by self CPU time (torch.profiler):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up")
    parser.add_argument("--batches", type=int, default=4, help="batches per round")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="also profile ION's step")
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batches < 1 or args.threads < 1:
        raise SystemExit("--rounds, --batches and --threads must be at least 1.")
    seconds = measure(args)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    print(
        f"Training step on the bundled data (benchmarks/bench_train_step.py): "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, {args.threads} threads, {args.batches} batches of "
        f"{MODELS['ion']}'s loader x {args.rounds} rounds, models alternated"
    )
    for name, values in seconds.items():
        rounds = ", ".join(f"{v:.3f}" for v in values)
        print(f"  {name:<9} {median[name]:.3f} s per step (median; rounds {rounds})")
    ratio = median["ion"] / median["baseline"]
    verdict = "PASS" if ratio <= 1.35 else "FAIL"
    print(f"  {verdict}  ION / baseline {ratio:.2f}x (<= 1.35, issue 27)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
