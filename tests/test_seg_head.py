import math

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_sem_seg_head
from detectron2.utils.events import EventStorage
from model_utils import ion_cfg
from torch.nn import functional as F

from ion_d2.modeling.seg_head import (
    IONSegRegularizerHead,
    bilinear_upsampling_kernel,
    pixel_cross_entropy,
    tent_matrix,
)

IGNORE = 255


def make_head(channels=6, num_classes=4, stride=16, **kwargs):
    input_shape = {
        "conv5": ShapeSpec(channels=3, stride=16),
        "context": ShapeSpec(channels=channels, stride=stride),
    }
    return IONSegRegularizerHead(
        input_shape, in_feature="context", num_classes=num_classes, **kwargs
    )


def randomize_scores(head):
    with torch.no_grad():
        head.score.weight.normal_(0, 0.5)
        head.score.bias.normal_(0, 0.5)


def interp_matrix(out_size, in_size, stride):
    """Linear interpolation between feature cell centres, from the geometry alone: image pixel
    i is centred at i, feature cell x at stride * x + (stride - 1) / 2, and the tent has
    half-width ``stride``."""
    i = torch.arange(out_size, dtype=torch.float64)[:, None]
    centres = stride * torch.arange(in_size, dtype=torch.float64)[None, :] + (stride - 1) / 2
    return (1 - (i - centres).abs() / stride).clamp(min=0)


def reference_logits(head, feature, height, width):
    weight = head.score.weight.detach().double()[:, :, 0, 0]
    scores = torch.einsum("kc,nchw->nkhw", weight, feature.double())
    scores = scores + head.score.bias.detach().double()[None, :, None, None]
    a_y = interp_matrix(height, feature.shape[-2], head.stride)
    a_x = interp_matrix(width, feature.shape[-1], head.stride)
    return torch.einsum("Yh,nkhw,Xw->nkYX", a_y, scores, a_x)


def test_bilinear_kernel_is_fcn_filler():
    # FCN's upsample_filt(4): factor 2, centre 1.5 -> 1 - |k - 1.5| / 2.
    tent4 = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.allclose(bilinear_upsampling_kernel(4), tent4[:, None] * tent4[None, :])
    # upsample_filt(3): factor 2, centre 1.
    tent3 = torch.tensor([0.5, 1.0, 0.5])
    assert torch.allclose(bilinear_upsampling_kernel(3), tent3[:, None] * tent3[None, :])


