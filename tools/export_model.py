#!/usr/bin/env python
"""
Export a trained ION model to TorchScript (``ion_d2.export.trace_ion_model``).

    python tools/export_model.py --config-file configs/ION_VGG16_synthetic.yaml \
        --weights output/demo/model_final.pth --output output/export/model.ts [--size 600 800]

The traced module takes one (3, H, W) float tensor of any size, in ``INPUT.FORMAT`` and already
resized as the test loader resizes it, and returns ``(boxes, classes, scores, image_size)``:
the detections of ``IONRCNN.inference(..., do_postprocess=False)`` without box voting, in the
input tensor's coordinates (see the README's export section). The sample image it is traced on
(``--size``) is random: no data is needed.
"""

import argparse
import logging
import os
import sys

import torch
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from ion_d2 import get_ion_cfg
from ion_d2.engine.checkpoint import IONCheckpointer
from ion_d2.export import trace_ion_model

logger = logging.getLogger("ion_d2.export_model")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help='a checkpoint; "" for random weights')
    parser.add_argument("--output", required=True, help="the TorchScript file to write")
    parser.add_argument("--size", type=int, nargs=2, default=(600, 800), metavar=("H", "W"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logger(name="ion_d2")
    cfg = get_ion_cfg(args.config_file, args.opts)
    cfg.MODEL.WEIGHTS = args.weights
    cfg.freeze()
    model = build_model(cfg).eval()
    # Weights that leave part of the model at its random values are refused, as for evaluation;
    # --weights "" asks for random weights and gets them.
    strict = bool(cfg.MODEL.WEIGHTS) and not cfg.MODEL.ION.ALLOW_PARTIAL_WEIGHTS
    IONCheckpointer(model, strict=strict).load(cfg.MODEL.WEIGHTS)
    height, width = args.size
    image = torch.rand(3, height, width, device=model.device) * 255
    traced, _ = trace_ion_model(model, image)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.jit.save(traced, args.output)
    logger.info(f"Wrote {args.output} (traced at {height}x{width}; runs at any size).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
