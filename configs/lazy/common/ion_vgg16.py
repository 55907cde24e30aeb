"""
configs/Base-ION-VGG16.yaml as a LazyConfig: Figure 1's architecture and section 4.1's training
recipe on the model zoo's common/ pieces. Leaf configs set datasets, classes and schedule. Every
input shape (channels, strides, the box head's input) is inferred by
ion_d2.modeling.builder.build_ion_rcnn.
"""

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNOutputLayers

from ion_d2 import IONVGG16, IONROIHeads, IONSegRegularizerHead
from ion_d2.data import IONDatasetMapper
from ion_d2.engine.solver import clipped_optimizer, ion_exponential_lr
from ion_d2.modeling.box_head import IONFCHead
from ion_d2.modeling.builder import build_ion_rcnn
from ion_d2.modeling.context import IRNN
from ion_d2.modeling.skip_pooling import IONSkipPooler

model = L(build_ion_rcnn)(
    backbone=L(IONVGG16)(
        in_channels=3,
        out_features=["conv3", "conv4", "conv5"],
        width_mult=1.0,
        norm="",
        # Section 4.1, stage 1: conv1_1 ... conv5_3 frozen (stage 2: 2).
        freeze_at=5,
    ),
    # Built by build_ion_rcnn on the backbone's shapes (not by instantiate).
    heads=dict(
        # Figure 3's 2x stacked 4-direction IRNN on conv5 (section 3.2), the "paper" wiring.
        context=L(IRNN)(
            in_feature="conv5",
            hidden_dim=512,
            num_layers=2,
            recurrent="learned",
            directions="all",
            first_step_bias=False,
            output_all_layers=False,
            shared_input_to_hidden=True,
            concat_dropout=0.25,
            wiring="paper",
        ),
        # Section 3.2 / Table 6: the segmentation loss on the context features (training only).
        sem_seg_head=L(IONSegRegularizerHead)(
            in_feature="context",
            num_classes="???",
            ignore_value=255,
            loss_weight=1.0,
        ),
        # An RPN on conv5 in place of the paper's selective-search proposals.
        proposal_generator=L(RPN)(
            in_features=["conv5"],
            head=L(StandardRPNHead)(),
            anchor_generator=L(DefaultAnchorGenerator)(
                sizes=[[32, 64, 128, 256, 512]], aspect_ratios=[[0.5, 1.0, 2.0]], offset=0.0
            ),
            anchor_matcher=L(Matcher)(
                thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True
            ),
            box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
            batch_size_per_image=256,
            positive_fraction=0.5,
            pre_nms_topk=(12000, 6000),
            post_nms_topk=(2000, 2000),
            nms_thresh=0.7,
        ),
        roi_heads=L(IONROIHeads)(
            num_classes="???",
            # Section 4.1: 128 ROIs per image; Fast R-CNN's FG_FRACTION 0.25 and overlaps
            # (IoU < 0.1 never sampled, [0.1, 0.5) background, >= 0.5 foreground).
            batch_size_per_image=128,
            positive_fraction=0.25,
            proposal_matcher=L(Matcher)(
                thresholds=[0.1, 0.5], labels=[-1, 0, 1], allow_low_quality_matches=False
            ),
            proposal_append_gt=True,
            # Section 3.1: skip pooling from conv3-conv5 and the context features.
            box_in_features=["conv3", "conv4", "conv5", "context"],
            box_pooler=L(IONSkipPooler)(
                output_size=7,
                sampling_ratio=0,
                pooler_type="ROIPool",
                norm="roi",
                scale="learned",
                # Section 5.2: measured on the training set before the first step.
                scale_init=-1.0,
                out_channels=512,
                dropout=0.25,
            ),
            # VGG16's fc6/fc7 with Fast R-CNN's dropout.
            box_head=L(IONFCHead)(fc_dims=[4096, 4096], dropout=0.5),
            box_predictor=L(FastRCNNOutputLayers)(
                num_classes="${..num_classes}",
                box2box_transform=L(Box2BoxTransform)(weights=(10.0, 10.0, 5.0, 5.0)),
                smooth_l1_beta=1.0,
                # Section 4.1: scores > 0.05, at most 100 boxes; Fast R-CNN's NMS 0.3.
                test_score_thresh=0.05,
                test_nms_thresh=0.3,
                test_topk_per_image=100,
            ),
        ),
    ),
    # torchvision's ImageNet VGG16 (tools/convert_vgg16_to_d2.py): RGB, std-normalised.
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
    backbone_per_image=True,
    backbone_per_image_train=True,
)

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
# Fast R-CNN's single scale, 600 px (longer edge <= 1000), and horizontal flips.
dataloader.train.mapper = L(IONDatasetMapper)(
    is_train=True,
    augmentations=[
        L(T.ResizeShortestEdge)(short_edge_length=(600,), max_size=1000, sample_style="choice"),
        L(T.RandomFlip)(horizontal=True),
    ],
    image_format="RGB",
    sem_seg_num_classes="${model.heads.sem_seg_head.num_classes}",
    sem_seg_ignore_value="${model.heads.sem_seg_head.ignore_value}",
)
# Section 4.1: 4 images per update.
dataloader.train.total_batch_size = 4
dataloader.test.mapper = L(IONDatasetMapper)(
    is_train=False,
    augmentations=[L(T.ResizeShortestEdge)(short_edge_length=600, max_size=1000)],
    image_format="RGB",
)

optimizer = model_zoo.get_config("common/optim.py").SGD
# Section 4.1: "We measure the norm of the parameter gradient vector and rescale it if its L2
# norm is above 20" (one norm over all parameters; see Base-ION-VGG16.yaml).
optimizer._target_ = L(clipped_optimizer)(
    optimizer="torch.optim.SGD", clip_type="full_model", clip_value=20.0, norm_type=2.0
)
optimizer.lr = 0.005
optimizer.momentum = 0.9
optimizer.weight_decay = 0.0005
# Fast R-CNN's VGG16 train.prototxt: biases at "lr_mult: 2", "decay_mult: 0".
optimizer.params.base_lr = "${..lr}"
optimizer.params.bias_lr_factor = 2.0
optimizer.params.weight_decay_bias = 0.0
optimizer.params.weight_decay_norm = 0.0

# Section 4.1's exponential decay (stage 1: 5e-3 -> 1e-4), no warmup.
lr_multiplier = L(ion_exponential_lr)(
    base_lr="${..optimizer.lr}",
    end_lr=0.0001,
    max_iter="${..train.max_iter}",
    warmup_iters=0,
    warmup_factor=0.001,
    warmup_method="linear",
)

train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = "checkpoints/vgg16_imagenet_d2.pth"
train.checkpointer.period = 5000
# Evaluate once, after training (TEST.EVAL_PERIOD 0).
train.eval_period = 0
# Section 4.1: a fixed seed.
train.seed = 1
# Section 5.2: images the skip-pooling scale (scale_init -1) is measured on.
train.ion_scale_measure_images = 100
# train_net.py's ION_KEEP_FREED_CPU_MEMORY (not from the paper): the process keeps the CPU memory
# a step frees for the next step (ion_d2/engine/cpu_memory.py); false: the allocator's defaults.
train.ion_keep_freed_cpu_memory = True
