"""
configs/ION_R50_FPN_1x.yaml as a LazyConfig: ION's IRNN context added into the levels of the model
zoo's R50-FPN (common/models/mask_rcnn_fpn.py without the mask head), COCO 2017, the 1x schedule.
"""

from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.roi_heads import StandardROIHeads

from ion_d2.modeling.builder import build_ion_rcnn
from ion_d2.modeling.context import IRNN
from ion_d2.modeling.context.into_levels import IONContextIntoLevels

zoo = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
zoo.backbone.bottom_up.freeze_at = 2
rpn = zoo.proposal_generator
# Inferred from the FPN's outputs and the anchor generator (build_ion_rcnn).
del rpn.head.in_channels, rpn.head.num_anchors, rpn.anchor_generator.strides

# The zoo's box branch as it is (StandardROIHeads, each ROI pooled from its level); its shapes are
# inferred (build_ion_rcnn).
box = zoo.roi_heads
del box.box_head.input_shape, box.box_predictor.input_shape, box.box_pooler.scales

model = L(build_ion_rcnn)(
    backbone=zoo.backbone,
    heads=dict(
        # Beyond the paper, as configs/Base-ION-RCNN-FPN.yaml (issue 25): the IRNN on p5 (section
        # 3.2's top conv layer; Figure 3's wiring; item 2: "no need for dropout anywhere")
        # added into p2-p5 before the RPN and the box head read them, from a detached p5.
        context=L(IONContextIntoLevels)(
            context=L(IRNN)(in_feature="p5", hidden_dim=512, concat_dropout=0.0, wiring="paper"),
            targets=["p2", "p3", "p4", "p5"],
            detach_input=True,
        ),
        proposal_generator=rpn,
        roi_heads=L(StandardROIHeads)(
            num_classes=80,
            batch_size_per_image=box.batch_size_per_image,
            positive_fraction=box.positive_fraction,
            proposal_matcher=box.proposal_matcher,
            box_in_features=box.box_in_features,
            box_pooler=box.box_pooler,
            box_head=box.box_head,
            box_predictor=box.box_predictor,
        ),
    ),
    pixel_mean=zoo.pixel_mean,
    pixel_std=zoo.pixel_std,
    input_format=zoo.input_format,
)

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.use_instance_mask = False
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
train.max_iter = 90000
train.eval_period = 0
train.output_dir = "output/ion_r50_fpn_1x_lazy"
# train_net.py's ION_KEEP_FREED_CPU_MEMORY: CPU training keeps the memory a step frees for the
# next (ion_d2/engine/cpu_memory.py); false: the allocator's defaults.
train.ion_keep_freed_cpu_memory = True
