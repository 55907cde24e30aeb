#!/usr/bin/env python
"""
Run a config + weights on images (files or a folder) and write visualised PNGs.

    python tools/predict.py --config-file configs/ION_VGG16_synthetic.yaml \
        --weights output/demo/model_final.pth --input img1.png dir/ --output vis/
"""

import argparse
import glob
import os

import cv2
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

from ion_d2 import add_ion_config

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def list_images(inputs):
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(
                p
                for p in glob.glob(os.path.join(item, "*"))
                if p.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"--input {item!r} is neither an image file nor a folder.")
    if not paths:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {inputs}.")
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files or folders")
    parser.add_argument("--output", required=True, help="folder for the visualised PNGs")
    parser.add_argument("--confidence", type=float, default=0.5, help="minimum score to draw")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()

    cfg = get_cfg()
    add_ion_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.WEIGHTS = args.weights
    cfg.freeze()
    predictor = DefaultPredictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    os.makedirs(args.output, exist_ok=True)
    for path in list_images(args.input):
        image = cv2.imread(path)
        if image is None:
            raise ValueError(f"Could not read {path!r} as an image.")
        instances = predictor(image)["instances"].to("cpu")
        instances = instances[instances.scores >= args.confidence]
        vis = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
        out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        cv2.imwrite(out, vis.get_image()[:, :, ::-1])
        print(f"{path}: {len(instances)} detections -> {out}")


if __name__ == "__main__":
    main()
