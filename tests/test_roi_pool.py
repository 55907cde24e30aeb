"""
ion_d2.modeling.roi_pool: the sparse-table ROI max pooling equals torchvision's roi_pool
exactly.
"""

import pytest
import torch
from detectron2.modeling.poolers import ROIPooler
from detectron2.structures import Boxes
from torchvision.ops import roi_pool

import ion_d2.modeling.roi_pool as roi_pool_module
from ion_d2.modeling.roi_pool import (
    IONROIPool,
    release_scratch,
    roi_pool_bins,
    sparse_table_roi_pool,
)


def _random_rois(generator, num, height, width, num_images=1, lo=2.0, hi=None):
    """(num, 5) ROIs (image index, x1, y1, x2, y2) of log-uniform sizes, some off the image."""
    hi = hi or 1.2 * max(height, width)
    size = torch.exp(
        torch.empty(num, 2).uniform_(
            torch.log(torch.tensor(lo)).item(),
            torch.log(torch.tensor(hi)).item(),
            generator=generator,
        )
    )
    center = torch.rand(num, 2, generator=generator) * torch.tensor([width, height]) * 1.1 - 5
    boxes = torch.cat([center - size / 2, center + size / 2], dim=1)
    index = torch.randint(0, num_images, (num, 1), generator=generator).float()
    return torch.cat([index, boxes], dim=1)


