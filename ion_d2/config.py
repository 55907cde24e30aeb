"""ION's config keys.

Section and table numbers refer to Bell et al., "Inside-Outside Net: Detecting Objects in
Context with Skip Pooling and Recurrent Neural Networks", CVPR 2016.
"""

import os
import re
from typing import Optional, Sequence

import yaml
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .data.builtin_ionseg import ION_SEG_SUFFIX
from .data.selective_search_proposals import default_proposal_file

# MODEL.ION.PROPOSALS's values.
PROPOSALS = ("generator", "selective_search")


def add_ion_config(cfg: CN) -> None:
    """
    Add ION's keys to a Detectron2 config (in place). Call it on ``get_cfg()`` before merging
    a file that uses them. It touches only the config it is given.
    """
    _C = cfg

    _C.MODEL.ION = CN()

    # ---------------------------------------------------------------------------------------
    # VGG16 trunk (section 3; Fast R-CNN's VGG16 without pool5). Its features are named
    # "conv1" ... "conv5" (outputs of conv1_2, conv2_2, conv3_3, conv4_3, conv5_3) at strides
    # 1, 2, 4, 8, 16. Freezing uses MODEL.BACKBONE.FREEZE_AT: K freezes conv1..convK
    # (section 4.1: stage 1 freezes conv1-conv5, i.e. 5; stage 2 freezes conv1-conv2, i.e. 2).
    # ---------------------------------------------------------------------------------------
    _C.MODEL.ION.VGG16 = CN()
    # Features the backbone returns; any of "conv1" ... "conv5" (Figure 1 pools conv3-conv5).
    _C.MODEL.ION.VGG16.OUT_FEATURES = ["conv3", "conv4", "conv5"]
    # Channel width multiplier for CPU-sized runs; 1.0 gives VGG16's exact channels
    # (64, 128, 256, 512, 512), which the ImageNet weights need.
    _C.MODEL.ION.VGG16.WIDTH_MULT = 1.0
    # Normalization after each conv ("" = none, as in VGG16; or "BN", "GN", "FrozenBN", ...).
    _C.MODEL.ION.VGG16.NORM = ""

    # At inference, run the backbone (any MODEL.BACKBONE, not only VGG16) once per group of
    # equally padded images, each group padded only to the backbone's size_divisibility, and
    # zero-pad the features to the batch's size: a conv at an image's border then sees the zeros
    # it sees alone, not the activations of the batch's padding, so no feature depends on the
    # other images. Section 4.1: "We use 4 images per mini-batch, implemented as 4
    # forward/backward passes of single image mini-batches, with gradient accumulation." Images
    # of one size take a single batched pass either way; with mixed sizes it costs one pass per
    # size (on a GPU a batched trunk is faster). False gives Detectron2's usual single pass over
    # the padded batch. Training: BACKBONE_PER_IMAGE_TRAIN.
    _C.MODEL.ION.BACKBONE_PER_IMAGE = True
    # The same in training. True keeps section 4.1's single-image passes for the trunk (the
    # paper's VGG16 has no BatchNorm, so only the padding differs). False runs one pass over the
    # padded batch: with BatchNorm in training mode (VGG16.NORM "BN", the synthetic configs)
    # per-size passes compute the statistics of each image alone, which cost ION about 5 AP on
    # the bundled data (docs/BENCHMARKS.md, "Accuracy gate"); IONRCNN warns of that combination.
    _C.MODEL.ION.BACKBONE_PER_IMAGE_TRAIN = True

    # ---------------------------------------------------------------------------------------
    # Context module (section 3.2, Figure 3; alternatives of Table 7). It reads one backbone
    # feature and adds a feature named "context" with that feature's stride.
    # ---------------------------------------------------------------------------------------
    _C.MODEL.ION.CONTEXT = CN()
    # Name in ION_CONTEXT_REGISTRY: "IRNN" (Table 7d, the paper's model), "StackedConv"
    # (Table 7a/b), "GlobalAvgPool" (Table 7c, ParseNet), "IRNNAndStackedConv" (Table 10c: both,
    # adding "context_conv" for the ROI heads to pool), or "" for no context module.
    _C.MODEL.ION.CONTEXT.NAME = "IRNN"
    # The backbone feature the context module reads (section 3.2: conv5; "res4"/"p5" for
    # ResNet-C4/FPN backbones).
    _C.MODEL.ION.CONTEXT.IN_FEATURE = "conv5"
    # Beyond the paper (issue 25): features the context is also added into (a 1x1 conv, a
    # per-cell layer norm whose scale starts at 0, nearest upsampling), before the proposal
    # generator and the ROI heads read them: a feature pyramid's levels, e.g. ["p2", "p3",
    # "p4", "p5"] (ion_d2/modeling/context/into_levels.py). [] (the paper): the context only
    # reaches the ROI heads that pool it.
    _C.MODEL.ION.CONTEXT.ADD_TO_FEATURES = []
    # Beyond the paper (issue 25), with ADD_TO_FEATURES only: the context module reads a
    # detached copy of IN_FEATURE, so its gradient (and its segmentation loss's) trains the
    # context module and the added term but not the backbone; the levels it is added to train
    # as usual. False (the paper's end-to-end training): the context's gradient reaches the
    # backbone through IN_FEATURE.
    _C.MODEL.ION.CONTEXT.DETACH_INPUT = False

    _C.MODEL.ION.CONTEXT.IRNN = CN()
    # Hidden units per direction (Table 9 varies 128/512/1024; the paper uses 512).
    _C.MODEL.ION.CONTEXT.IRNN.HIDDEN_DIM = 512
    # Number of stacked 4-direction IRNN layers (Table 8; the paper uses 2).
    _C.MODEL.ION.CONTEXT.IRNN.NUM_LAYERS = 2
    # Recurrent transition Whh (Table 9): "learned" (a learned 1x1 transition initialised to the
    # identity, "IRNN") or "removed" (Whh = I fixed: h = max(0, h_prev + x), section 3.2 item 1).
    _C.MODEL.ION.CONTEXT.IRNN.RECURRENT = "learned"
    # Directions per layer (Table 10a): "all" (right, left, down, up in every layer) or
    # "lr_then_ud" (odd layers left/right, even layers up/down, as ReNet).
    _C.MODEL.ION.CONTEXT.IRNN.DIRECTIONS = "all"
    # A separate learned bias b0 for each direction's first step (section 3.2 item 3).
    _C.MODEL.ION.CONTEXT.IRNN.FIRST_STEP_BIAS = False
    # Also output every intermediate IRNN layer as "context_1", "context_2", ... so the ROI
    # heads can pool from them (Table 10b: "pool out of both IRNNs"). The top layer is always
    # "context".
    _C.MODEL.ION.CONTEXT.IRNN.OUTPUT_ALL_LAYERS = False
    # One input-to-hidden 1x1 conv shared by the directions (True), or one per direction. Section
    # 3.2: "the input-to-hidden transition is a 1x1 convolution, and that it can be shared
    # across different directions. Sharing this transition allows us to remove 6 conv layers in
    # total with a negligible effect on accuracy (-0.1 mAP)." False stacks the directions' convs
    # in one conv's output channels (a checkpoint of the other setting does not load).
    _C.MODEL.ION.CONTEXT.IRNN.SHARED_INPUT_TO_HIDDEN = True
    # Dropout between each IRNN layer's concat of the directions and its hidden-to-output 1x1
    # conv, in training only; 0 removes it (the "D" setting of Tables 1-3). Section 3.2 item 2:
    # "To prevent overfitting, we include dropout layers (p = 0.25) after each concat layer in
    # all experiments. We later found that in fact the model is underfitting and there is no
    # need for dropout anywhere in the network."
    _C.MODEL.ION.CONTEXT.IRNN.CONCAT_DROPOUT = 0.25
    # How the IRNN layers connect (ion_d2/modeling/context/irnn.py states both;
    # docs/PAPER_EXPERIMENTS.md, "The IRNN's wiring").
    # "paper": Figure 3, whose labels read as two "input-to-hidden transition"s and one
    #   "hidden-to-output transition": 1x1 -> scans -> concat -> 1x1 -> scans -> concat -> 1x1.
    #   Section 3.2: "The output from the IRNN is computed by concatenating the hidden state from
    #   the four directions at each spatial location"; "The subsequent 1x1 convolution then mixes
    #   this information together as a dimension reduction"; "The RNNs sit on top of conv5 and
    #   produce an output with the same shape as conv5" (the last 1x1 conv, linear).
    # "per_layer": every layer is 1x1 -> scans -> concat -> 1x1 back to the input's channels ->
    #   ReLU (four 1x1 convs for 2 layers), ion_d2's wiring up to 0.1.x.
    # The default is the paper's (since 0.2.0), so that ION's parts added to any config get
    # Figure 3; the bundled synthetic configs set "per_layer" (their measured figures). A
    # checkpoint of the other wiring (e.g. written before this key existed, whose stored config
    # has no WIRING) is recognised from its keys and loaded for evaluation and prediction
    # (IONCheckpointer, with a warning); training from it is refused, naming this key.
    _C.MODEL.ION.CONTEXT.IRNN.WIRING = "paper"

    _C.MODEL.ION.CONTEXT.CONV = CN()
    # Table 7a: 2 x 512x3x3; Table 7b: 2 x 256x5x5. Each conv is followed by ReLU.
    _C.MODEL.ION.CONTEXT.CONV.NUM_LAYERS = 2
    _C.MODEL.ION.CONTEXT.CONV.KERNEL_SIZE = 3
    _C.MODEL.ION.CONTEXT.CONV.CHANNELS = 512

    # ---------------------------------------------------------------------------------------
    # Skip pooling (section 3.1, Tables 4-5). IONROIHeads pools every ROI from each feature in
    # MODEL.ROI_HEADS.IN_FEATURES (any backbone feature plus "context") with one single-scale
    # pooler per feature (MODEL.ROI_BOX_HEAD.POOLER_TYPE / POOLER_RESOLUTION), normalises,
    # concatenates, re-scales and reduces with a 1x1 conv.
    # ---------------------------------------------------------------------------------------
    _C.MODEL.ION.SKIP_POOL = CN()
    # L2 normalisation of each pooled feature (Table 5): "roi" (over all C x 7 x 7 entries of
    # each ROI, the paper's default), "location" (across channels at each cell, as ParseNet),
    # or "none" (Table 4's plain "1x1" column).
    _C.MODEL.ION.SKIP_POOL.NORM = "roi"
    # Re-scaling after normalisation (section 3.1, Table 5): "learned" (a learnable per-channel
    # scale) or "fixed" (a constant). Ignored when NORM is "none".
    _C.MODEL.ION.SKIP_POOL.SCALE = "learned"
    # Initial (or fixed) scale. Section 5.2: "To determine the initial scale, we measure the mean
    # scale of features pooled from conv5 on the training set, and use that as the fixed scale.
    # Using Fast R-CNN, we measured the mean norm to be approximately 1000 when summing over all
    # entries, and 130 when summing across channels."
    # -1: that procedure, on MODEL.ION.CONTEXT.IN_FEATURE (conv5) for every channel, which must
    #     be pooled, measured before the first step on SCALE_MEASURE_IMAGES training images by
    #     ion_d2.engine.SkipPoolScaleHook (ion_d2/engine/skip_pool_scale.py), which IONTrainer
    #     registers and another trainer adds with one line (docs/USAGE.md, "Which trainer");
    #     loaded weights that hold it keep theirs (stage 2 from stage 1); a model neither
    #     measured nor loaded refuses to run, naming that line.
    # 0: the paper's constants, 1000 for "roi" and 130 for "location" (Caffe VGG16 conv5,
    #     mean-subtracted input); refused with any backbone but build_ion_vgg16_backbone.
    #     > 0: that value.
    _C.MODEL.ION.SKIP_POOL.SCALE_INIT = 0.0
    # Number of training images (the first ones of DATASETS.TRAIN) SCALE_INIT -1 measures on
    # (section 5.2 measured on "the training set"); >= 1.
    _C.MODEL.ION.SKIP_POOL.SCALE_MEASURE_IMAGES = 100
    # Output channels of the 1x1 conv (Xavier init) after the concat: 512, fc6's input shape
    # (section 3.1). 0 removes the conv: with one feature and NORM "none" that is plain Fast
    # R-CNN pooling (Table 4's conv5-only baseline).
    _C.MODEL.ION.SKIP_POOL.REDUCE_DIM = 512
    # Dropout after the concat (section 3.2 item 2: p = 0.25); 0 removes it (the "D" setting of
    # Tables 1-3).
    _C.MODEL.ION.SKIP_POOL.CONCAT_DROPOUT = 0.25
    # Context just outside the box (beyond the paper, which pools every feature over the box
    # only): each ROI is also pooled from each feature in IN_FEATURES over its box enlarged
    # FACTOR times around its centre, as MR-CNN's contextual regions (Gidaris and Komodakis,
    # ICCV 2015), and that descriptor is L2-normalised, scaled and concatenated after the
    # others, before the 1x1 conv (docs/BENCHMARKS.md, "Context just outside the box").
    # [] (off): the paper. It did not resolve the bundled kite/bird pair; the local preset uses
    # MODEL.ION.LOCAL_CONTEXT (below) instead.
    _C.MODEL.ION.SKIP_POOL.ENLARGED = CN()
    _C.MODEL.ION.SKIP_POOL.ENLARGED.IN_FEATURES = []
    # > 1 when IN_FEATURES is set; 3: one box width left and right, one box height above and
    # below.
    _C.MODEL.ION.SKIP_POOL.ENLARGED.FACTOR = 3.0
    # Context just outside the box from fine features (beyond the paper, whose finest view
    # outside the box is the IRNN on conv5 at stride 16): a small learned branch
    # (ion_d2/modeling/local_context.py) pools IN_FEATURE over each box enlarged FACTOR times
    # with ROIAlign, after a 1x1 conv to REDUCE_DIM channels, to POOLER_RESOLUTION cells, runs
    # 3x3 convs of CONV_DIMS (2x2 max pooling between them) and a global max pool, and adds one
    # zero-initialised linear score per class to the box predictor's class scores, in training
    # and at inference (docs/BENCHMARKS.md, "Context just outside the box").
    # "" (off): the paper. "image": the normalised input image (stride 1; IONRCNN gives it to
    # the ROI heads), as configs/ION_VGG16_synthetic_local.yaml sets; or any feature of the
    # model (VGG16's "conv2", stride 2, once MODEL.ION.VGG16.OUT_FEATURES lists it). Needs
    # MODEL.ROI_HEADS.NAME "IONROIHeads".
    _C.MODEL.ION.LOCAL_CONTEXT = CN()
    _C.MODEL.ION.LOCAL_CONTEXT.IN_FEATURE = ""
    # >= 1; 2: half a box width left and right, half a box height above and below. In a proxy of
    # the bundled training (docs/BENCHMARKS.md, "The local-context branch"), the branch found
    # the kite/bird string in 400 steps for 3 of 3 seeds at 2, for 2 of 3 at 3.
    _C.MODEL.ION.LOCAL_CONTEXT.FACTOR = 2.0
    # ROIAlign's output side over the enlarged box; 24 keeps a 2-px structure next to a
    # 12-48 px box (2x: 24-96 px) visible.
    _C.MODEL.ION.LOCAL_CONTEXT.POOLER_RESOLUTION = 24
    # Channels of the 1x1 conv on IN_FEATURE before pooling (keeps ROIAlign's output small at
    # 1000 boxes).
    _C.MODEL.ION.LOCAL_CONTEXT.REDUCE_DIM = 16
    # Output channels of each 3x3 conv after pooling.
    _C.MODEL.ION.LOCAL_CONTEXT.CONV_DIMS = [32, 32, 64]
    # "GN" (GroupNorm after each 3x3 conv of the branch, per ROI) or "" (none). In the proxy,
    # without it the branch told kite from bird at 60-81 % after 400 steps (loss weights 1-16).
    _C.MODEL.ION.LOCAL_CONTEXT.NORM = "GN"
    # Weight of the branch's own loss in training: cross-entropy of its scores over the
    # foreground classes on the foreground ROIs, each object weighing once whatever its number
    # of ROIs ("loss_local_context"); 0: the branch learns only through the detector's
    # classification loss. On the image the branch shares no weights with the detector, so
    # this is its learning-rate factor; in the proxy, with GroupNorm, 1, 4 and 20 told kite from
    # bird at 68-87 % after 400 steps, 10 at 93 % and more.
    _C.MODEL.ION.LOCAL_CONTEXT.LOSS_WEIGHT = 10.0

    # Dropout after fc6 and fc7 of "IONFCHead" (Fast R-CNN's VGG16 uses 0.5); 0 removes it
    # (the "D" setting of Tables 1-3). fc sizes come from MODEL.ROI_BOX_HEAD.NUM_FC / FC_DIM.
    _C.MODEL.ION.FC_DROPOUT = 0.5
    # Truncated SVD of the box head's fc layers for faster detection, a test-time option of Fast
    # R-CNN (Girshick, ICCV 2015, section 3.1), whose test pipeline ION inherits (ION section 4.1:
    # "All of our experiments use Fast R-CNN"); the ION paper does not use it. Fast R-CNN: "the
    # single fully connected layer corresponding to W is replaced by two fully connected layers,
    # without a non-linearity between them. The first of these layers uses the weight matrix
    # Σ_t V^T (and no biases) and the second uses U (with the original biases associated with
    # W)." [] factors nothing; otherwise one rank t per fc layer (MODEL.ROI_BOX_HEAD.NUM_FC), each
    # 0 (keep that layer) or in [1, min(in, out)]; Fast R-CNN's VGG16 setting is [1024, 256]
    # (fc6 at rank 1024, fc7 at rank 256). An unfactored checkpoint is factored as it loads;
    # tools/compress_fc_svd.py writes a factored one (ion_d2/modeling/fc_svd.py).
    _C.MODEL.ION.FC_SVD_RANKS = []

    # ---------------------------------------------------------------------------------------
    # Proposals. Section 4.1: "For PASCAL VOC we use the same pre-computed selective search
    # boxes from Fast R-CNN, and for COCO we use the boxes precomputed by Hosang et al.";
    # section 4.5: "For all experiments, we are using selective search for object proposals".
    # ---------------------------------------------------------------------------------------
    # "generator": those of MODEL.PROPOSAL_GENERATOR as the config sets it (every preset: an RPN
    #   on the trunk, not from the paper).
    # "selective_search": the paper's kind of boxes, computed by OpenCV's selective search
    #   (tools/selective_search_proposals.py; not the paper's files). get_ion_cfg expands it:
    #   MODEL.PROPOSAL_GENERATOR.NAME "PrecomputedProposals", MODEL.LOAD_PROPOSALS True,
    #   DATASETS.PROPOSAL_FILES_TRAIN/TEST one file per dataset, the tool's
    #   $DETECTRON2_DATASETS/ss_proposals/<dataset>.pkl (a "_ionseg" copy reads its builtin's
    #   file: they are matched by image_id), DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN/TEST 2000
    #   (Figure 1: "evaluate 2000 proposed regions of interest"); OUTPUT_DIR and a trained run's
    #   MODEL.WEIGHTS (<run>/model_final.pth, <run>/stageN/model_final.pth) move to an "ss"
    #   folder beside the run (output/paper/table1/r_s -> output/paper/table1/ss/r_s), so the
    #   two settings never share a run folder. Keys given on the command line keep their value.
    #   A model built from a config that says "selective_search" but was not expanded (loaded
    #   without get_ion_cfg) is refused.
    _C.MODEL.ION.PROPOSALS = "generator"

    # ---------------------------------------------------------------------------------------
    # Test-time refinements ("W" in Tables 1-3, section 4.2).
    # ---------------------------------------------------------------------------------------
    _C.MODEL.ION.BOX_VOTING = CN()
    # Two rounds of box regression (the regressed boxes are scored again and pooled with the
    # first round's) followed by NMS and score-weighted voting (section 4.2).
    _C.MODEL.ION.BOX_VOTING.ENABLED = False
    # Boxes overlapping a kept box by at least this IoU vote on its location (section 4.2:
    # "boxes that overlap a kept box by at least 0.5 IoU contribute to the average"). For the
    # COCO metric, section 4.4: "we fixed this for our competition submission by raising the
    # voting IoU threshold from 0.5 to ∼0.85" (the COCO configs use 0.85).
    _C.MODEL.ION.BOX_VOTING.IOU_THRESH = 0.5
    # Which regressed boxes the second round scores (section 4.2: "the improved locations are
    # passed again through the network"). "top_class": each proposal's box regressed for its
    # top-scoring class, whose second pass gives scores and boxes for every class (R boxes per
    # image). "per_class": as MR-CNN's iterative localisation, for every proposal and class c
    # the box regressed for c is pooled again and gives its score and second regression for c
    # only: R x K boxes, so K times the second round's cost (20x on VOC, 80x on COCO), pooled
    # one class at a time. The paper's timing, 0.8 s per image "without two-stage bounding box
    # regression and 1.15s per image with it" (section 4.2), suggests one extra pass over the
    # ROIs, i.e. "top_class".
    _C.MODEL.ION.BOX_VOTING.RESCORE = "top_class"
    # How many of each image's proposals the second round scores: the k whose best first-round
    # class score (background excluded) is highest. 0: every proposal, as the paper ("the
    # improved locations are passed again through the network", section 4.2). Not a paper
    # setting: it makes the second round's cost k / R of the paper's (0.57x the baseline's time
    # with 1000 boxes, docs/BENCHMARKS.md "Speed"); a proposal outside the top k keeps its
    # first-round box and score as a candidate. docs/BENCHMARKS.md measures its AP on the demo.
    _C.MODEL.ION.BOX_VOTING.RESCORE_TOPK = 0
    # Which of each image's proposals the second round scores, by score: those whose best
    # first-round class score (background excluded) is at least this. 0: every proposal, as the
    # paper (section 4.2). Not a paper setting: the second round's cost then follows the
    # objects in the image, not the proposals. Keep it far below the test threshold
    # (MODEL.ROI_HEADS.SCORE_THRESH_TEST, section 4.1's 0.05): a proposal round 1 scores low is
    # often regressed onto an object and scored high in round 2. On the demo's model 0.001
    # re-scores 40 % of the proposals with no AP loss, 0.05 loses 2.3 AP (docs/BENCHMARKS.md,
    # "Box voting's second round on fewer boxes"). With RESCORE_TOPK, the top k of those.
    _C.MODEL.ION.BOX_VOTING.RESCORE_MIN_SCORE = 0.0

    # ---------------------------------------------------------------------------------------
    # Evaluation.
    # ---------------------------------------------------------------------------------------
    # Also report AP50 by object size on Pascal VOC-format test sets: "AP50_small",
    # "AP50_medium", "AP50_large" with COCO's box-area buckets (<= 32^2, 32^2-96^2, >= 96^2 px;
    # ion_d2/evaluation/voc_size.py states the matching rule), to check section 4.5's small-object
    # claim ("'Small' means area <= 32^2 px") on VOC data, whose stock evaluator reports no
    # sizes. COCO-format test sets report APs/APm/APl already; True with one raises an error.
    _C.TEST.ION_VOC_AP_BY_SIZE = False
    # Evaluation (train_net.py --eval-only) and IONPredictor refuse to run without weights, or
    # with weights that leave some of the model's keys unloaded, name keys it lacks or have
    # other shapes (Detectron2 only logs those; a model so loaded is partly random). True loads
    # what matches and runs anyway. Training is never strict: ImageNet weights have no heads
    # (not from the paper).
    _C.MODEL.ION.ALLOW_PARTIAL_WEIGHTS = False

    # Training keeps the CPU memory each step frees for the next (not from the paper; issue 27):
    # glibc's malloc then gives no allocation its own mmap and keeps its heap's free top, so a
    # step reuses the pages of the step before instead of faulting them in again (on the
    # project's 2-core VMs CPU steps 1.2-1.3x faster at the paper's scale, 1.0-1.2x on the
    # bundled data: docs/BENCHMARKS.md, "Freed memory kept for the next step"). The process's
    # resident memory stays near its peak. Where the C library is not glibc, a warning says it
    # is not applied. False: the allocator's defaults.
    _C.ION_KEEP_FREED_CPU_MEMORY = True

    # ---------------------------------------------------------------------------------------
    # Segmentation regularizer (section 3.2, Figure 3, Table 6): a training-only semantic
    # segmentation loss on the context features. The head is MODEL.SEM_SEG_HEAD.NAME
    # ("IONSegRegularizerHead"), reading MODEL.SEM_SEG_HEAD.IN_FEATURES (["context"]), with
    # NUM_CLASSES, IGNORE_VALUE (255) and LOSS_WEIGHT (1.0) from that node. The loss is
    # averaged over each image's labelled pixels, then over the batch's images, as the paper's
    # Caffe setup did (one image per pass, iter_size averaging the passes; section 4.1).
    # ---------------------------------------------------------------------------------------
    # Whether IONRCNN adds the segmentation loss (Table 6 "Use seg. loss?").
    _C.MODEL.ION.SEG_LOSS_ON = False

    # ---------------------------------------------------------------------------------------
    # Training recipe (section 4.1). SOLVER.LR_SCHEDULER_NAME = "IONExponentialLR" decays the
    # learning rate exponentially from SOLVER.BASE_LR to SOLVER.ION_END_LR over SOLVER.MAX_ITER
    # (stage 1: 5e-3 -> 1e-4; stage 2: 1e-3 -> 1e-5).
    # ---------------------------------------------------------------------------------------
    _C.SOLVER.ION_END_LR = 1e-4
    # Section 4.1's second stage, which train_net.py (and train_and_evaluate) run after the first
    # when ENABLED: "we first train for 40k iterations with conv1_1 through conv5_3 frozen, and
    # then another 100k iterations with only conv1_1 through conv2_2 frozen [...] When training
    # for COCO, we use 80k and 320k iterations respectively"; "The LR exponentially decays from
    # 5e-3 to 1e-4 in the first stage, and from 1e-3 to 1e-5 in the second stage." Stage 1 is the
    # config as it is, in OUTPUT_DIR/stage1; stage 2 is the same config with the four keys below
    # in place of the ones they name, from stage 1's model_final.pth, in OUTPUT_DIR/stage2
    # (ion_d2/engine/stages.py). False: one stage, the config as it is, in OUTPUT_DIR.
    _C.SOLVER.ION_STAGE2 = CN()
    _C.SOLVER.ION_STAGE2.ENABLED = False
    # Stage 2's SOLVER.MAX_ITER: 100k (VOC); the COCO presets set 320k.
    _C.SOLVER.ION_STAGE2.MAX_ITER = 100000
    # Stage 2's SOLVER.BASE_LR and SOLVER.ION_END_LR: 1e-3 -> 1e-5 (SOLVER.LR_SCHEDULER_NAME
    # "IONExponentialLR", the only schedule that reads ION_END_LR).
    _C.SOLVER.ION_STAGE2.BASE_LR = 1e-3
    _C.SOLVER.ION_STAGE2.END_LR = 1e-5
    # Stage 2's MODEL.BACKBONE.FREEZE_AT: 2 freezes conv1_1 through conv2_2.
    _C.SOLVER.ION_STAGE2.FREEZE_AT = 2

    # ---------------------------------------------------------------------------------------
    # Dataset check before the first training step (ion_d2/data/dataset_check.py): category
    # ids outside [0, ROI_HEADS.NUM_CLASSES), boxes of non-positive or non-finite width or
    # height, files that do not exist or cannot be read as 8-bit images (16-bit, truncated),
    # COCO jsons whose images share an id, and images whose shorter side after resizing is
    # under the trunk's stride are refused with one error per dataset (not from the paper).
    # ---------------------------------------------------------------------------------------
    # True drops boxes of non-positive or non-finite width or height from the training dicts
    # instead, logging the count (images left without boxes are removed too when
    # DATALOADER.FILTER_EMPTY_ANNOTATIONS); in test sets they are only counted, since the
    # evaluators read the ground truth themselves. The other problems are always refused.
    _C.DATALOADER.ION_DROP_INVALID_BOXES = False
    # True leaves training images whose files cannot be read as 8-bit images out of the
    # training dicts instead, logging them; an image that then fails to decode in training is
    # replaced by the next readable one of the dataset (the same for every run and resume),
    # with a warning. False: refused before training, or training stops naming the file. Test
    # sets are always refused.
    _C.DATALOADER.ION_SKIP_UNREADABLE_IMAGES = False
    # Boxes lying wholly outside their image (Detectron2 clips and then drops them) are
    # counted in the log; above this fraction of a dataset's boxes the dataset is refused,
    # as its coordinates are likely wrong (in [0, 1]; 1 never refuses).
    _C.DATALOADER.ION_MAX_OUTSIDE_BOX_FRACTION = 0.01