def test_deconv_init_matches_bilinear_interpolation_in_interior():
    torch.manual_seed(0)
    k, s, h, w = 3, 16, 4, 5
    head = make_head(channels=k, num_classes=k, stride=s).eval()
    with torch.no_grad():
        head.score.weight.copy_(torch.eye(k)[:, :, None, None])
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    smooth = torch.stack([torch.sin(0.7 * ys + 0.3 * xs), torch.cos(0.5 * xs), ys * xs / 10])
    feature = smooth[None]

    logits, extra = head({"context": feature})
    assert extra == {}
    assert logits.shape == (1, k, h * s, w * s)

    expected = F.interpolate(feature, scale_factor=s, mode="bilinear", align_corners=False)
    # Interior: pixels between the first and last feature cell centres (7.5 and 16 * h - 8.5).
    rows, cols = slice(s // 2, s * (h - 1) + s // 2), slice(s // 2, s * (w - 1) + s // 2)
    inner = (slice(None), slice(None), rows, cols)
    assert torch.allclose(logits[inner], expected[inner], atol=1e-5)

    # A constant map stays constant in the interior and fades outside it (FCN's border).
    const, _ = head({"context": torch.full((1, k, h, w), 2.0)})
    assert torch.allclose(const[inner], torch.full_like(const[inner], 2.0), atol=1e-5)
    assert (const[:, :, 0, :] < 2.0).all() and (const[:, :, :, -1] < 2.0).all()

    # A single active cell peaks symmetrically around its centre 16 * (1, 2) + 7.5.
    delta = torch.zeros(1, k, h, w)
    delta[0, 0, 1, 2] = 1.0
    out, _ = head({"context": delta})
    peak = out[0, 0]
    assert torch.isclose(peak[23, 39], peak.max()) and torch.isclose(peak[24, 40], peak.max())
    assert torch.allclose(peak[23 - 5, 39], peak[24 + 5, 39])
    assert torch.allclose(peak[23, 39 - 9], peak[23, 40 + 9])


@pytest.mark.parametrize(
    "feat_hw,img_hw",
    [
        ((4, 5), (64, 80)),  # multiples of the stride
        ((3, 4), (37, 50)),  # not multiples of 16
        ((3, 2), (33, 17)),
        ((2, 3), (45, 60)),  # larger than the deconvolution reaches (2 * 16 + 8 = 40 rows)
    ],
)
def test_output_size_and_alignment(feat_hw, img_hw):
    torch.manual_seed(1)
    head = make_head().eval()
    randomize_scores(head)
    feature = torch.randn(2, 6, *feat_hw)
    targets = torch.full((2, *img_hw), IGNORE, dtype=torch.long)

    logits, _ = head({"context": feature}, targets)
    assert logits.shape == (2, 4, *img_hw)
    expected = reference_logits(head, feature, *img_hw).float()
    assert torch.allclose(logits, expected, atol=1e-4)

    no_targets, _ = head({"context": feature})
    assert no_targets.shape == (2, 4, feat_hw[0] * 16, feat_hw[1] * 16)


@pytest.mark.parametrize("feat_hw,img_hw", [((3, 4), (37, 50)), ((2, 3), (45, 60))])
def test_loss_equals_cross_entropy(feat_hw, img_hw):
    torch.manual_seed(2)
    head = make_head().train()
    randomize_scores(head)
    feature = torch.randn(2, 6, *feat_hw)
    feature[1] *= 4  # more confident scores: the images' mean losses differ
    targets = torch.randint(0, 4, (2, *img_hw))
    targets[0, :, -25:] = IGNORE  # padding of a narrower image
    targets[1, 5:9, 3:20] = IGNORE  # a crowd region

    with EventStorage():
        result, losses = head({"context": feature}, targets)
    assert result is None
    assert set(losses) == {"loss_sem_seg"}

    ref_targets = targets.clone()
    # Pixels beyond the deconvolution's reach (rows/cols >= s * h + s / 2) are ignored.
    ref_targets[:, feat_hw[0] * 16 + 8 :, :] = IGNORE
    ref_targets[:, :, feat_hw[1] * 16 + 8 :] = IGNORE
    # Each image's mean over its own labelled pixels, then the mean over the images (the
    # paper's Caffe setup: one image per pass, iter_size averaging the passes).
    ref_logits = reference_logits(head, feature, *img_hw)
    per_image = [
        F.cross_entropy(ref_logits[i : i + 1], ref_targets[i : i + 1], ignore_index=IGNORE)
        for i in range(2)
    ]
    expected = torch.stack(per_image).mean()
    assert torch.isclose(losses["loss_sem_seg"].double(), expected, rtol=1e-5)
    # The images have different numbers of labelled pixels, so the batch-wide pixel mean (the
    # old normalisation) is another number.
    pixel_mean = F.cross_entropy(ref_logits, ref_targets, ignore_index=IGNORE)
    assert not torch.isclose(losses["loss_sem_seg"].double(), pixel_mean, rtol=1e-3)


def test_loss_weight_scales():
    torch.manual_seed(3)
    feature = torch.randn(1, 6, 3, 3)
    targets = torch.randint(0, 4, (1, 48, 48))
    values = []
    for weight in (1.0, 0.25):
        torch.manual_seed(4)
        head = make_head(loss_weight=weight).train()
        randomize_scores(head)
        values.append(head({"context": feature}, targets)[1]["loss_sem_seg"])
    assert torch.isclose(values[1], 0.25 * values[0])


def test_zero_init_gives_uniform_prediction():
    head = make_head(num_classes=5).train()
    targets = torch.randint(0, 5, (1, 32, 32))
    loss = head({"context": torch.randn(1, 6, 2, 2)}, targets)[1]["loss_sem_seg"]
    assert torch.isclose(loss, torch.tensor(math.log(5.0)))


def test_all_ignored_gives_zero_loss_with_finite_grads():
    torch.manual_seed(5)
    head = make_head().train()
    randomize_scores(head)
    feature = torch.randn(2, 6, 3, 3, requires_grad=True)
    targets = torch.full((2, 48, 48), IGNORE, dtype=torch.long)
    loss = head({"context": feature}, targets)[1]["loss_sem_seg"]
    assert loss.item() == 0.0
    loss.backward()
    for grad in (feature.grad, head.score.weight.grad, head.score.bias.grad):
        assert grad is not None and torch.isfinite(grad).all() and (grad == 0).all()


def test_gradients_flow():
    torch.manual_seed(6)
    targets = torch.randint(0, 4, (1, 40, 40))

    # Zero-initialised score conv (FCN): the score weights learn, the feature sees no gradient yet.
    head = make_head().train()
    feature = torch.randn(1, 6, 3, 3, requires_grad=True)
    head({"context": feature}, targets)[1]["loss_sem_seg"].backward()
    assert head.score.weight.grad.abs().sum() > 0
    assert (feature.grad == 0).all()
    assert not head.upsample.weight.requires_grad and head.upsample.weight.grad is None

    randomize_scores(head)
    feature = torch.randn(1, 6, 3, 3, requires_grad=True)
    head({"context": feature}, targets)[1]["loss_sem_seg"].backward()
    assert feature.grad.abs().sum() > 0

    learned = make_head(learn_upsampling=True).train()
    randomize_scores(learned)
    learned({"context": torch.randn(1, 6, 3, 3)}, targets)[1]["loss_sem_seg"].backward()
    assert learned.upsample.weight.grad.abs().sum() > 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="'res5'.*available"):
        IONSegRegularizerHead(
            {"context": ShapeSpec(channels=4, stride=16)}, in_feature="res5", num_classes=3
        )
    with pytest.raises(ValueError, match="stride 3"):
        make_head(stride=3)
    with pytest.raises(ValueError, match="ignore_value 2"):
        make_head(num_classes=4, ignore_value=2)
    with pytest.raises(ValueError, match="needs targets"):
        make_head().train()({"context": torch.randn(1, 6, 2, 2)})


