#!/usr/bin/env python
"""
Cost of IONDatasetMapper's semantic-label check: time per image of Detectron2's DatasetMapper
and of IONDatasetMapper (the same mapping plus the label size/value check) on bundled-data
images, with configs/ION_VGG16_synthetic.yaml. One run; prints both and their ratio.

    python benchmarks/bench_sem_seg_check.py [--images 60] [--repeats 3]
"""

import argparse
import os
import tempfile
import time

import numpy as np
from detectron2.data import DatasetCatalog, DatasetMapper

from ion_d2 import get_ion_cfg
from ion_d2.data import IONDatasetMapper, register_ion_synthetic
from ion_d2.data.mapper import check_sem_seg_label

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_per_image(mapper, dicts, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        np.random.seed(0)
        start = time.perf_counter()
        for d in dicts:
            mapper(d)
        best = min(best, (time.perf_counter() - start) / len(dicts))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = get_ion_cfg(os.path.join(REPO, "configs", "ION_VGG16_synthetic.yaml"))
    with tempfile.TemporaryDirectory() as root:
        train, _ = register_ion_synthetic(
            root, num_train=args.images, num_val=1, name_prefix="bench_semseg"
        )
        dicts = DatasetCatalog.get(train)
        stock = time_per_image(DatasetMapper(cfg, is_train=True), dicts, args.repeats)
        ion = time_per_image(IONDatasetMapper(cfg, is_train=True), dicts, args.repeats)
        labels = [np.asarray(DatasetMapper(cfg, True)(d)["sem_seg"], np.uint8) for d in dicts]
        start = time.perf_counter()
        for seg in labels:
            check_sem_seg_label(seg, seg.shape, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 255)
        check = (time.perf_counter() - start) / len(labels)
    print(
        f"{len(dicts)} bundled-data images ({dicts[0]['height']}x{dicts[0]['width']} first), "
        f"best of {args.repeats}:"
    )
    print(f"  DatasetMapper       {stock * 1e3:8.3f} ms/image")
    print(f"  IONDatasetMapper    {ion * 1e3:8.3f} ms/image  (ratio {ion / stock:.3f})")
    print(f"  the check alone     {check * 1e3:8.3f} ms/image")


if __name__ == "__main__":
    main()
