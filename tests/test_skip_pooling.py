"""Skip pooling (section 3.1, Tables 4-5) against a hand computation with torchvision's ops."""

import re

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes
from model_utils import ref_dropout_mask
from torchvision.ops import roi_pool

from ion_d2.modeling.l2_normalize import inverse_l2_norms, l2_normalize_rois, l2_norms
from ion_d2.modeling.skip_pooling import PENDING_SCALE_FIX, IONSkipPooler

SHAPES = [
    ShapeSpec(channels=3, stride=4),
    ShapeSpec(channels=5, stride=8),
    ShapeSpec(channels=4, stride=16),
]


def _skip_pooler(**kwargs):
    """An IONSkipPooler max-pooling SHAPES to 7x7 bins; ``kwargs`` set or override the rest."""
    return IONSkipPooler(
        **{
            "input_shapes": SHAPES,
            "output_size": 7,
            "sampling_ratio": 0,
            "pooler_type": "ROIPool",
            **kwargs,
        }
    )


def _features(n=2, size=64):
    g = torch.Generator().manual_seed(0)
    return [
        torch.rand(n, s.channels, size // s.stride, size // s.stride, generator=g) for s in SHAPES
    ]


def _boxes():
    return [
        Boxes(torch.tensor([[0.0, 0.0, 40.0, 30.0], [10.0, 12.0, 63.0, 60.0]])),
        Boxes(torch.tensor([[5.0, 5.0, 20.0, 50.0]])),
    ]


def _rois(boxes):
    return torch.cat(
        [
            torch.cat([torch.full((len(b), 1), float(i)), b.tensor], dim=1)
            for i, b in enumerate(boxes)
        ]
    )


def test_l2_normalize_modes_by_hand():
    x = torch.randn(3, 4, 2, 2)
    roi = l2_normalize_rois(x, "roi")
    for r in range(3):
        assert torch.allclose(roi[r], x[r] / torch.sqrt((x[r] ** 2).sum()), atol=1e-6)
    loc = l2_normalize_rois(x, "location")
    for i in range(2):
        for j in range(2):
            v = x[:, :, i, j]
            assert torch.allclose(loc[:, :, i, j], v / v.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.equal(l2_normalize_rois(x, "none"), x)
    with pytest.raises(ValueError, match="'sum'.*roi"):
        l2_normalize_rois(x, "sum")


@pytest.mark.parametrize("mode", ["roi", "location"])
def test_inverse_l2_norms_values_and_gradient(mode):
    """inverse_l2_norms is 1 / l2_norms, bit for bit; its one-pass gradient equals autograd's
    chain (norm, clamp, reciprocal) in float64 to 1e-12 and in float32 to rounding, and is 0
    where the norm was clamped (an all-zero ROI, or cell with "location")."""
    g = torch.Generator().manual_seed(7)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        x = torch.randn(6, 5, 3, 4, generator=g, dtype=dtype)
        x[2] = 0.0  # clamped: no gradient
        x[4, :, 1, 2] = 0.0  # with "location", one clamped cell
        grad = torch.randn((6, 1, 1, 1) if mode == "roi" else (6, 1, 3, 4), generator=g)
        grad = grad.to(dtype)
        ref_x = x.clone().requires_grad_(True)
        ref = l2_norms(ref_x, mode).reciprocal()
        ref.backward(grad)
        mine_x = x.clone().requires_grad_(True)
        mine = inverse_l2_norms(mine_x, mode)
        mine.backward(grad)
        assert torch.equal(mine.detach(), ref.detach())
        torch.testing.assert_close(mine_x.grad, ref_x.grad, rtol=tol, atol=tol * 1e-3)
        assert float(mine_x.grad[2].abs().sum()) == 0.0
        assert bool(mine_x.grad.ne(0).any())
    with torch.no_grad():
        assert torch.equal(inverse_l2_norms(x, mode), l2_norms(x, mode).reciprocal())
    assert inverse_l2_norms(x, "none") is None
    with pytest.raises(ValueError, match="'rois'.*expected one of"):
        inverse_l2_norms(x.requires_grad_(True), "rois")


@pytest.mark.parametrize("norm,default_scale", [("roi", 1000.0), ("location", 130.0)])
def test_matches_reference_computation(norm, default_scale):
    pooler = _skip_pooler(
        norm=norm,
        scale="learned",
        out_channels=6,
        dropout=0.0,
    )
    assert isinstance(pooler.scale, torch.nn.Parameter)
    assert torch.all(pooler.scale == default_scale)
    with torch.no_grad():
        pooler.scale.uniform_(1.0, 2.0)
    feats, boxes = _features(), _boxes()
    out = pooler(feats, boxes)
    assert out.shape == (3, 6, 7, 7)

    rois = _rois(boxes)
    pooled = []
    for f, s in zip(feats, SHAPES):
        p = roi_pool(f, rois, output_size=7, spatial_scale=1.0 / s.stride)
        if norm == "roi":
            p = p / p.flatten(1).norm(dim=1)[:, None, None, None]
        else:
            p = p / p.norm(dim=1, keepdim=True).clamp(min=1e-12)
        pooled.append(p)
    ref = torch.cat(pooled, dim=1) * pooler.scale[None, :, None, None]
    ref = F.conv2d(ref, pooler.reduce.weight, pooler.reduce.bias)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    # Gradients reach the scale and the 1x1 conv.
    out.sum().backward()
    assert pooler.scale.grad.abs().sum() > 0 and pooler.reduce.weight.grad.abs().sum() > 0


def test_fixed_scale_no_reduce_and_no_norm():
    fixed = _skip_pooler(
        norm="roi",
        scale="fixed",
        scale_init=50.0,
        out_channels=0,
        dropout=0.0,
    )
    assert not any(True for _ in fixed.parameters())
    out = fixed(_features(), _boxes())
    assert out.shape == (3, 12, 7, 7) and fixed.out_channels == 12
    # Each feature's block has L2 norm 50 per ROI.
    norms = out[:, :3].flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, 50.0), rtol=1e-4)

    plain = _skip_pooler(
        input_shapes=SHAPES[:1],
        norm="none",
        out_channels=0,
        dropout=0.0,
    )
    feats, boxes = _features(), _boxes()
    ref = roi_pool(feats[0], _rois(boxes), output_size=7, spatial_scale=0.25)
    assert torch.allclose(plain(feats[:1], boxes), ref)


