"""Context just outside the box from fine features (issue 26): IONLocalContextHead
(MODEL.ION.LOCAL_CONTEXT) against a plain computation, its independence from the batch, that it
learns a thin structure outside the box, and how IONROIHeads uses it."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from model_utils import load_cfg, random_inputs, shrink_cfg
from torchvision.ops import roi_align

from ion_d2.modeling.local_context import (
    IMAGE_FEATURE,
    IONLocalContextHead,
    local_context_loss,
    matched_objects,
)

SYNTHETIC = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "configs",
    "ION_VGG16_synthetic.yaml",
)
ON = {
    "MODEL.ION.VGG16.OUT_FEATURES": ["conv2", "conv3", "conv4", "conv5"],
    "MODEL.ION.LOCAL_CONTEXT.IN_FEATURE": "conv2",
}


def _head(channels=3, stride=2, num_classes=2, factor=3.0, resolution=8, seed=0, norm=""):
    torch.manual_seed(seed)
    head = IONLocalContextHead(
        input_shape=ShapeSpec(channels=channels, stride=stride),
        num_classes=num_classes,
        factor=factor,
        resolution=resolution,
        reduce_dim=4,
        conv_dims=[5, 6],
        norm=norm,
    )
    # Non-zero scores, so that the comparisons below compare something.
    torch.nn.init.normal_(head.cls_score.weight)
    torch.nn.init.normal_(head.cls_score.bias)
    return head


def test_scores_are_the_plain_computation_over_the_enlarged_boxes():
    head = _head(factor=3.0, resolution=8).double()
    feature = torch.randn(1, 3, 20, 24, dtype=torch.float64)
    boxes = torch.tensor([[10.0, 8.0, 20.0, 22.0], [2.0, 3.0, 9.0, 7.0]], dtype=torch.float64)
    got = head(feature, [Boxes(boxes)], image_sizes=[(40, 48)])

    # By hand: each box 3 times as wide and high around its centre, ROIAlign (aligned) of the
    # reduced map with one zero row and column after it, conv, 2x2 max pool, conv, global max.
    centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, 1.5 * (boxes[:, 2:] - boxes[:, :2])
    enlarged = torch.cat([centre - half, centre + half], dim=1)
    x = F.pad(F.relu(head.reduce(feature)), (0, 1, 0, 1))
    rois = torch.cat([torch.zeros(2, 1, dtype=x.dtype), enlarged], dim=1)
    x = roi_align(x, rois, (8, 8), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    conv1, conv2 = head.convs[0], head.convs[2]
    x = F.relu(F.conv2d(x, conv1.weight, conv1.bias, padding=1))
    x = F.max_pool2d(x, 2, ceil_mode=True)
    x = F.relu(F.conv2d(x, conv2.weight, conv2.bias, padding=1))
    want = F.linear(x.amax(dim=(2, 3)), head.cls_score.weight, head.cls_score.bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.shape == (2, 3)


@pytest.mark.parametrize("norm", ["", "GN"])
def test_scores_do_not_depend_on_the_batch(norm):
    # A 30x36 image alone (its map padded to 16x20 by the batch) and beside a 64x80 one: its
    # enlarged boxes reach past its border, where the batch holds the other image's padding.
    head = _head(norm=norm).eval()
    small = torch.randn(1, 3, 15, 18)
    # Image 0 is 64x80 (a 32x40 map); image 1 is the small one, its padding full of values.
    batch = torch.randn(2, 3, 32, 40) * 5
    batch[1, :, :15, :18] = small[0]
    big_box = Boxes(torch.tensor([[2.0, 2, 9, 9]]))
    small_box = Boxes(torch.tensor([[20.0, 16.0, 30.0, 30.0]]))
    alone = head(small, [small_box], image_sizes=[(30, 36)])
    together = head(batch, [big_box, small_box], image_sizes=[(64, 80), (30, 36)])
    torch.testing.assert_close(together[1:], alone, rtol=1e-5, atol=1e-5)
    # Without the image sizes the padding is read, and the scores move.
    unmasked = head(batch, [big_box, small_box])
    assert not torch.allclose(unmasked[1:], alone, rtol=1e-3, atol=1e-3)


def test_it_starts_at_zero_and_learns_a_thin_line_outside_the_box():
    # Two classes pixel-identical inside the box (a 12x12 square); class 1 has a 2-px vertical
    # line from the middle of the box's bottom edge, class 0 one at the same distance elsewhere
    # (more than a box side from the box, outside the enlarged box).
    gen = torch.Generator().manual_seed(0)
    n, size = 64, 64
    images = torch.zeros(n, 1, size, size)
    boxes, labels = [], []
    for i in range(n):
        y, x = (int(v) for v in torch.randint(4, 20, (2,), generator=gen))
        images[i, 0, y : y + 12, x : x + 12] = 1.0
        label = i % 2
        if label:
            images[i, 0, y + 12 : y + 22, x + 5 : x + 7] = -1.0
        else:
            images[i, 0, y + 40 : y + 50, x + 5 : x + 7] = -1.0
        boxes.append(Boxes(torch.tensor([[x, y, x + 12, y + 12]], dtype=torch.float32)))
        labels.append(label)
    labels = torch.tensor(labels)
    head = IONLocalContextHead(
        input_shape=ShapeSpec(channels=1, stride=1),
        num_classes=1,
        factor=3.0,
        resolution=12,
        reduce_dim=8,
        conv_dims=[8, 8],
    )
    image_sizes = [(size, size)] * n
    assert head(images, boxes, image_sizes).abs().max() == 0  # zero-initialised

    # A fixed class score (what the detector's own head gives both: background index 1 here,
    # so class 0 is the "bird" and class 1 the "kite") plus the branch's.
    optimiser = torch.optim.SGD(head.parameters(), lr=0.05, momentum=0.9)
    first = None
    for _ in range(60):
        loss = F.cross_entropy(head(images, boxes, image_sizes)[:, :2], labels)
        first = loss.item() if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        right = (head(images, boxes, image_sizes)[:, :2].argmax(1) == labels).float().mean()
    assert loss.item() < 0.5 * first
    assert right >= 0.95


def test_roi_heads_add_its_scores_to_the_class_scores():
    cfg = shrink_cfg(load_cfg(SYNTHETIC, ON))
    model = build_model(cfg).eval()
    heads = model.roi_heads
    branch = heads.local_context
    assert isinstance(branch, IONLocalContextHead)
    assert heads.local_context_in_feature == "conv2" and branch.stride == 2
    assert branch.factor == cfg.MODEL.ION.LOCAL_CONTEXT.FACTOR
    torch.nn.init.normal_(branch.cls_score.bias)
    inputs = random_inputs(cfg, n=1)
    images = model.preprocess_image(inputs)
    features = model.extract_features(images)
    proposals = [
        Instances(images.image_sizes[0], proposal_boxes=Boxes(torch.tensor([[4.0, 6, 40, 50]])))
    ]
    with torch.no_grad():
        scores, deltas = heads._run_box_head(heads._box_head_inputs(features), proposals)
        plain = heads.box_predictor(
            heads.box_head(
                heads.box_pooler(
                    [features[f] for f in heads.box_in_features],
                    [p.proposal_boxes for p in proposals],
                    image_sizes=images.image_sizes,
                )
            )
        )
        extra = branch(features["conv2"], [p.proposal_boxes for p in proposals], images.image_sizes)
    torch.testing.assert_close(scores, plain[0] + extra)
    torch.testing.assert_close(deltas, plain[1])
    assert extra.abs().max() > 0

    # It trains with the model: the branch's layers get gradients from the detector's loss.
    model.train()
    with EventStorage():
        losses = model(random_inputs(cfg))
    sum(losses.values()).backward()
    assert branch.cls_score.weight.grad.abs().sum() > 0


def test_local_context_keys_are_checked():
    with pytest.raises(ValueError, match=r"LOCAL_CONTEXT.IN_FEATURE='conv2' is not a feature"):
        build_model(
            shrink_cfg(load_cfg(SYNTHETIC, {"MODEL.ION.LOCAL_CONTEXT.IN_FEATURE": "conv2"}))
        )
    with pytest.raises(ValueError, match=r"LOCAL_CONTEXT.FACTOR=0.5 must be >= 1"):
        build_model(shrink_cfg(load_cfg(SYNTHETIC, {**ON, "MODEL.ION.LOCAL_CONTEXT.FACTOR": 0.5})))
    with pytest.raises(ValueError, match=r"CONV_DIMS a non-empty list .* \(got \[\]\)"):
        build_model(
            shrink_cfg(load_cfg(SYNTHETIC, {**ON, "MODEL.ION.LOCAL_CONTEXT.CONV_DIMS": []}))
        )
    # Heads that would not add its scores refuse it.
    with pytest.raises(TypeError, match=r"LOCAL_CONTEXT.IN_FEATURE is 'conv2'.*StandardROIHeads"):
        build_model(
            shrink_cfg(
                load_cfg(
                    SYNTHETIC,
                    {
                        **ON,
                        "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
                        "MODEL.ROI_HEADS.IN_FEATURES": ["conv5"],
                    },
                )
            )
        )


def test_its_own_loss_is_the_foreground_cross_entropy_over_the_object_classes():
    scores = torch.randn(5, 4, requires_grad=True)  # 3 classes and background
    gt = torch.tensor([0, 3, 2, 3, 1])
    want = -torch.log_softmax(scores[[0, 2, 4], :3], dim=1)[[0, 1, 2], [0, 2, 1]].mean()
    torch.testing.assert_close(local_context_loss(scores, gt), want)
    none = local_context_loss(scores, torch.full((5,), 3))
    none.backward()
    assert float(none) == 0 and scores.grad.abs().sum() == 0

    cfg = shrink_cfg(load_cfg(SYNTHETIC, ON))
    for weight in (0.0, 2.0):
        cfg.MODEL.ION.LOCAL_CONTEXT.LOSS_WEIGHT = weight
        model = build_model(cfg).train()
        with EventStorage():
            losses = model(random_inputs(cfg))
        assert ("loss_local_context" in losses) == (weight > 0)
    # Weight 2 with zero-initialised scores: 2 log(K) over the foreground ROIs.
    k = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    torch.testing.assert_close(
        losses["loss_local_context"], torch.tensor(2 * math.log(k)), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match=r"LOCAL_CONTEXT.LOSS_WEIGHT=-1.0 must be >= 0"):
        build_model(
            shrink_cfg(load_cfg(SYNTHETIC, {**ON, "MODEL.ION.LOCAL_CONTEXT.LOSS_WEIGHT": -1.0}))
        )


TINY = os.path.join(os.path.dirname(SYNTHETIC), "ION_VGG16_tiny_cpu.yaml")


def _tiny_image(size, seed, boxes):
    h, w = size
    g = torch.Generator().manual_seed(seed)
    proposals = Instances(size, proposal_boxes=Boxes(torch.tensor(boxes)))
    proposals.objectness_logits = torch.ones(len(boxes))
    image = torch.randint(0, 256, (3, h, w), generator=g).float()
    return {"image": image, "height": h, "width": w, "proposals": proposals}


@pytest.mark.parametrize("feature", ["image", "conv2"])
def test_detections_with_the_branch_do_not_depend_on_the_batch(feature):
    overrides = {
        "MODEL.PROPOSAL_GENERATOR.NAME": "PrecomputedProposals",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
        "MODEL.ION.LOCAL_CONTEXT.IN_FEATURE": feature,
    }
    if feature == "conv2":
        overrides["MODEL.ION.VGG16.OUT_FEATURES"] = ["conv2", "conv3", "conv4", "conv5"]
    model = build_model(load_cfg(TINY, overrides)).eval()
    assert model._roi_heads_read_image == (feature == "image")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():  # trained weights have biases
            if name.endswith("bias") or name.startswith("roi_heads.local_context.cls_score"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    # A's enlarged boxes reach past its right and bottom edges, into B's padding.
    a = _tiny_image((72, 100), 1, [[4.0, 6.0, 40.0, 50.0], [50.0, 30.0, 100.0, 72.0]])
    b = _tiny_image((120, 128), 2, [[10.0, 10.0, 100.0, 110.0]])
    with torch.no_grad():
        alone = model([a])[0]["instances"]
        together = model([b, a])[1]["instances"]
        features = model.extract_features(model.preprocess_image([a]))
    assert (IMAGE_FEATURE in features) == (feature == "image")
    assert len(alone) > 0 and len(together) == len(alone)
    torch.testing.assert_close(together.scores, alone.scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        together.pred_boxes.tensor, alone.pred_boxes.tensor, rtol=1e-6, atol=1e-5
    )


def test_no_boxes_give_no_scores():
    head = _head(norm="GN")
    feature = torch.randn(2, 3, 10, 10, requires_grad=True)
    scores = head(feature, [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))], [(20, 20)] * 2)
    assert scores.shape == (0, 3)
    scores.sum().backward()  # and the backward pass runs


def test_each_object_weighs_once_in_its_loss():
    scores = torch.randn(6, 3)
    gt = torch.tensor([0, 0, 0, 1, 2, 2])  # 2 classes; 2 is background
    objects = torch.tensor([5, 5, 5, 7, 9, 9])
    ce = F.cross_entropy(scores[:4, :2], gt[:4], reduction="none")
    # Object 5's three ROIs together weigh as much as object 7's one.
    torch.testing.assert_close(local_context_loss(scores, gt, objects), (ce[:3].mean() + ce[3]) / 2)
    torch.testing.assert_close(local_context_loss(scores, gt), ce.mean())

    # Per image, ROIs matched to the same ground-truth box share an id; images never do.
    first = Instances((10, 10))
    first.gt_boxes = Boxes(torch.tensor([[0.0, 0, 4, 4], [2, 2, 6, 6], [0, 0, 4, 4]]))
    second = Instances((10, 10))
    second.gt_boxes = Boxes(torch.tensor([[0.0, 0, 4, 4]]))
    ids = matched_objects([first, second]).tolist()
    assert ids[0] == ids[2] and len({ids[0], ids[1], ids[3]}) == 3


def test_its_max_pooling_without_autograd_equals_the_kernel():
    pool = IONLocalContextHead(
        input_shape=ShapeSpec(channels=3, stride=1),
        num_classes=2,
        factor=2.0,
        resolution=8,
        reduce_dim=4,
        conv_dims=[4, 4],
    ).convs[1]
    for shape in [(5, 4, 24, 24), (3, 2, 7, 9)]:
        x = torch.randn(shape)
        x[0, 0, :2, :2] = 0.0  # ties
        with torch.no_grad():
            got = pool(x)
        want = F.max_pool2d(x, 2, stride=2, ceil_mode=True)
        assert torch.equal(got, want)