def seg_cfg():
    return ion_cfg(
        {
            "MODEL.SEM_SEG_HEAD.NAME": "IONSegRegularizerHead",
            "MODEL.SEM_SEG_HEAD.IN_FEATURES": ["context"],
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 5,
            "MODEL.SEM_SEG_HEAD.LOSS_WEIGHT": 0.5,
        }
    )


def test_build_from_config():
    input_shape = {
        "conv5": ShapeSpec(channels=8, stride=16),
        "context": ShapeSpec(channels=6, stride=16),
    }
    head = build_sem_seg_head(seg_cfg(), input_shape)
    assert isinstance(head, IONSegRegularizerHead)
    assert (head.in_feature, head.num_classes, head.ignore_value) == ("context", 5, 255)
    assert head.loss_weight == 0.5 and head.stride == 16
    assert head.score.weight.shape == (5, 6, 1, 1)
    assert head.upsample.weight.shape == (5, 1, 32, 32)

    cfg = seg_cfg()
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["conv5", "context"]
    with pytest.raises(ValueError, match="exactly one feature"):
        build_sem_seg_head(cfg, input_shape)
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p5"]
    with pytest.raises(ValueError, match="'p5'.*\\['context', 'conv5'\\]"):
        build_sem_seg_head(cfg, input_shape)


# ----------------------------------------------------------------------------------------------
# Batch independence: the padding's scores must not bleed into an image's border pixels
# ----------------------------------------------------------------------------------------------
# A is 44 x 60 px: 3 x 4 cells at stride 16, and the next cell's centre (55.5 / 71.5) lies
# within 16 px of A's last pixels, so the deconvolution would carry it into A.
SIZE_A, SIZE_B = (44, 60), (80, 96)


def _a_beside_b(a_first):
    feature_a = torch.randn(1, 6, 3, 4)
    feature_b = torch.randn(1, 6, 5, 6)
    padded = 3 * torch.randn(1, 6, 5, 6)  # A's padding: nonzero, as a batch's would be
    padded[..., :3, :4] = feature_a
    batch = torch.cat([padded, feature_b] if a_first else [feature_b, padded])
    sizes = [SIZE_A, SIZE_B] if a_first else [SIZE_B, SIZE_A]
    return feature_a, feature_b, batch, sizes


