#!/usr/bin/env python
"""Render a COCO instances json into semantic label PNGs for ION's segmentation regularizer.

Example::

    python tools/coco_to_semseg.py \\
        --json datasets/coco/annotations/instances_train2017.json \\
        --output-dir datasets/coco/ion_semseg_train2017

See :mod:`ion_d2.data.coco_semseg` for the label format and how to register the dataset.
"""

import argparse

from detectron2.utils.logger import setup_logger

from ion_d2.data.coco_semseg import coco_to_semseg_labels


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="COCO-format instances json file")
    parser.add_argument(
        "--output-dir", required=True, help="directory for the <image stem>.png label maps"
    )
    args = parser.parse_args(argv)
    setup_logger(name="ion_d2")
    return coco_to_semseg_labels(args.json, args.output_dir)


if __name__ == "__main__":
    main()