def test_dropout_after_concat_and_empty_boxes():
    pooler = _skip_pooler(
        pooler_type="ROIAlignV2",
        norm="roi",
        out_channels=0,
        dropout=0.25,
    )
    feats, boxes = _features(), _boxes()
    pooler.train()
    out = pooler(feats, boxes)
    zero_frac = (out == 0).float().mean().item()
    assert 0.15 < zero_frac < 0.35
    pooler.eval()
    assert torch.equal(pooler(feats, boxes), pooler(feats, boxes))
    empty = [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))]
    assert pooler(feats, empty).shape == (0, 12, 7, 7)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"norm": "l1"}, "'l1'"),
        ({"scale": "per-roi"}, "'per-roi'"),
        ({"dropout": 1.0}, "1.0"),
        ({"out_channels": -1}, "-1"),
        ({"input_shapes": []}, "at least one"),
        ({"scale_init": -2.0}, r"-1 \(measure it\).*got -2.0"),
        # A measured scale needs the pooled feature it is measured on.
        ({"scale_init": -1.0}, r"scale_reference None .* does not pool"),
        (
            {"scale_init": -1.0, "feature_names": ["a", "b", "c"], "scale_reference": "d"},
            r"scale_reference 'd' \(MODEL.ION.CONTEXT.IN_FEATURE\).*\['a', 'b', 'c'\]",
        ),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _skip_pooler(**kwargs)


def _spread_scale_pooler(norm, scale, out_channels, *, dropout):
    """A pooler of SHAPES whose scale (when it has one) differs channel by channel."""
    pooler = _skip_pooler(
        norm=norm,
        scale=scale or "learned",
        scale_init=0.0 if norm == "none" else 3.0,
        out_channels=out_channels,
        dropout=dropout,
    )
    if pooler.scale is not None:
        with torch.no_grad():
            pooler.scale.copy_(torch.linspace(0.5, 5.0, len(pooler.scale)))
    return pooler


def _mixed_boxes():
    """Boxes inside the 64x64 images, one off them, one larger than them."""
    return [
        Boxes(torch.tensor([[0.0, 0.0, 40.0, 30.0], [10.0, 12.0, 63.0, 60.0], [-9.0, 0, -1, 5]])),
        Boxes(torch.tensor([[5.0, 5.0, 20.0, 50.0], [0.0, 0.0, 255.0, 255.0]])),
    ]


@pytest.mark.parametrize(
    "norm,scale,out_channels",
    [
        ("roi", "learned", 6),
        ("location", "learned", 6),
        ("roi", "fixed", 0),
        ("none", "", 0),
        ("none", "", 6),
        ("location", "fixed", 0),
    ],
)
def test_inference_path_equals_training_path(norm, scale, out_channels):
    """Eval without autograd (sparse-table pooling, fused normalisation and channels-last 1x1
    conv) gives the training path's output (eval mode with autograd on), up to float rounding."""
    pooler = _spread_scale_pooler(norm, scale, out_channels, dropout=0.25).eval()
    g = torch.Generator().manual_seed(1)
    feats = [torch.relu(torch.randn(2, s.channels, 16, 16, generator=g)) for s in SHAPES]
    feats = [f.requires_grad_(True) for f in feats]
    boxes = _mixed_boxes()
    reference = pooler(feats, boxes)  # autograd on: torchvision pooling, unfused path
    assert reference.requires_grad
    with torch.no_grad():
        fast = pooler(feats, boxes)
    assert fast.shape == reference.shape
    assert torch.allclose(
        fast, reference.detach(), rtol=1e-5, atol=1e-5 * float(reference.abs().max())
    )


