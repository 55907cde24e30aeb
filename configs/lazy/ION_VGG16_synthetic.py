"""
configs/ION_VGG16_synthetic.yaml as a LazyConfig: ION trained from scratch on the bundled
synthetic dataset on a CPU, at 1/4 width with BatchNorm (that file states why each value
differs from Base-ION-VGG16.yaml). The model has the YAML preset's parameter names and shapes,
so checkpoints of the two load into each other. Data order differs: this config uses
Detectron2's train loader, train_net.py ion_d2's per-iteration one.
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.evaluation import COCOEvaluator

from ion_d2.data import ResizeLongestEdgeCap
from ion_d2.engine.trainer import has_compiled_ops

from .common.ion_vgg16 import dataloader, lr_multiplier, model, optimizer, train

model.backbone.width_mult = 0.25
model.backbone.norm = "BN"
model.backbone.freeze_at = 0
# One trunk pass over the padded batch in training: BatchNorm's statistics from the batch.
model.backbone_per_image_train = False
# The images keep their own size, capped at 1000 px (INPUT.MIN_SIZE_TEST 0).
model.unresized_test_max_size = 1000

model.heads.context.hidden_dim = 64
# No dropout anywhere: the paper's "D" setting.
model.heads.context.concat_dropout = 0.0
# background + 6 things + road, water, moon
model.heads.sem_seg_head.num_classes = 10

rpn = model.heads.proposal_generator
rpn.anchor_generator.sizes = [[16, 32, 64, 128]]
rpn.pre_nms_topk = (2000, 1000)
rpn.post_nms_topk = (500, 300)

roi_heads = model.heads.roi_heads
roi_heads.num_classes = 6
# Detectron2's sampling and NMS (the README's measured figures).
roi_heads.proposal_matcher.thresholds = [0.5]
roi_heads.proposal_matcher.labels = [0, 1]
roi_heads.box_predictor.test_nms_thresh = 0.5
roi_heads.box_pooler.out_channels = 128
# Measured for this trunk at initialisation (tools/measure_roi_norms.py); fixed, as the YAML.
roi_heads.box_pooler.scale_init = 100.0
roi_heads.box_pooler.dropout = 0.0
roi_heads.box_head.fc_dims = [256, 256]
roi_heads.box_head.dropout = 0.0

dataloader.train.dataset.names = "ion_synth_train"
dataloader.train.mapper.augmentations = [
    L(ResizeLongestEdgeCap)(max_size=1000),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "ion_synth_val"
dataloader.test.mapper.augmentations = [L(ResizeLongestEdgeCap)(max_size=1000)]
dataloader.test.num_workers = 1
dataloader.evaluator = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}", use_fast_impl=L(has_compiled_ops)()
)

# From scratch: a higher start than the paper's 5e-3, with warmup; Detectron2's bias LR and
# decay and per-tensor clipping at 80 (the README's figures).
optimizer.lr = 0.01
optimizer._target_.clip_type = "norm"
optimizer._target_.clip_value = 80.0
optimizer.params.bias_lr_factor = 1.0
optimizer.params.weight_decay_bias = None
lr_multiplier.end_lr = 0.0005
lr_multiplier.warmup_iters = 50

train.init_checkpoint = ""
train.device = "cpu"
train.max_iter = 1000
train.checkpointer.period = 200
train.output_dir = "output/ion_vgg16_synthetic_lazy"
