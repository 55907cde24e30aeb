#!/usr/bin/env python
"""
Cost of the dataset check IONTrainer runs before the first step
(:func:`ion_d2.data.dataset_check.check_dataset_dicts`): seconds for the bundled training set's
dicts and COCO json (configs/ION_VGG16_synthetic.yaml), and for ``--records`` synthetic records
(5 boxes each, each naming its own small JPEG, so every record costs a real read of a file's
header and end). One run of each, after one warm-up; prints the seconds.

    python benchmarks/bench_dataset_check.py [--records 100000]
"""

import argparse
import os
import tempfile
import time

import cv2
import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode

from ion_d2 import get_ion_cfg
from ion_d2.data.dataset_check import DatasetLimits, check_dataset_dicts
from ion_d2.data.loader import load_train_dicts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_records(folder: str, n: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    jpeg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
    records = []
    for i in range(n):
        path = os.path.join(folder, f"{i:07d}.jpg")
        with open(path, "wb") as f:
            f.write(jpeg)
        h, w = (int(v) for v in rng.randint(128, 257, size=2))
        xy = rng.uniform(0, 100, size=(5, 2))
        wh = rng.uniform(4, 28, size=(5, 2))
        anns = [
            {
                "bbox": [*xy[k].tolist(), *wh[k].tolist()],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": int(rng.randint(6)),
                "iscrowd": 0,
            }
            for k in range(5)
        ]
        records.append({"file_name": path, "height": h, "width": w, "annotations": anns})
    return records


def seconds(dicts, limits, json_files=()) -> float:
    check_dataset_dicts(dicts, "bench", limits, json_files=json_files)
    start = time.perf_counter()
    check_dataset_dicts(dicts, "bench", limits, json_files=json_files)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--records", type=int, default=100000)
    args = parser.parse_args()
    cfg = get_ion_cfg(os.path.join(REPO, "configs", "ION_VGG16_synthetic.yaml"))
    limits = DatasetLimits.from_config(cfg, min_side=16, is_train=True)
    bundled = load_train_dicts(cfg)
    jsons = [MetadataCatalog.get(name).json_file for name in cfg.DATASETS.TRAIN]
    print(f"bundled training set ({len(bundled)} images): {seconds(bundled, limits, jsons):.4f} s")
    with tempfile.TemporaryDirectory() as folder:
        records = synthetic_records(folder, args.records)
        print(f"{len(records)} synthetic records: {seconds(records, limits):.3f} s")


if __name__ == "__main__":
    main()
