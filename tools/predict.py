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
too small for the trunk's stride after resizing (the dataset check's rule,
``ion_d2/data/size_rule.py``), or fail in any other way are skipped, and so are a folder's
hidden files, subfolders (not searched), broken symlinks and entries that are not regular
files; each is listed at the end with the reason, after the rest of the folder is done. The
exit status is 1 when anything was skipped, 2 for bad arguments. ``--weights`` must name a
checkpoint: a randomly initialised model runs only with ``--allow-random-weights``.
"""

import argparse
import os
import stat
import sys
from typing import Dict, List, Optional, Tuple

import cv2
from detectron2.data import MetadataCatalog
from detectron2.utils.visualizer import Visualizer

from ion_d2 import get_ion_cfg
from ion_d2.engine.predictor import IONPredictor, read_image_file


def _not_tried(path: str) -> Optional[str]:
    """Why the folder entry ``path`` is not tried as an image, or None when it is."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"broken symlink (to {os.readlink(path)!r})"
    if os.path.isdir(path):
        return "a folder (not searched)"
    if os.path.basename(path).startswith("."):
        return "hidden file"
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    return None


def list_images(inputs: List[str]) -> Tuple[List[str], Dict[str, str]]:
    """
    Every entry of each folder of ``inputs`` (sorted) and each file named.

    Returns:
        (list[str], dict[str, str]): the files to try, and the folder entries that are not
        tried (hidden files, subfolders, broken symlinks, not regular files) with the reason.
    """
    paths, skipped = [], {}
    for item in inputs:
        if os.path.isdir(item):
            for path in sorted(os.path.join(item, n) for n in os.listdir(item)):
                reason = _not_tried(path)
                if reason is None:
                    paths.append(path)
                else:
                    skipped[path] = reason
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"--input {item!r} is neither an image file nor a folder.")
    if not paths:
        shown = "".join(f"; {p}: {r}" for p, r in skipped.items())
        raise FileNotFoundError(f"No files to try in {inputs}{shown}.")
    return paths, skipped


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
        paths, args.skipped = list_images(args.input)
        args.plan = plan_outputs(paths, args.output)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    return args


def predict_one(predictor, path: str, out: str, metadata, confidence: float) -> int:
    """
    Detect objects in the image file ``path`` and write their visualisation to ``out``.

    Returns:
        int: the number of detections drawn.

    Raises:
        OSError, ValueError: the file cannot be read, is truncated or not 8-bit, is too small
            for the trunk after resizing, or ``out`` cannot be written.
    """
    image = read_image_file(path, format="BGR")
    problem = predictor.size_problem(*image.shape[:2])
    if problem is not None:
        raise ValueError(f"too small: {problem}")
    instances = predictor(image)["instances"].to("cpu")
    instances = instances[instances.scores >= confidence]
    vis = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
    if not cv2.imwrite(out, vis.get_image()[:, :, ::-1]):
        raise OSError(f"could not write {out}")
    return len(instances)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = get_ion_cfg(args.config_file, args.opts)
    cfg.MODEL.WEIGHTS = args.weights
    # IONPredictor refuses to run without weights unless partial (here: none) are allowed.
    cfg.MODEL.ION.ALLOW_PARTIAL_WEIGHTS = args.allow_random_weights
    cfg.freeze()
    predictor = IONPredictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    os.makedirs(args.output, exist_ok=True)
    for path, reason in args.skipped.items():
        print(f"{path}: skipped ({reason})")
    failed = {}
    for path, out in args.plan.items():
        try:
            count = predict_one(predictor, path, out, metadata, args.confidence)
        except Exception as e:  # noqa: B902  one file must not stop the rest of the folder
            failed[path] = f"{type(e).__name__}: {e}"
            print(f"{path}: skipped ({failed[path]})")
            continue
        print(f"{path}: {count} detections -> {out}")

    print(f"\n{len(args.plan) - len(failed)} of {len(args.plan)} images written to {args.output}.")
    if args.skipped:
        print(f"{len(args.skipped)} folder entries not tried:")
        for path, reason in args.skipped.items():
            print(f"  {path}: {reason}")
    if failed:
        print(f"{len(failed)} failed:")
        for path, reason in failed.items():
            print(f"  {path}: {reason}")
    return 1 if failed or args.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
