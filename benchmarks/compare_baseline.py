#!/usr/bin/env python
"""
ION vs the Fast R-CNN baseline on the bundled synthetic data (`make compare`).

Trains configs/FastRCNN_VGG16_synthetic.yaml and configs/ION_VGG16_synthetic.yaml with the same
schedule, seed and data, evaluates both with the stock COCOEvaluator, and prints one table: AP,
AP50, APs, and the mean AP over the classes that need context, for each model and ION minus
baseline. Finished runs in the output folder are reused, interrupted ones resumed, as long as
they were trained with the same config (otherwise refused; --retrain trains again).

With --proposals ss both train and test on selective-search proposals as in the paper
(MODEL.ION.PROPOSALS selective_search) instead of an RPN; the proposal files that names are
computed first when missing (tools/selective_search_proposals.py).
"""

import argparse
import json
import logging
import os

from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger

from ion_d2 import get_ion_cfg
from ion_d2.data.selective_search_proposals import compute_selective_search_proposals
from ion_d2.engine import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (label, config, output subfolder) of the two models.
MODELS = (
    ("Fast R-CNN baseline", "FastRCNN_VGG16_synthetic.yaml", "baseline"),
    ("ION", "ION_VGG16_synthetic.yaml", "ion"),
)
# --proposals: (MODEL.ION.PROPOSALS, the output subfolders' suffix).
PROPOSALS = {"rpn": ("generator", ""), "ss": ("selective_search", "_ss")}
logger = logging.getLogger("ion_d2.compare")


def _cfg(config_name, output_dir, opts):
    cfg = get_ion_cfg(os.path.join(REPO, "configs", config_name), opts)
    cfg.OUTPUT_DIR = output_dir
    cfg.freeze()
    return cfg


def ensure_proposal_files(cfg, workers):
    """Compute the selective-search files a config loads, for those that do not exist yet."""
    if not cfg.MODEL.LOAD_PROPOSALS:
        return
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    files = list(cfg.DATASETS.PROPOSAL_FILES_TRAIN) + list(cfg.DATASETS.PROPOSAL_FILES_TEST)
    for name, path in zip(names, files):
        if not os.path.exists(path):
            logger.info(f"Computing selective-search proposals of {name!r} into {path}")
            compute_selective_search_proposals(name, path, workers=workers)


def summarise(bbox, context_classes):
    ctx = [bbox[f"AP-{c}"] for c in context_classes if f"AP-{c}" in bbox]
    return {
        "AP": bbox["AP"],
        "AP50": bbox["AP50"],
        "APs": bbox["APs"],
        "AP context classes": sum(ctx) / len(ctx) if ctx else float("nan"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--output-dir", default=os.path.join(REPO, "output", "compare"))
    parser.add_argument(
        "--proposals",
        choices=sorted(PROPOSALS),
        default="rpn",
        help="rpn: an RPN on conv5 (default); ss: precomputed selective-search boxes, as the "
        "paper (computed first when the configs' files are missing)",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="selective-search processes"
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train from scratch, moving a previous run in the output folder aside (a run "
        "trained with another config is otherwise refused)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="overrides for both configs")
    args = parser.parse_args()
    setup_logger(output=args.output_dir)
    setup_logger(output=args.output_dir, name="ion_d2")

    value, suffix = PROPOSALS[args.proposals]
    opts = ["MODEL.ION.PROPOSALS", value] + args.opts
    rows = {}
    for label, config_name, subdir in MODELS:
        cfg = _cfg(config_name, os.path.join(args.output_dir, subdir + suffix), opts)
        ensure_proposal_files(cfg, args.workers)
        logger.info(f"Training {label}: {config_name}, {cfg.SOLVER.MAX_ITER} iterations")
        _, results = train_and_evaluate(cfg, resume=True, retrain=args.retrain)
        context_classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("context_classes", [])
        rows[label] = summarise(results["bbox"], context_classes)
        rows[label].update({k: v for k, v in results["bbox"].items() if k.startswith("AP-")})
        pairs = results.get("context_pairs", {})
        rows[label].update({f"% {k}": v for k, v in pairs.items() if not k.endswith("objects")})

    base, ion = (rows[m[0]] for m in MODELS)
    keys = ["AP", "AP50", "APs", "AP context classes"]
    keys += sorted(k for k in ion if k.startswith("AP-"))
    keys += [k for k in ion if k.startswith("% ")]  # ContextPairEvaluator's, per pair
    lines = [f"{'':<26}" + "".join(f"{k:>18}" for k in ("baseline", "ION", "ION - baseline"))]
    for k in keys:
        lines.append(f"{k:<26}{base[k]:>18.2f}{ion[k]:>18.2f}{ion[k] - base[k]:>+18.2f}")
    table = "\n".join(lines)
    json_name = "compare.json" if args.proposals == "rpn" else f"compare_{args.proposals}.json"
    with open(os.path.join(args.output_dir, json_name), "w") as f:
        json.dump(rows, f, indent=2)
    proposals = {"rpn": "RPN", "ss": "selective-search"}[args.proposals]
    print(
        f"\nCOCO bbox AP on the bundled val split ({proposals} proposals; same schedule, seed "
        "and data):"
    )
    print(table)


if __name__ == "__main__":
    main()