@pytest.mark.parametrize("stride", [1, 4, 8, 16])
@pytest.mark.parametrize("output_size", [(7, 7), (3, 5), (1, 1)])
def test_equals_torchvision_on_random_rois(stride, output_size):
    g = torch.Generator().manual_seed(stride * 31 + output_size[1])
    image_h, image_w = 123, 207
    feature = torch.randn(2, 5, -(-image_h // stride), -(-image_w // stride), generator=g)
    rois = _random_rois(g, 300, image_h, image_w, num_images=2)
    ref = roi_pool(feature, rois, output_size, 1.0 / stride)
    out = sparse_table_roi_pool(feature, rois, 1.0 / stride, output_size)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


def test_equals_torchvision_with_ties_and_degenerate_rois():
    g = torch.Generator().manual_seed(0)
    # Few distinct values (ties everywhere), many zeros as after a ReLU.
    feature = torch.randint(-2, 3, (1, 3, 20, 30), generator=g).float().clamp(min=0)
    rois = torch.tensor(
        [
            [0, 0.0, 0.0, 0.0, 0.0],  # a point
            [0, 10.0, 10.0, 5.0, 4.0],  # x2 < x1: torchvision makes it 1x1
            [0, -50.0, -50.0, -10.0, -10.0],  # entirely off the map: empty bins -> 0
            [0, 100.0, 5.0, 140.0, 9.0],  # right of the map
            [0, 0.0, 0.0, 119.0, 79.0],  # the whole map
            [0, 1.5, 2.5, 3.5, 4.5],  # halves: C's round goes away from 0
            [0, -1.5, -0.5, 2.5, 0.5],
        ]
    )
    for scale in (0.25, 1.0, 0.5):
        ref = roi_pool(feature, rois, (7, 7), scale)
        assert torch.equal(sparse_table_roi_pool(feature, rois, scale, (7, 7)), ref)


def test_bins_reproduce_float32_rounding():
    # roi_w = 57 cells: 57 / 7 in float32 times 7 is above 57, whose ceil (58) reaches one cell
    # past the ROI; torchvision's kernel pools that cell, and so must the bins (integer
    # arithmetic, as adaptive pooling's, would stop at 57).
    rois = torch.tensor([[0.0, 0.0, 56.0, 0.0]])
    float_bin = torch.tensor(57.0) / torch.tensor(7.0)
    assert int(torch.ceil(torch.tensor(7.0) * float_bin)) == 58
    _, _, _, wend = roi_pool_bins(rois, 1.0, (7, 7), 5, 70)
    assert int(wend[0, -1]) == 58
    feature = torch.zeros(1, 1, 5, 70)
    feature[0, 0, 0, 57] = 5.0  # only that extra cell holds a positive value
    rois = torch.cat([torch.zeros(1, 1), rois], 1)
    ref = roi_pool(feature, rois, (7, 7), 1.0)
    assert ref[0, 0, 0, -1] == 5.0
    assert torch.equal(sparse_table_roi_pool(feature, rois, 1.0, (7, 7)), ref)


def test_empty_rois_and_images_without_rois():
    feature = torch.randn(3, 4, 10, 10)
    empty = torch.zeros(0, 5)
    assert sparse_table_roi_pool(feature, empty, 0.5, (7, 7)).shape == (0, 4, 7, 7)
    rois = torch.tensor([[2, 1.0, 1.0, 15.0, 12.0], [2, 0.0, 0.0, 5.0, 5.0]])
    ref = roi_pool(feature, rois, (7, 7), 0.5)
    assert torch.equal(sparse_table_roi_pool(feature, rois, 0.5, (7, 7)), ref)


def test_large_map_many_levels():
    """A conv3-like map (stride 4) with ROIs up to the whole image: every sparse-table level."""
    g = torch.Generator().manual_seed(3)
    feature = torch.relu(torch.randn(1, 8, 150, 250, generator=g))
    rois = _random_rois(g, 200, 600, 1000, lo=16.0, hi=1000.0)
    ref = roi_pool(feature, rois, (7, 7), 0.25)
    assert torch.equal(sparse_table_roi_pool(feature, rois, 0.25, (7, 7)), ref)


def test_module_matches_detectron2_roipooler_and_keeps_gradients():
    g = torch.Generator().manual_seed(5)
    feature = torch.randn(2, 6, 16, 24, generator=g)
    boxes = [
        Boxes(_random_rois(g, 40, 64, 96)[:, 1:]),
        Boxes(_random_rois(g, 25, 64, 96)[:, 1:]),
    ]
    pooler = IONROIPool(7, 0.25)
    reference = ROIPooler(output_size=7, scales=(0.25,), sampling_ratio=0, pooler_type="ROIPool")
    assert pooler.use_sparse_table(feature)
    assert torch.equal(pooler([feature], boxes), reference([feature], boxes))

    # With a gradient to compute, torchvision's op (and its argmax backward) is used.
    leaf = feature.clone().requires_grad_(True)
    assert not pooler.use_sparse_table(leaf)
    out = pooler([leaf], boxes)
    out.sum().backward()
    ref_leaf = feature.clone().requires_grad_(True)
    reference([ref_leaf], boxes).sum().backward()
    assert torch.equal(out.detach(), reference([feature], boxes))
    assert torch.equal(leaf.grad, ref_leaf.grad)
    with torch.no_grad():
        assert pooler.use_sparse_table(leaf)
        assert torch.equal(pooler([leaf], boxes), out.detach())


def test_module_rejects_bad_input():
    pooler = IONROIPool(7, 0.25)
    feature = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="one feature map; got 2"):
        pooler([feature, feature], [Boxes(torch.zeros(0, 4))] * 2)
    with pytest.raises(ValueError, match="1 box lists for a batch of 2"):
        pooler([feature], [Boxes(torch.zeros(0, 4))])


@pytest.mark.parametrize("num_images", [1, 2])
def test_writes_into_a_channel_slice_of_a_channels_last_buffer(num_images):
    g = torch.Generator().manual_seed(7)
    feature = torch.randn(num_images, 4, 12, 18, generator=g)
    rois = _random_rois(g, 30, 48, 72, num_images=num_images)
    ref = roi_pool(feature, rois, (7, 7), 0.25)
    buffer = torch.full((30, 7, 7, 10), 123.0)
    out = sparse_table_roi_pool(feature, rois, 0.25, (7, 7), out=buffer[..., 3:7])
    assert torch.equal(out, ref)
    assert torch.equal(buffer[..., 3:7].permute(0, 3, 1, 2), ref)
    # Only the slice is written.
    assert bool((buffer[..., :3] == 123.0).all()) and bool((buffer[..., 7:] == 123.0).all())
    with pytest.raises(ValueError, match=r"expected \(30, 7, 7, 4\)"):
        sparse_table_roi_pool(feature, rois, 0.25, (7, 7), out=buffer)


def test_release_scratch_frees_and_pooling_rebuilds_it():
    g = torch.Generator().manual_seed(9)
    feature = torch.randn(1, 3, 10, 14, generator=g)
    rois = _random_rois(g, 20, 40, 56)
    first = sparse_table_roi_pool(feature, rois, 0.25, (7, 7))
    assert roi_pool_module._SCRATCH.buffer is not None
    release_scratch()
    assert roi_pool_module._SCRATCH.buffer is None
    assert torch.equal(sparse_table_roi_pool(feature, rois, 0.25, (7, 7)), first)
    assert torch.equal(first, roi_pool(feature, rois, (7, 7), 0.25))


@pytest.mark.parametrize("grad", [False, True])
def test_image_sizes_limit_each_box_to_its_images_valid_cells(grad):
    """With ``image_sizes``, a box pools what torchvision pools on its image's map cut to the
    image's valid cells (``ceil(size / stride)``): the batch's padding, here large values that
    would win every max reaching it, is never read. Both paths (the sparse table without
    gradient, torchvision's kernel with it) and the gradient."""
    g = torch.Generator().manual_seed(5)
    stride = 16
    sizes = [(72, 100), (120, 128)]  # valid cells (5, 7) and (8, 8) of an 8 x 8 map
    feature = torch.randn(2, 6, 8, 8, generator=g) - 1.0  # mostly negative, as a linear output
    feature[0, :, 5:, :] = 100.0
    feature[0, :, :, 7:] = 100.0
    boxes = [
        Boxes(
            torch.tensor(
                [[0.0, 0.0, 100.0, 72.0], [40.0, 30.0, 100.0, 72.0], [4.0, 6.0, 40.0, 50.0]]
            )
        ),
        Boxes(torch.tensor([[10.0, 10.0, 128.0, 120.0]])),
    ]
    pool = IONROIPool(7, 1.0 / stride)
    x = feature.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = pool([x], boxes, image_sizes=sizes)
    assert pool.use_sparse_table(x) == (not grad)
    refs = []
    for i, (h, w) in enumerate(sizes):
        cut = feature[i : i + 1, :, : -(-h // stride), : -(-w // stride)]
        rois = torch.cat([torch.zeros(len(boxes[i]), 1), boxes[i].tensor], dim=1)
        refs.append(roi_pool(cut, rois, (7, 7), 1.0 / stride))
    ref = torch.cat(refs)
    assert torch.equal(out.detach(), ref)
    assert float(out.detach().max()) < 100.0
    # Without the sizes, the box reaching the bottom border rounds its last bin into row 5.
    assert float(pool([feature], boxes).max()) == 100.0
    if grad:
        out.sum().backward()
        cut = feature[:1, :, :5, :7].clone().requires_grad_(True)
        rois = torch.cat([torch.zeros(3, 1), boxes[0].tensor], dim=1)
        roi_pool(cut, rois, (7, 7), 1.0 / stride).sum().backward()
        assert torch.equal(x.grad[0, :, :5, :7], cut.grad[0])
        assert float(x.grad[0, :, 5:, :].abs().sum()) == 0.0
        assert float(x.grad[0, :, :, 7:].abs().sum()) == 0.0


def test_bins_in_the_padding_are_zero_with_no_gradient_in_training():
    """With a gradient (torchvision's op) and ``image_sizes``, a bin that covers only the
    batch's padding is 0, as the sparse table gives it, and gets no gradient: output and
    gradient equal, bit for bit, the plain computation (padding at -inf, then every bin at
    -FLT_MAX set to 0 out of place)."""
    g = torch.Generator().manual_seed(9)
    stride = 8
    sizes = [(40, 48), (64, 64)]  # valid cells (5, 6) and (8, 8) of an 8 x 8 map
    feature = torch.randn(2, 4, 8, 8, generator=g)
    boxes = [
        # Reaching into the padding (its lower and right bins are empty), inside, and wholly in
        # the padding (every bin empty).
        Boxes(torch.tensor([[8.0, 8.0, 63.0, 63.0], [0.0, 0.0, 30.0, 20.0], [50.0, 44, 63, 63]])),
        Boxes(torch.tensor([[4.0, 4.0, 60.0, 60.0]])),
    ]
    pool = IONROIPool(7, 1.0 / stride)
    leaf = feature.clone().requires_grad_(True)
    out = pool([leaf], boxes, image_sizes=sizes)
    grad_out = torch.randn(out.shape, generator=g)
    out.backward(grad_out)

    ref_leaf = feature.clone().requires_grad_(True)
    valid = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    valid[0, :, :5, :6] = True
    valid[1] = True
    rois = torch.cat([torch.tensor([[0.0], [0.0], [0.0], [1.0]]), Boxes.cat(boxes).tensor], dim=1)
    ref = roi_pool(ref_leaf.masked_fill(~valid, float("-inf")), rois, (7, 7), 1.0 / stride)
    ref = ref.masked_fill(ref <= torch.finfo(ref.dtype).min, 0.0)
    ref.backward(grad_out)
    assert torch.equal(out.detach(), ref.detach())
    assert torch.equal(leaf.grad, ref_leaf.grad)
    assert torch.equal(out[2].detach(), torch.zeros(4, 7, 7))
    assert bool((out[0].detach()[:, -1] == 0).all())
    assert float(leaf.grad[0, :, 5:].abs().sum() + leaf.grad[0, :, :, 6:].abs().sum()) == 0.0
    with torch.no_grad():
        assert torch.equal(pool([feature], boxes, image_sizes=sizes), out.detach())


@pytest.mark.parametrize("gather_cost", [0.0, 4.0, 1e12])
def test_any_window_levels_give_torchvisions_output(monkeypatch, gather_cost):
    """The levels are capped by a cost model (_level_caps): a gather of no cost caps both axes
    at level 0 (every cell of every bin a window of its own), one of huge cost never caps (the
    largest 2^k per bin side, one or two windows). Each plan, and the default's, gives
    torchvision's output exactly, with several images and each one's valid cells."""
    monkeypatch.setattr(roi_pool_module, "_GATHER_COST", gather_cost)
    g = torch.Generator().manual_seed(11)
    feature = torch.randn(2, 5, 40, 56, generator=g)
    rois = _random_rois(g, 90, 160, 224, num_images=2, lo=4.0)
    ref = roi_pool(feature, rois, (7, 7), 0.25)
    assert torch.equal(sparse_table_roi_pool(feature, rois, 0.25, (7, 7)), ref)
    limits = torch.tensor([[30, 56], [40, 41]])[rois[:, 0].long()]
    out = sparse_table_roi_pool(feature, rois, 0.25, (3, 5), limits=limits)
    for image, (rows, cols) in enumerate([(30, 56), (40, 41)]):
        mine = rois[:, 0] == image
        cut = feature[image : image + 1, :, :rows, :cols]
        picked = rois[mine].clone()
        picked[:, 0] = 0
        assert torch.equal(out[mine], roi_pool(cut, picked, (3, 5), 0.25))


def test_level_caps_trade_map_passes_for_gathers():
    """Few bins on a large map: windows of one cell, no map pass (level 0, 0). Many bins on a
    small map: the largest levels their sides allow (4 = floor(log2(16)), 3 = floor(log2(9))).
    A mix: each axis capped where its passes cost more than its bins' extra windows."""
    caps = roi_pool_module._level_caps

    def plan(size_h, size_w, num, map_cells):
        h = torch.full((num,), size_h, dtype=torch.long)
        w = torch.full((num,), size_w, dtype=torch.long)
        log2 = roi_pool_module._floor_log2
        return caps(h, w, log2(h), log2(w), map_cells)

    assert plan(16, 9, 10, 10**6) == (0, 0)
    assert plan(16, 9, 10**5, 100) == (4, 3)
    # 100 bins of 16 x 9 on 2000 cells: at caps (k, l) a bin reads ceil(16 / 2^k) *
    # ceil(9 / 2^l) windows and the maps take k + l passes (the column maps only on row map
    # k, where the bins are). 2000 * passes + 4 * 100 * windows is least at (4, 0): 8000 +
    # 400 * 9 = 11600 (uncapped (4, 3): 14000 + 800; (3, 1): 8000 + 4000).
    assert plan(16, 9, 100, 2000) == (4, 0)