def _targets(sizes, labelled, seed=0):
    g = torch.Generator().manual_seed(seed)
    targets = torch.full((len(sizes), 80, 96), IGNORE, dtype=torch.long)
    for i, ((h, w), lab) in enumerate(zip(sizes, labelled)):
        if lab:
            targets[i, :h, :w] = torch.randint(0, 4, (h, w), generator=g)
    return targets


@pytest.mark.parametrize("a_first", [True, False])
def test_loss_of_an_image_does_not_depend_on_the_batch(a_first):
    torch.manual_seed(7)
    head = make_head().train()
    randomize_scores(head)
    feature_a, feature_b, batch, sizes = _a_beside_b(a_first)
    ia = 0 if a_first else 1
    labels_a = _targets([SIZE_A], [True])[0, :44, :60]
    labels_b = _targets([SIZE_B], [True], seed=1)[0]

    def loss(features, targets, image_sizes):
        return head({"context": features}, targets, image_sizes)[1]["loss_sem_seg"]

    alone_a = loss(feature_a, labels_a[None], [SIZE_A])
    alone_b = loss(feature_b, labels_b[None], [SIZE_B])

    # B unlabelled: B adds 0 to the mean over the two images (Caffe's max(count, 1)).
    targets = torch.full((2, 80, 96), IGNORE, dtype=torch.long)
    targets[ia, :44, :60] = labels_a
    torch.testing.assert_close(loss(batch, targets, sizes), alone_a / 2, rtol=1e-6, atol=0)
    # Without the sizes the padding's scores reach A's border pixels (the old behaviour).
    assert not torch.allclose(loss(batch, targets, None), alone_a / 2, rtol=1e-4, atol=0)

    # Both labelled, of two sizes (44 x 60 and 80 x 96 pixels): each image weighs the same, so
    # the batch's loss is the mean of the images' losses alone, not weighted by pixel counts.
    targets[1 - ia] = labels_b
    batch_loss = loss(batch, targets, sizes)
    torch.testing.assert_close(batch_loss, (alone_a + alone_b) / 2, rtol=1e-6, atol=0)
    n_a, n_b = labels_a.numel(), labels_b.numel()
    pixel_weighted = (alone_a * n_a + alone_b * n_b) / (n_a + n_b)
    assert not torch.allclose(batch_loss, pixel_weighted, rtol=1e-3, atol=0)


def test_logits_of_an_image_do_not_depend_on_the_batch():
    torch.manual_seed(8)
    head = make_head().eval()
    randomize_scores(head)
    feature_a, _, batch, sizes = _a_beside_b(a_first=True)
    alone, _ = head({"context": feature_a}, torch.zeros(1, 44, 60, dtype=torch.long), [SIZE_A])
    together, _ = head({"context": batch}, torch.zeros(2, 80, 96, dtype=torch.long), sizes)
    torch.testing.assert_close(together[:1, :, :44, :60], alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("feat_hw,img_hw", [((4, 5), (64, 80)), ((3, 4), (37, 50))])
def test_crop_within_the_deconvolution_equals_the_crop_of_its_output(feat_hw, img_hw):
    """Where the image fits within h * s by w * s, the deconvolution's padding crops: its
    values and the scores' gradients are those of cropping the whole deconvolution's output
    (FCN's crop layer), bit for bit; the learned kernel's gradient agrees up to rounding."""
    torch.manual_seed(3)
    head = make_head(learn_upsampling=True)
    scores = torch.randn(2, 4, *feat_hw, requires_grad=True)
    grad = torch.randn(2, 4, *img_hw)

    def crop_of_output():
        full = head.upsample(scores)
        return full[:, :, 8 : 8 + img_hw[0], 8 : 8 + img_hw[1]]

    results = []
    for upsample in (lambda: head.upsample_and_crop(scores, *img_hw), crop_of_output):
        out = upsample()
        results.append((out, *torch.autograd.grad(out, (scores, head.upsample.weight), grad)))
    (got, got_scores, got_kernel), (want, want_scores, want_kernel) = results
    assert got.shape == (2, 4, *img_hw)
    assert torch.equal(got, want) and torch.equal(got_scores, want_scores)
    torch.testing.assert_close(got_kernel, want_kernel, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "feat_hw,img_hw", [((4, 5), (64, 80)), ((3, 4), (37, 50)), ((3, 2), (33, 17))]
)
def test_fixed_kernel_as_axis_matrices_equals_the_deconvolution(feat_hw, img_hw):
    """With the fixed bilinear kernel the deconvolution and its crop run as one matrix product
    per axis (tent_matrix): the deconvolution's values and the scores' gradients up to float
    rounding."""
    torch.manual_seed(4)
    head = make_head()
    scores = torch.randn(2, 4, *feat_hw, requires_grad=True)
    grad = torch.randn(2, 4, *img_hw)
    assert head._fixed_bilinear_tent(scores) is not None

    def deconvolution():
        out = F.conv_transpose2d(scores, head.upsample.weight, stride=16, padding=8, groups=4)
        return out[:, :, : img_hw[0], : img_hw[1]]

    results = []
    for upsample in (lambda: head.upsample_and_crop(scores, *img_hw), deconvolution):
        out = upsample()
        results.append((out, *torch.autograd.grad(out, scores, grad)))
    (got, got_grad), (want, want_grad) = results
    assert got.shape == (2, 4, *img_hw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-5)


def test_tent_matrix_is_the_one_dimensional_deconvolution():
    tent = torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64)
    full = F.conv_transpose1d(x[None, None], tent[None, None], stride=2)[0, 0]
    for offset, length in ((1, 9), (1, 10), (0, 12)):
        got = tent_matrix(length, 5, 2, offset, tent) @ x
        torch.testing.assert_close(got, full[offset : offset + length], rtol=0, atol=1e-15)