def get_ion_cfg(config_file: Optional[str] = None, opts: Sequence = ()) -> CN:
    """
    The config ion_d2's scripts run: Detectron2's defaults (``get_cfg()``) with ION's keys
    (:func:`add_ion_config`), then ``config_file`` when given, then ``opts`` (``KEY VALUE``
    pairs, as on the command line), then what ``MODEL.ION.PROPOSALS`` "selective_search"
    derives (see its comment above), ``opts`` winning over the derived values.

    Returns it unfrozen, as ``get_cfg()`` does: a caller may still set keys, then freezes it.

    Raises:
        ValueError: ``MODEL.ION.PROPOSALS`` is none of :data:`PROPOSALS`.
    """
    cfg = get_cfg()
    add_ion_config(cfg)
    if config_file:
        cfg.merge_from_file(config_file)
    opts = list(opts)
    cfg.merge_from_list(opts)
    _check_proposals_value(cfg)
    if cfg.MODEL.ION.PROPOSALS == "selective_search":
        _expand_selective_search(cfg)
        cfg.merge_from_list(opts)
    return cfg


def _expand_selective_search(cfg: CN) -> None:
    """
    Set the keys ``MODEL.ION.PROPOSALS`` "selective_search" stands for. A config already expanded
    (a run's stored config.yaml) comes out the same: its folders are already under "ss".
    """
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PrecomputedProposals"
    cfg.MODEL.LOAD_PROPOSALS = True
    for split in ("TRAIN", "TEST"):
        names = cfg.DATASETS[split]
        # A "_ionseg" copy holds the builtin's images: its file serves both.
        names = [n[: -len(ION_SEG_SUFFIX)] if n.endswith(ION_SEG_SUFFIX) else n for n in names]
        cfg.DATASETS[f"PROPOSAL_FILES_{split}"] = tuple(default_proposal_file(n) for n in names)
        cfg.DATASETS[f"PRECOMPUTED_PROPOSAL_TOPK_{split}"] = 2000
    cfg.OUTPUT_DIR = _selective_search_run(cfg.OUTPUT_DIR)
    folder, name = os.path.split(cfg.MODEL.WEIGHTS)
    if name == "model_final.pth" and folder:
        run, stage = os.path.split(folder)
        if re.fullmatch(r"stage\d+", stage) and run:  # ion_d2.engine.stages' stage folders
            folder = os.path.join(_selective_search_run(run), stage)
        else:
            folder = _selective_search_run(folder)
        cfg.MODEL.WEIGHTS = os.path.join(folder, name)


