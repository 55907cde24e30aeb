#!/usr/bin/env python
"""
Run a config + weights on images (files or a folder) and write visualised PNGs.

    python tools/predict.py --config-file configs/ION_VGG16_synthetic.yaml \
        --weights output/demo/model_final.pth --input img1.jpg dir/ --output vis/

Each input ``<name>.<ext>`` is written as ``<output>/<name>.<ext>.png``, so ``x.jpg`` and
``x.png`` get two outputs and no output can be an input. The output folder must not be a folder
that holds any of the inputs, and two inputs with the same file name (from two folders) are
refused. Every file of a folder is tried (.png, .jpg, .tif, .webp, ... whatever decodes);
files that cannot be read, are truncated, are not 8-bit (16-bit PNG or TIFF, grey or RGB), are
too small for the trunk's stride after resizing, or fail in any other way are skipped and
listed at the end with the reason, after the rest of the folder is done; the exit status is 1
when any file was skipped, 2 for bad arguments. ``--weights`` must name a checkpoint: a
randomly initialised model runs only with ``--allow-random-weights``.
"""

import argparse
import glob
import os
import sys
from typing import Dict, List, Optional

import cv2
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.utils.visualizer import Visualizer

from ion_d2 import add_ion_config
from ion_d2.data.dataset_check import input_stride
from ion_d2.engine.predictor import IONPredictor, read_image_file


def list_images(inputs: List[str]) -> List[str]:
    """Every file of each folder of ``inputs`` (sorted) and each file named."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(p for p in glob.glob(os.path.join(item, "*")) if os.path.isfile(p))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"--input {item!r} is neither an image file nor a folder.")
    if not paths:
        raise FileNotFoundError(f"No files found in {inputs}.")
    return paths


def plan_outputs(paths: List[str], output_dir: str) -> Dict[str, str]:
    """
    Map each input to ``<output_dir>/<basename>.png``, refusing an output folder that holds an
    input and two inputs that would share an output.
    """
    out_real = os.path.realpath(output_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output {output_dir!r} exists and is not a folder.")
    plan, owner = {}, {}
    for path in paths:
        if os.path.dirname(os.path.realpath(path)) == out_real:
            raise ValueError(
                f"--output {output_dir!r} holds the input {path!r}; write the visualisations "
                "to another folder so that no input can be overwritten or read back as an input."
            )
        out = os.path.join(output_dir, os.path.basename(path) + ".png")
        if out in owner:
            raise ValueError(
                f"Inputs {owner[out]!r} and {path!r} have the same file name and would both be "
                f"written to {out!r}; run them with separate --output folders."
            )
        owner[out] = path
        plan[path] = out
    return plan


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="a checkpoint (.pth) to run")
    parser.add_argument(
        "--allow-random-weights",
        action="store_true",
        help='run with --weights "" (a randomly initialised model, for smoke tests)',
    )
    parser.add_argument("--input", nargs="+", required=True, help="image files or folders")
    parser.add_argument("--output", required=True, help="folder for the visualised PNGs")
    parser.add_argument("--confidence", type=float, default=0.5, help="minimum score to draw")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    if not args.weights and not args.allow_random_weights:
        parser.error(
            '--weights "" would run a randomly initialised model; name a checkpoint, or pass '
            "--allow-random-weights to do it on purpose."
        )
    if args.weights and not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights!r} is not a file.")
    try:
        args.plan = plan_outputs(list_images(args.input), args.output)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    return args


def predict_one(predictor, path: str, out: str, metadata, confidence: float, stride: int) -> int:
    """
    Detect objects in the image file ``path`` and write their visualisation to ``out``.

    Returns:
        int: the number of detections drawn.

    Raises:
        OSError, ValueError: the file cannot be read, is truncated or not 8-bit, is too small
            for the trunk after resizing, or ``out`` cannot be written.
    """
    image = read_image_file(path, format="BGR")
    transform = predictor.aug.get_transform(image)  # a ResizeTransform, or a NoOpTransform
    resized = (
        getattr(transform, "new_h", image.shape[0]),
        getattr(transform, "new_w", image.shape[1]),
    )
    if min(resized) < stride:
        raise ValueError(
            f"too small: {image.shape[0]}x{image.shape[1]} (HxW) is {resized[0]}x{resized[1]} "
            f"after resizing (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST), under the trunk's stride "
            f"({stride} px)"
        )
    instances = predictor(image)["instances"].to("cpu")
    instances = instances[instances.scores >= confidence]
    vis = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
    if not cv2.imwrite(out, vis.get_image()[:, :, ::-1]):
        raise OSError(f"could not write {out}")
    return len(instances)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = get_cfg()
    add_ion_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.WEIGHTS = args.weights
    cfg.freeze()
    predictor = IONPredictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    os.makedirs(args.output, exist_ok=True)
    stride = input_stride(predictor.model.backbone)
    failed = {}
    for path, out in args.plan.items():
        try:
            count = predict_one(predictor, path, out, metadata, args.confidence, stride)
        except Exception as e:  # noqa: B902  one file must not stop the rest of the folder
            failed[path] = f"{type(e).__name__}: {e}"
            print(f"{path}: skipped ({failed[path]})")
            continue
        print(f"{path}: {count} detections -> {out}")

    print(f"\n{len(args.plan) - len(failed)} of {len(args.plan)} images written to {args.output}.")
    if failed:
        print(f"{len(failed)} failed:")
        for path, reason in failed.items():
            print(f"  {path}: {reason}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
