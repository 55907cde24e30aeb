"""
configs/ION_R50_FPN_1x.yaml as a LazyConfig: ION's IRNN context and skip pooling on the model
zoo's R50-FPN (common/models/mask_rcnn_fpn.py without the mask head), COCO 2017, the 1x schedule.
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import FastRCNNConvFCHead

from ion_d2 import IONROIHeads
from ion_d2.modeling.builder import build_ion_rcnn
from ion_d2.modeling.context import IRNN
from ion_d2.modeling.skip_pooling import IONSkipPooler

zoo = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
zoo.backbone.bottom_up.freeze_at = 2
rpn = zoo.proposal_generator
# Inferred from the FPN's outputs and the anchor generator (build_ion_rcnn).
del rpn.head.in_channels, rpn.head.num_anchors, rpn.anchor_generator.strides

model = L(build_ion_rcnn)(
    backbone=zoo.backbone,
    heads=dict(
        # Section 3.2 reads the top conv layer; on FPN the coarsest level the ROI heads pool.
        # Figure 3's wiring; section 3.2 item 2: "no need for dropout anywhere".
        context=L(IRNN)(in_feature="p5", hidden_dim=512, concat_dropout=0.0, wiring="paper"),
        proposal_generator=rpn,
        roi_heads=L(IONROIHeads)(
            num_classes=80,
            batch_size_per_image=512,
            positive_fraction=0.25,
            proposal_matcher=L(Matcher)(
                thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False
            ),
            # Every ROI from every level plus the context (the FPN pooler takes one level).
            box_in_features=["p2", "p3", "p4", "p5", "context"],
            box_pooler=L(IONSkipPooler)(
                output_size=7,
                sampling_ratio=0,
                pooler_type="ROIAlignV2",
                # Section 5.2: the mean pooled norm of p5 on the training set.
                scale_init=-1.0,
                # The FPN box head's input width.
                out_channels=256,
                dropout=0.0,
            ),
            box_head=L(FastRCNNConvFCHead)(conv_dims=[], fc_dims=[1024, 1024]),
            box_predictor=zoo.roi_heads.box_predictor,
        ),
    ),
    pixel_mean=zoo.pixel_mean,
    pixel_std=zoo.pixel_std,
    input_format=zoo.input_format,
)
del model.heads.roi_heads.box_predictor.input_shape

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 90000
train.eval_period = 0
train.ion_scale_measure_images = 100
train.output_dir = "output/ion_r50_fpn_1x_lazy"