@pytest.mark.parametrize("norm", ["roi", "location", "none"])
def test_inference_path_without_boxes(norm):
    pooler = _skip_pooler(
        norm=norm,
        scale_init=5.0,
        out_channels=4,
    ).eval()
    with torch.no_grad():
        out = pooler(_features(), [Boxes(torch.zeros(0, 4)), Boxes(torch.zeros(0, 4))])
    assert out.shape == (0, 4, 7, 7)


def test_a_pending_scale_refuses_to_run_in_training_too():
    # Section 5.2's scale is measured before the first step (SkipPoolScaleHook), never by a
    # training batch: until then the pooler stops, naming the line that adds the measurement.
    pooler = _skip_pooler(
        scale_init=-1.0,
        feature_names=["a", "b", "c"],
        scale_reference="c",
    )
    assert pooler.scale_pending and pooler.scale_reference == "c"
    for training in (True, False):
        pooler.train(training)
        with pytest.raises(RuntimeError, match=re.escape(PENDING_SCALE_FIX)):
            pooler(_features(), _boxes())
    pooler.set_scale(7.0)
    assert pooler(_features(), _boxes()).shape == (3, 512, 7, 7)


@pytest.mark.parametrize(
    "norm,scale,bias,dropout",
    [
        ("roi", "learned", True, 0.0),
        ("roi", "fixed", False, 0.0),
        ("location", "learned", True, 0.0),
        ("none", "", True, 0.0),
        ("roi", "learned", True, 0.25),
        ("location", "fixed", True, 0.5),
    ],
)
def test_per_feature_reduction_equals_the_concatenation_values_and_gradients(
    norm, scale, bias, dropout
):
    """Training reduces each feature on its own (``b + sum_i (W_i * s_i) (m_i p_i) / n_i``):
    in float64 its output and the gradients of the features, the scale, the conv's weight and
    bias equal the concatenation's (normalise, concatenate, scale, dropout, 1x1 conv), computed
    here by hand, the dropout mask of the concatenation being the features' masks (the rule
    written out, model_utils.ref_dropout_mask) drawn one after the other."""
    pooler = _spread_scale_pooler(norm, scale, 6, dropout=dropout).double()
    if not bias:
        pooler.reduce.bias = None
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, s.channels, 16, 16, generator=g).double() for s in SHAPES]
    boxes = _mixed_boxes()
    grad_out = torch.randn(5, 6, 7, 7, generator=g).double()
    params = [p for p in (pooler.scale, pooler.reduce.weight, pooler.reduce.bias) if p is not None]
    params = [p for p in params if p.requires_grad]

    def run(forward):
        leaves = [f.clone().requires_grad_(True) for f in feats]
        for p in params:
            p.grad = None
        torch.manual_seed(11)
        out = forward(leaves)
        out.backward(grad_out)
        return out.detach(), [f.grad for f in leaves], [p.grad.clone() for p in params]

    def by_hand(leaves):
        rois = _rois(boxes).double()
        pooled = [roi_pool(f, rois, 7, 1.0 / s.stride) for f, s in zip(leaves, SHAPES)]
        masks = [ref_dropout_mask(p.shape, dropout, torch.float64) for p in pooled if dropout]
        concat = torch.cat([l2_normalize_rois(p, norm) for p in pooled], dim=1)
        if pooler.scale is not None:
            concat = concat * pooler.scale[None, :, None, None]
        if dropout:
            concat = concat * torch.cat(masks, dim=1)
        return F.conv2d(concat, pooler.reduce.weight, pooler.reduce.bias)

    pooler.train()
    got = run(lambda leaves: pooler(leaves, boxes))
    want = run(by_hand)
    assert len(got[2]) == len(params) >= 1 + bias
    for a, b in zip([got[0]] + got[1] + got[2], [want[0]] + want[1] + want[2]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10 * float(b.abs().max()))
    assert float(got[0].abs().max()) > 0
    if dropout:
        pooler.eval()
        with torch.enable_grad():
            assert not torch.allclose(pooler(feats, boxes), got[0], atol=1e-3)


def test_dropout_on_frozen_features_needs_no_input_gradient():
    """With dropout, a feature that needs no gradient (a frozen trunk's) gets none, and the
    others' gradients and the output are those of all features requiring one."""
    pooler = _spread_scale_pooler("roi", "learned", 6, dropout=0.25).double().train()
    g = torch.Generator().manual_seed(4)
    feats = [torch.randn(2, s.channels, 16, 16, generator=g).double() for s in SHAPES]
    boxes = _mixed_boxes()

    def run(trainable):
        leaves = [f.clone().requires_grad_(i in trainable) for i, f in enumerate(feats)]
        pooler.zero_grad()
        torch.manual_seed(3)
        out = pooler(leaves, boxes)
        out.square().sum().backward()
        return out.detach(), [f.grad for f in leaves], pooler.scale.grad.clone()

    frozen, everything = run({2}), run({0, 1, 2})
    assert frozen[1][0] is None and frozen[1][1] is None
    assert torch.allclose(frozen[0], everything[0], rtol=1e-12)
    assert torch.allclose(frozen[1][2], everything[1][2], rtol=1e-10)
    assert torch.allclose(frozen[2], everything[2], rtol=1e-10)
