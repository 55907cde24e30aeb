#!/usr/bin/env python
"""
ION vs the Fast R-CNN baseline on the bundled synthetic data (`make compare`).

Trains configs/FastRCNN_VGG16_synthetic.yaml and configs/ION_VGG16_synthetic.yaml with the same
schedule, seed and data, evaluates both with the stock COCOEvaluator, and prints one table: AP,
AP50, APs, and the mean AP over the classes that need context, for each model and ION minus
baseline. Finished runs in the output folder are reused, interrupted ones resumed, as long as
they were trained with the same config (otherwise refused; --retrain trains again).
"""

import argparse
import json
import logging
import os

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger

from ion_d2 import add_ion_config
from ion_d2.engine import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = (
    ("Fast R-CNN baseline", "FastRCNN_VGG16_synthetic.yaml", "baseline"),
    ("ION", "ION_VGG16_synthetic.yaml", "ion"),
)
logger = logging.getLogger("ion_d2.compare")


def _cfg(config_name, output_dir, opts):
    cfg = get_cfg()
    add_ion_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", config_name))
    cfg.merge_from_list(opts)
    cfg.OUTPUT_DIR = output_dir
    cfg.freeze()
    return cfg


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
        "--retrain",
        action="store_true",
        help="train from scratch, moving a previous run in the output folder aside (a run "
        "trained with another config is otherwise refused)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="overrides for both configs")
    args = parser.parse_args()
    setup_logger(output=args.output_dir)
    setup_logger(output=args.output_dir, name="ion_d2")

    rows = {}
    for label, config_name, subdir in MODELS:
        cfg = _cfg(config_name, os.path.join(args.output_dir, subdir), args.opts)
        logger.info(f"Training {label}: {config_name}, {cfg.SOLVER.MAX_ITER} iterations")
        _, results = train_and_evaluate(cfg, resume=True, retrain=args.retrain)
        context_classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("context_classes", [])
        rows[label] = summarise(results["bbox"], context_classes)
        rows[label].update({k: v for k, v in results["bbox"].items() if k.startswith("AP-")})

    base, ion = (rows[m[0]] for m in MODELS)
    keys = ["AP", "AP50", "APs", "AP context classes"]
    keys += sorted(k for k in ion if k.startswith("AP-"))
    lines = [f"{'':<22}" + "".join(f"{k:>20}" for k in ("baseline", "ION", "ION - baseline"))]
    for k in keys:
        lines.append(f"{k:<22}{base[k]:>20.2f}{ion[k]:>20.2f}{ion[k] - base[k]:>+20.2f}")
    table = "\n".join(lines)
    with open(os.path.join(args.output_dir, "compare.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print("\nCOCO bbox AP on the bundled val split (same schedule, seed and data):")
    print(table)


if __name__ == "__main__":
    main()
