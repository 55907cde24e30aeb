#!/usr/bin/env python
"""Compute selective-search proposals for a registered dataset, as a Detectron2 proposal file.

The paper trains and tests on selective-search boxes (section 4.1: "For PASCAL VOC we use the
same pre-computed selective search boxes from Fast R-CNN, and for COCO we use the boxes
precomputed by Hosang et al."). This recomputes such boxes with OpenCV's selective search for
any config run with MODEL.ION.PROPOSALS selective_search (ion_d2/config.py), e.g.::

    python tools/selective_search_proposals.py --dataset voc_2007_trainval --workers 8
    python tools/selective_search_proposals.py --dataset ion_synth_train --workers 2

Each writes $DETECTRON2_DATASETS/ss_proposals/<dataset>.pkl (default datasets/ss_proposals/),
the path that setting reads. Any dataset registered in Detectron2's DatasetCatalog works:
Detectron2's builtins (voc_2007_test, coco_2014_train, ...), ion_d2's bundled ones, or yours
(register it in a module and pass --import my_module). Needs cv2.ximgproc (the
opencv-contrib-python-headless wheel; `make setup` installs it).

An interrupted run continues where it stopped when started again with the same arguments: each
image's boxes are cached in <output>.work/ and the file is written when all are done.
"""

import argparse
import importlib
import os

from detectron2.utils.logger import setup_logger

import ion_d2  # noqa: F401  (registers the bundled datasets)
from ion_d2.data.selective_search import SelectiveSearchConfig
from ion_d2.data.selective_search_proposals import (
    compute_selective_search_proposals,
    default_proposal_file,
)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="name registered in DatasetCatalog")
    parser.add_argument(
        "--output", help="proposal file (default: $DETECTRON2_DATASETS/ss_proposals/<dataset>.pkl)"
    )
    parser.add_argument(
        "--mode",
        choices=("fast", "quality"),
        default="fast",
        help="OpenCV's switchToSelectiveSearchFast (R-CNN's setting) or ...Quality (slower)",
    )
    parser.add_argument(
        "--top-k", type=int, default=2000, help="boxes kept per image, best-ranked first"
    )
    parser.add_argument(
        "--max-size",
        type=int,
        default=0,
        help="downscale images whose longer side exceeds this many pixels before searching "
        "(much faster on large images; boxes are scaled back); 0 = original size",
    )
    parser.add_argument(
        "--min-size", type=float, default=2.0, help="drop boxes narrower or lower than this (px)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the boxes' random ranking")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--work-dir", help="per-image cache (default: <output>.work)")
    parser.add_argument(
        "--keep-work-dir", action="store_true", help="keep the per-image cache at the end"
    )
    parser.add_argument(
        "--import",
        dest="modules",
        action="append",
        default=[],
        help="module to import first (one that registers your dataset); repeatable",
    )
    args = parser.parse_args(argv)
    setup_logger(name="ion_d2")
    for module in args.modules:
        importlib.import_module(module)
    config = SelectiveSearchConfig(
        mode=args.mode,
        top_k=args.top_k,
        max_size=args.max_size,
        min_size=args.min_size,
        seed=args.seed,
    )
    return compute_selective_search_proposals(
        args.dataset,
        args.output or default_proposal_file(args.dataset),
        config=config,
        work_dir=args.work_dir,
        workers=args.workers,
        keep_work_dir=args.keep_work_dir,
    )


if __name__ == "__main__":
    main()
