"""configs/ION_VGG16_VOC0712_stage1.yaml as a LazyConfig (Table 1's 07+12+S, stage 1)."""

from detectron2.config import LazyCall as L
from detectron2.evaluation import PascalVOCDetectionEvaluator

from .common.ion_vgg16 import dataloader, lr_multiplier, model, optimizer, train

model.heads.roi_heads.num_classes = 20
# 20 VOC classes + background (255: VOC's void border, ignored).
model.heads.sem_seg_head.num_classes = 21

# VOC 2007 + 2012 trainval with segmentation labels (tools/voc_to_semseg.py writes them).
dataloader.train.dataset.names = ("voc_2007_trainval_ionseg", "voc_2012_trainval_ionseg")
dataloader.test.dataset.names = "voc_2007_test"
dataloader.evaluator = L(PascalVOCDetectionEvaluator)(dataset_name="${..test.dataset.names}")

train.max_iter = 40000
train.output_dir = "output/ion_vgg16_voc0712_stage1_lazy"
