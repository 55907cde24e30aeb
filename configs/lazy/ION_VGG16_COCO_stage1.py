"""configs/ION_VGG16_COCO_stage1.yaml as a LazyConfig (Table 3, stage 1: 80k iterations)."""

from detectron2.config import LazyCall as L
from detectron2.evaluation import COCOEvaluator

from ion_d2.engine.trainer import has_compiled_ops

from .common.ion_vgg16 import dataloader, lr_multiplier, model, optimizer, train

model.heads.roi_heads.num_classes = 80
# Section 4.4: voting at ~0.85 IoU for the COCO metric (voting itself stays off).
model.heads.roi_heads.box_voting_iou = 0.85
# 80 COCO classes + background (255: crowd regions, ignored).
model.heads.sem_seg_head.num_classes = 81

# COCO 2014 train with labels rendered from its masks (tools/coco_to_semseg.py).
dataloader.train.dataset.names = "coco_2014_train_ionseg"
dataloader.test.dataset.names = "coco_2014_minival"
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}", use_fast_impl=L(has_compiled_ops)()
)

train.max_iter = 80000
train.output_dir = "output/ion_vgg16_coco_stage1_lazy"
