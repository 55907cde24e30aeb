#!/usr/bin/env python
"""
Measure the mean L2 norm of ROI-pooled features on the training set (section 5.2), as
MODEL.ION.SKIP_POOL.SCALE_INIT -1 does before training (ion_d2.engine.skip_pool_scale).

    python tools/measure_roi_norms.py --config-file configs/ION_VGG16_synthetic.yaml \
        --num-images 100 [MODEL.WEIGHTS path/to/weights.pth]

On the first ``--num-images`` training images (default: MODEL.ION.SKIP_POOL.SCALE_MEASURE_IMAGES)
it pools the model's proposals (its proposal generator, or the precomputed proposals with
MODEL.LOAD_PROPOSALS) from each feature in MODEL.ROI_HEADS.IN_FEATURES and prints the mean norm
over all entries of each ROI ("roi" normalisation) and across channels at each cell
("location"), and the scale SCALE_INIT -1 would start from: the reference feature's
(MODEL.ION.CONTEXT.IN_FEATURE) norm for SKIP_POOL.NORM.
"""

import argparse

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from ion_d2 import get_ion_cfg
from ion_d2.engine.skip_pool_scale import measure_pooled_norms, training_batches


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--num-images", type=int, default=None)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()

    cfg = get_ion_cfg(args.config_file, args.opts)
    cfg.freeze()
    num_images = args.num_images or cfg.MODEL.ION.SKIP_POOL.SCALE_MEASURE_IMAGES
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    norms = measure_pooled_norms(model, training_batches(cfg, num_images))

    print(
        f"Mean L2 norm of {norms.num_rois} proposals pooled on {norms.num_images} training "
        "images:"
    )
    print(f"{'feature':<12}{'per ROI':>12}{'per location':>16}")
    for name in norms.per_roi:
        print(f"{name:<12}{norms.per_roi[name]:>12.1f}{norms.per_location[name]:>16.2f}")
    reference = cfg.MODEL.ION.CONTEXT.IN_FEATURE
    mode = cfg.MODEL.ION.SKIP_POOL.NORM
    if reference in norms.per_roi and mode != "none":
        value = (norms.per_roi if mode == "roi" else norms.per_location)[reference]
        print(f"SCALE_INIT -1 would set the scale to {value:.4g} ({reference}, NORM {mode!r}).")


if __name__ == "__main__":
    main()