def test_other_kernels_use_the_deconvolution():
    """A learned kernel, or another kernel loaded into a fixed one, is not the tent's outer
    product: the head then runs the deconvolution with it."""
    torch.manual_seed(5)
    scores = torch.randn(1, 4, 3, 4)
    assert make_head(learn_upsampling=True)._fixed_bilinear_tent(scores) is None
    head = make_head()
    state = head.state_dict()
    state["upsample.weight"] = torch.rand_like(state["upsample.weight"])
    head.load_state_dict(state)
    assert head._fixed_bilinear_tent(scores) is None
    want = F.conv_transpose2d(scores, state["upsample.weight"], stride=16, padding=8, groups=4)
    assert torch.equal(head.upsample_and_crop(scores, 40, 50), want[:, :, :40, :50])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strided", [False, True])
def test_pixel_cross_entropy_equals_cross_entropy(dtype, strided):
    """Each pixel's loss and the logits' gradient, against F.cross_entropy; ignored pixels (a
    padding band, scattered crowds) give 0 and no gradient."""
    torch.manual_seed(6)
    logits = (3 * torch.randn(2, 5, 9, 14 if strided else 7, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, 5, (2, 9, 7))
    targets[0, :, -2:] = IGNORE
    targets[1][torch.rand(9, 7) < 0.2] = IGNORE
    grad = torch.rand(2, 9, 7, dtype=dtype)
    view = logits[..., ::2] if strided else logits
    results = []
    for loss in (
        pixel_cross_entropy,
        lambda x, t, i: F.cross_entropy(x, t, reduction="none", ignore_index=i),
    ):
        out = loss(view, targets, IGNORE)
        results.append((out, *torch.autograd.grad(out, logits, grad)))
    (got, got_grad), (want, want_grad) = results
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(got_grad, want_grad, rtol=tol, atol=tol)
    assert (got[targets == IGNORE] == 0).all()
    step = 2 if strided else 1
    assert (got_grad[..., ::step].permute(0, 2, 3, 1)[targets == IGNORE] == 0).all()


@pytest.mark.parametrize("bad", [7, -1])
def test_pixel_cross_entropy_bad_target_raises(bad):
    targets = torch.zeros(1, 3, 3, dtype=torch.long)
    targets[0, 1, 1] = bad
    with pytest.raises(ValueError, match=rf"target {bad} is not a class index in \[0, 4\]"):
        pixel_cross_entropy(torch.zeros(1, 5, 3, 3), targets, IGNORE)
