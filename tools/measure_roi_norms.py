#!/usr/bin/env python
"""
Measure the mean L2 norm of ROI-pooled features on the training set (section 5.2), to choose
MODEL.ION.SKIP_POOL.SCALE_INIT for a trunk other than ImageNet VGG16 (whose conv5 gives the
paper's 1000 per ROI and 130 per location).

    python tools/measure_roi_norms.py --config-file configs/ION_VGG16_synthetic.yaml \
        --num-batches 20 [MODEL.WEIGHTS path/to/weights.pth]

For each feature in MODEL.ROI_HEADS.IN_FEATURES it pools the ground-truth boxes of
``--num-batches`` training batches and prints the mean norm over all entries of each ROI
("roi" normalisation) and across channels at each cell ("location" normalisation).
"""

import argparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.modeling.poolers import ROIPooler

from ion_d2 import add_ion_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--num-batches", type=int, default=20)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()

    cfg = get_cfg()
    add_ion_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    # Training mode, as the features are seen during training (BatchNorm uses batch stats).
    model.train()
    shapes = dict(model.backbone.output_shape())
    if model.context is not None:
        shapes.update(model.context.output_shape())
    names = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
    res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
    poolers = {
        n: ROIPooler(
            res,
            (1.0 / shapes[n].stride,),
            cfg.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO,
            cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE,
        )
        for n in names
    }
    sums = {n: [0.0, 0.0] for n in names}
    count = 0
    loader = iter(build_detection_train_loader(cfg))
    with torch.no_grad():
        for _ in range(args.num_batches):
            batch = next(loader)
            features = model.extract_features(model.preprocess_image(batch))
            boxes = [x["instances"].gt_boxes.to(model.device) for x in batch]
            for n in names:
                pooled = poolers[n]([features[n]], boxes)
                sums[n][0] += pooled.flatten(1).norm(dim=1).sum().item()
                sums[n][1] += pooled.norm(dim=1).mean(dim=(1, 2)).sum().item()
            count += sum(len(b) for b in boxes)
    print(f"Mean L2 norm of {count} pooled ground-truth boxes ({args.num_batches} batches):")
    print(f"{'feature':<12}{'per ROI':>12}{'per location':>16}")
    for n in names:
        print(f"{n:<12}{sums[n][0] / count:>12.1f}{sums[n][1] / count:>16.1f}")


if __name__ == "__main__":
    main()