def _selective_search_run(run: str) -> str:
    """The run folder beside ``run`` for selective search: a/b -> a/ss/b (kept if under ss/)."""
    run = run.rstrip("/")
    if not run or "ss" in run.split("/"):
        return run
    parent, name = os.path.split(run)
    return os.path.join(parent, "ss", name)


def _check_proposals_value(cfg: CN) -> None:
    if cfg.MODEL.ION.PROPOSALS not in PROPOSALS:
        raise ValueError(
            f"MODEL.ION.PROPOSALS must be one of {PROPOSALS}; got {cfg.MODEL.ION.PROPOSALS!r}."
        )


def check_proposals(cfg: CN) -> None:
    """
    Refuse a config whose ``MODEL.ION.PROPOSALS`` is "selective_search" but that was not expanded
    (loaded with ``get_cfg()`` rather than :func:`get_ion_cfg`): its model would train and test
    on MODEL.PROPOSAL_GENERATOR's proposals while the config says selective search.
    ``IONRCNN.from_config`` calls it.

    Raises:
        ValueError: naming the keys and what to do.
    """
    _check_proposals_value(cfg)
    if cfg.MODEL.ION.PROPOSALS != "selective_search":
        return
    generator, load = cfg.MODEL.PROPOSAL_GENERATOR.NAME, cfg.MODEL.LOAD_PROPOSALS
    if generator != "PrecomputedProposals" or not load:
        raise ValueError(
            "MODEL.ION.PROPOSALS is 'selective_search', but the config was not expanded for it "
            f"(MODEL.PROPOSAL_GENERATOR.NAME {generator!r}, MODEL.LOAD_PROPOSALS {load}), so "
            "the model would use another proposal generator. Load the config with "
            "ion_d2.get_ion_cfg(config_file, opts), which sets the proposal files and "
            "generator, instead of get_cfg() and merge_from_file()."
        )


def check_config_file(path: str) -> None:
    """
    Refuse a YAML config file that sets no keys (empty, only comments, or not a mapping) before
    it is merged: fvcore's loader fails on it with a TypeError that names neither the file nor
    the problem.

    Raises:
        ValueError: naming the file and what it holds.
    """
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        what = "empty" if data is None else f"a {type(data).__name__}, not a mapping of keys"
        raise ValueError(
            f"{path} is {what}. A config file sets keys, e.g. _BASE_ (a file to start from, "
            "such as Base-ION-VGG16.yaml) and the keys that differ from it, as "
            "configs/ION_VGG16_synthetic.yaml does."
        )


def check_ion_config(cfg: CN) -> None:
    """
    Refuse values of the keys a training run reads that would otherwise fail later without
    naming the key (a division by zero at the first step, ``min()`` of an empty sequence), before
    any model is built. train_net.py and ``train_and_evaluate`` call it.

    Raises:
        ValueError: naming the key, its value and the accepted values.
    """
    # fmt: off
    counts = (
        ("SOLVER.MAX_ITER", cfg.SOLVER.MAX_ITER, 1, "training iterations"),
        ("SOLVER.CHECKPOINT_PERIOD", cfg.SOLVER.CHECKPOINT_PERIOD, 1, "iterations per checkpoint"),
        ("SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH, 1, "images per step, all processes"),
        ("TEST.EVAL_PERIOD", cfg.TEST.EVAL_PERIOD, 0, "iterations per evaluation; 0: at the end"),
    )
    # fmt: on
    for key, value, low, what in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key} must be an integer >= {low} ({what}); got {value!r}.")
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    if not sizes or not all(type(s) is int and s >= 0 for s in sizes):
        raise ValueError(
            "INPUT.MIN_SIZE_TRAIN must list one or more integers >= 0 (shorter sides to resize "
            f"training images to; 0 keeps an image's own size), e.g. (600,); got {sizes!r}."
        )
    if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "range" and len(sizes) != 2:
        raise ValueError(
            "INPUT.MIN_SIZE_TRAIN must be (low, high) with INPUT.MIN_SIZE_TRAIN_SAMPLING "
            f"'range'; got {sizes!r}."
        )
