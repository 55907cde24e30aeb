"""
Fast R-CNN's ROI max pooling (``ROIPool``, section 3.1 of ION) computed with a sparse table.

torchvision's CPU ``roi_pool`` visits every cell of every bin, one channel at a time, on one
thread: with 1000 ROIs on conv3 (stride 4) of a 600x1000 image that is seconds per image. The
maximum over a rectangle of cells is also the maximum of four (overlapping) power-of-two
rectangles that cover it, so after building, once per image, the maxima of every
``2^k x 2^l`` window (a 2-D sparse table, ``K * L`` maps), each bin costs four lookups of a
channel vector, whatever its size. Each level is a pass over the whole map, though, and with
few ROIs on a large map (training's 128 on conv3) the passes cost more than the lookups: the
levels are then capped, and a bin is covered by more windows of the largest level built
(:func:`_level_caps` weighs the two).

The bins are computed exactly as torchvision's kernel computes them (float32 arithmetic, C's
``round``), so the output equals ``torchvision.ops.roi_pool``'s bit for bit (a max is exact).
"""

import threading
from typing import List, Optional, Sequence, Tuple, Union

import torch
from detectron2.modeling.poolers import convert_boxes_to_pooler_format
from detectron2.structures import Boxes
from torch import Tensor, nn
from torchvision.ops import roi_pool as tv_roi_pool

from .padding import valid_cell_counts, valid_cell_mask

__all__ = ["IONROIPool", "release_scratch", "roi_pool_bins", "sparse_table_roi_pool"]


def _round_half_away(x: Tensor) -> Tensor:
    """C's ``round`` (halves away from 0) of float32 values, exactly (in float64)."""
    x = x.double()
    return (x.abs() + 0.5).floor().copysign(x).long()


def roi_pool_bins(
    rois: Tensor,
    spatial_scale: float,
    output_size: Tuple[int, int],
    height: Union[int, Tensor],
    width: Union[int, Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """
    The cells each bin of each ROI max-pools, as torchvision's ``roi_pool`` kernel computes
    them (``round`` of the scaled corners, ``max(end - start + 1, 1)`` cells, bins of
    ``size / output_size`` cells in float32 arithmetic, ``floor`` / ``ceil``, clipped to the map).

    Args:
        rois (Tensor): (R, 4) float32 boxes (x1, y1, x2, y2) in input-image coordinates.
        spatial_scale (float): the feature's scale (1 / stride).
        output_size (tuple[int, int]): bins per ROI (height, width).
        height, width (int or Tensor): the feature map's size, or (R,) long per ROI: the
            rows and columns it may read (its image's valid cells, see :class:`IONROIPool`).

    Returns:
        tuple[Tensor]: ``hstart, hend`` (R, PH) and ``wstart, wend`` (R, PW) long; a bin
        covers rows ``[hstart, hend)`` and columns ``[wstart, wend)`` and is empty when either
        range is.
    """
    scale = torch.tensor(spatial_scale, dtype=torch.float32)
    corners = _round_half_away(rois.float() * scale)  # (R, 4): x1, y1, x2, y2 in cells
    pooled_h, pooled_w = output_size

    def axis(start: Tensor, end: Tensor, pooled: int, limit) -> Tuple[Tensor, Tensor]:
        size = (end - start + 1).clamp(min=1).float()
        bin_size = size / torch.tensor(float(pooled), dtype=torch.float32)
        steps = torch.arange(pooled + 1, dtype=torch.float32)
        lo = (steps[None, :-1] * bin_size[:, None]).floor().long() + start[:, None]
        hi = (steps[None, 1:] * bin_size[:, None]).ceil().long() + start[:, None]
        limit = torch.as_tensor(limit, dtype=torch.long).reshape(-1, 1)
        return torch.minimum(lo.clamp(min=0), limit), torch.minimum(hi.clamp(min=0), limit)

    hstart, hend = axis(corners[:, 1], corners[:, 3], pooled_h, height)
    wstart, wend = axis(corners[:, 0], corners[:, 2], pooled_w, width)
    return hstart, hend, wstart, wend


def _empty_bins(hstart: Tensor, hend: Tensor, wstart: Tensor, wend: Tensor) -> Tensor:
    """(R, PH, PW) bool: the bins of :func:`roi_pool_bins` that cover no cell."""
    return (hend <= hstart)[:, :, None] | (wend <= wstart)[:, None, :]


def _floor_log2(n: Tensor) -> Tensor:
    """floor(log2(n)) of positive long values."""
    out = torch.zeros_like(n)
    n = n.clone()
    while bool((n > 1).any()):
        more = n > 1
        out += more.long()
        n = torch.where(more, n // 2, n)
    return out


def sparse_table_roi_pool(
    feature: Tensor,
    rois: Tensor,
    spatial_scale: float,
    output_size: Tuple[int, int],
    *,
    out: Optional[Tensor] = None,
    limits: Optional[Tensor] = None,
) -> Tensor:
    """
    ``torchvision.ops.roi_pool(feature, rois, output_size, spatial_scale)`` without autograd,
    computed with a sparse table per image (see the module's docstring).

    Args:
        feature (Tensor): (N, C, H, W) float32 feature map.
        rois (Tensor): (R, 5) float32 ROIs (batch index, x1, y1, x2, y2).
        spatial_scale (float): the feature's scale (1 / stride).
        output_size (tuple[int, int]): bins per ROI (height, width).
        out (Tensor or None): an (R, PH, PW, C) tensor (e.g. a channel slice of a larger
            channels-last one) to write the result into; None: a new one.
        limits (Tensor or None): (R, 2) long, the rows and columns each ROI may read (bins
            clipped to them instead of the map's size); None: the whole map.

    Returns:
        Tensor: (R, C, PH, PW), equal to torchvision's output (on the map cut to each ROI's
        limits); a view of ``out`` when given.
    """
    n, channels, height, width = feature.shape
    pooled_h, pooled_w = output_size
    if out is None:
        out = feature.new_empty(len(rois), pooled_h, pooled_w, channels)
    elif out.shape != (len(rois), pooled_h, pooled_w, channels):
        raise ValueError(
            f"sparse_table_roi_pool's out has shape {tuple(out.shape)}; expected "
            f"{(len(rois), pooled_h, pooled_w, channels)} (R, PH, PW, C)."
        )
    result = out.permute(0, 3, 1, 2)
    if len(rois) == 0 or channels == 0:
        return result
    if limits is not None:
        limits = limits.cpu()
        height, width = limits[:, 0], limits[:, 1]
    hstart, hend, wstart, wend = roi_pool_bins(
        rois[:, 1:].cpu(), spatial_scale, output_size, height, width
    )
    height, width = feature.shape[2], feature.shape[3]
    rows = out.view(len(rois), pooled_h * pooled_w, channels)
    batch_index = rois[:, 0].long().cpu()
    if n == 1 or bool((batch_index == batch_index[0]).all()):
        windows = _bin_windows(hstart, hend, wstart, wend, height, width)
        _pool_image(feature[int(batch_index[0])], windows, rows)
        return result
    for image in range(n):
        select = (batch_index == image).nonzero().flatten()
        if len(select) == 0:
            continue
        windows = _bin_windows(
            hstart[select], hend[select], wstart[select], wend[select], height, width
        )
        pooled = feature.new_empty(len(select), pooled_h * pooled_w, channels)
        _pool_image(feature[image], windows, pooled)
        rows.index_copy_(0, select.to(feature.device), pooled)
    return result


def _bin_windows(
    hstart: Tensor, hend: Tensor, wstart: Tensor, wend: Tensor, height: int, width: int
) -> Tuple[Tensor, ...]:
    """
    Each bin as the union of ``n_h x n_w`` windows of ``2^k x 2^l`` cells.

    A bin ``s`` cells high is covered by ``ceil(s / 2^k)`` rows of windows ``2^k`` cells high
    (the last one ending where the bin ends; windows may overlap, which a max allows), for any
    ``2^k <= s``. The sparse table's maps of level k then need building only up to the largest
    k that some bin uses: each level is a pass over the whole map, each extra window a gather
    of one cell's channels per bin. :func:`_level_caps` picks the largest levels (per axis) so
    that the two costs are least; with no cap, every bin takes the largest ``2^k <= s`` and so
    one or two windows per side.

    Returns:
        tuple: per bin (R * PH * PW of them, row-major): its group key ``(level, n_h, n_w)``
        as one integer (``level = k * L + l``, L the number of column levels), its first
        window's top-left cell ``(y0, x0)``, its last window's ``(y1, x1)`` and whether it is
        empty; plus L.
    """
    num, pooled_h = hstart.shape
    pooled_w = wstart.shape[1]
    bin_h = (hend - hstart)[:, :, None].expand(num, pooled_h, pooled_w).reshape(-1)
    bin_w = (wend - wstart)[:, None, :].expand(num, pooled_h, pooled_w).reshape(-1)
    empty = _empty_bins(hstart, hend, wstart, wend).reshape(-1)
    # Empty bins (clipped away) read cell 0 and are zeroed afterwards.
    bin_h = bin_h.masked_fill(empty, 1)
    bin_w = bin_w.masked_fill(empty, 1)
    log2_h, log2_w = _floor_log2(bin_h), _floor_log2(bin_w)
    cap_h, cap_w = _level_caps(bin_h, bin_w, log2_h, log2_w, height * width)
    level_h, count_h = _window_plan(bin_h, log2_h, cap_h)
    level_w, count_w = _window_plan(bin_w, log2_w, cap_w)
    levels_w = int(level_w.max()) + 1
    y0 = hstart[:, :, None].expand(num, pooled_h, pooled_w).reshape(-1)
    x0 = wstart[:, None, :].expand(num, pooled_h, pooled_w).reshape(-1)
    y1 = y0 + bin_h - (1 << level_h)
    x1 = x0 + bin_w - (1 << level_w)
    y0, x0, y1, x1 = (t.masked_fill(empty, 0) for t in (y0, x0, y1, x1))
    level = level_h * levels_w + level_w
    most = int(max(count_h.max(), count_w.max())) + 1
    key = (level * most + count_h) * most + count_w
    return key, most, torch.stack([y0, x0, y1, x1]), empty, levels_w


def _window_plan(size: Tensor, log2: Tensor, cap: int) -> Tuple[Tensor, Tensor]:
    """Per bin side of ``size`` >= 1 cells (``log2``: floor(log2(size))): the level
    ``k = min(log2, cap)`` of its windows (``2^k`` cells) and how many cover it,
    ``ceil(size / 2^k)``."""
    level = log2.clamp(max=cap)
    span = 1 << level
    return level, (size + span - 1).div(span, rounding_mode="floor")


# What gathering one window of one bin costs against one pass over one cell of a map, per
# channel (an index_select and a maximum of a cell's channels, against a maximum over the map
# in order). Timed on the project's Xeon with the paper's conv3-conv5 maps and 128, 1000 and
# 2000 ROIs: 2 and 4 gave the same times within the noise, 8 lost most of conv3's gain.
_GATHER_COST = 4.0


def _level_caps(
    bin_h: Tensor, bin_w: Tensor, log2_h: Tensor, log2_w: Tensor, map_cells: int
) -> Tuple[int, int]:
    """
    The largest window level per axis (:func:`_bin_windows`) that makes the sparse table
    cheapest for these bins: ``map_cells`` per map pass (the row maps up to the largest row
    level, and for each row level its column maps up to the largest column level its bins use),
    :data:`_GATHER_COST` per window gathered. Computed on the distinct (height, width) pairs.
    """
    stride = int(bin_w.max()) + 1
    pairs, inverse, counts = torch.unique(
        bin_h * stride + bin_w, return_inverse=True, return_counts=True
    )
    first = torch.empty_like(pairs).scatter_(0, inverse, torch.arange(len(inverse)))
    sizes_h, sizes_w = bin_h[first], bin_w[first]
    full_h, full_w = log2_h[first], log2_w[first]
    plans_w = [_window_plan(sizes_w, full_w, cap) for cap in range(int(full_w.max()) + 1)]
    best = None
    for cap_h in range(int(full_h.max()) + 1):
        level_h, count_h = _window_plan(sizes_h, full_h, cap_h)
        top_h = int(level_h.max())
        for cap_w, (level_w, count_w) in enumerate(plans_w):
            # Row maps 1..top_h (each from the previous); per row level, its column maps.
            top_w = torch.zeros(top_h + 1, dtype=torch.long).scatter_reduce(
                0, level_h, level_w, reduce="amax"
            )
            passes = top_h + int(top_w.sum())
            gathers = int((counts * count_h * count_w).sum())
            cost = passes * map_cells + _GATHER_COST * gathers
            if best is None or cost < best[0]:
                best = (cost, cap_h, cap_w)
    return best[1], best[2]


# Per thread, the scratch memory of the last sparse-table pooling, kept for the next: fresh
# memory costs page faults (a conv3 map at 600x1000 is 38 MB, and pooling needs 4 and the bins),
# which took longer than the pooling's arithmetic. It holds at most the largest call's need (4
# maps and two blocks of bins: about 170 MB for VGG16's conv3 at 600x1000); release_scratch()
# frees it.
_SCRATCH = threading.local()
# Bins gathered at a time: bounds the scratch memory of the gathered bins (16 MB at 512
# channels) whatever the number of boxes.
_BLOCK = 8192


def _scratch(numel: int, like: Tensor) -> Tensor:
    """A 1-D scratch tensor of ``numel`` elements of ``like``'s dtype and device, reused."""
    buffer = getattr(_SCRATCH, "buffer", None)
    if (
        buffer is None
        or buffer.numel() < numel
        or buffer.dtype != like.dtype
        or buffer.device != like.device
    ):
        _SCRATCH.buffer = None  # free the old one first
        buffer = _SCRATCH.buffer = like.new_empty(numel)
    return buffer[:numel]


def release_scratch() -> None:
    """Free this thread's scratch memory of :func:`sparse_table_roi_pool`."""
    _SCRATCH.buffer = None


def _pool_image(feature: Tensor, windows, out: Tensor) -> None:
    """
    Write into ``out`` (R, PH * PW, C) the pooled bins of one image's (C, H, W) feature.

    The sparse table is never held whole (K * L maps of the feature's size): its maps are built
    one after the other, each from the previous, and the bins whose windows lie on a map are
    gathered from it (in blocks of at most :data:`_BLOCK` bins) before it is dropped.
    """
    key, most, corners, empty, levels_w = windows
    channels, height, width = feature.shape
    num_bins = len(key)
    device = feature.device
    key, order = key.sort(stable=True)
    corners = corners[:, order].to(device)
    order = order.to(device)
    groups, counts = torch.unique_consecutive(key, return_counts=True)
    # Per level, its groups: (windows down, windows across, first bin, end) in sorted order.
    by_level = {}
    begin = 0
    for group, count in zip(groups.tolist(), counts.tolist()):
        level, rest = divmod(group, most * most)
        by_level.setdefault(level, []).append((*divmod(rest, most), begin, begin + count))
        begin += count
    num_levels = max(by_level) + 1
    levels_h = -(-num_levels // levels_w)
    out = out.view(num_bins, channels)  # a view, also of a channel slice
    # Scratch: two maps for the row levels and two for the column levels, reused level after
    # level, and two blocks of gathered bins.
    map_size = height * width * channels
    block_size = min(num_bins, _BLOCK)
    scratch = _scratch(4 * map_size + 2 * block_size * channels, feature)
    maps = scratch[: 4 * map_size].view(4, height, width, channels)
    blocks = scratch[4 * map_size :].view(2, block_size, channels)
    rows, spare_rows, cols, spare_cols = maps.unbind(0)
    rows.copy_(feature.permute(1, 2, 0))  # (H, W, C): a cell's channels are contiguous
    for k in range(levels_h):
        if k > 0:
            _window_max(rows, 0, 1 << (k - 1), out=spare_rows)
            rows, spare_rows = spare_rows, rows
        used = [lw for lw in range(levels_w) if k * levels_w + lw in by_level]
        if not used:
            continue
        table = rows
        for lw in range(used[-1] + 1):
            if lw > 0:
                _window_max(table, 1, 1 << (lw - 1), out=cols)
                table, cols, spare_cols = cols, spare_cols, cols
            cells = table.view(height * width, channels)
            for down, across, lo, hi in by_level.get(k * levels_w + lw, ()):
                for start in range(lo, hi, block_size):
                    end = min(hi, start + block_size)
                    y0, x0, y1, x1 = corners[:, start:end]
                    ys = [torch.clamp(y0 + (a << k), max=y1) for a in range(down)]
                    xs = [torch.clamp(x0 + (b << lw), max=x1) for b in range(across)]
                    indices = [y * width + x for y in ys for x in xs]
                    block, buffer = blocks[0, : end - start], blocks[1, : end - start]
                    torch.index_select(cells, 0, indices[0], out=block)
                    for index in indices[1:]:
                        torch.index_select(cells, 0, index, out=buffer)
                        torch.maximum(block, buffer, out=block)
                    out.index_copy_(0, order[start:end], block)
    out.masked_fill_(empty.to(device)[:, None], 0.0)


def _window_max(x: Tensor, dim: int, shift: int, *, out: Tensor) -> None:
    """``out[i] = max(x[i], x[i + shift])`` along ``dim`` where ``i + shift`` exists, else x[i]."""
    size = x.shape[dim]
    body = max(size - shift, 0)
    if body:
        torch.maximum(
            x.narrow(dim, 0, body), x.narrow(dim, shift, body), out=out.narrow(dim, 0, body)
        )
    out.narrow(dim, body, size - body).copy_(x.narrow(dim, body, size - body))


class IONROIPool(nn.Module):
    """
    A single-scale ``ROIPool`` pooler with :class:`detectron2.modeling.ROIPooler`'s call
    signature (``forward(x: [feature], box_lists)``) that picks, per call, the fastest exact
    implementation: :func:`sparse_table_roi_pool` on the CPU when no gradient is needed,
    ``torchvision.ops.roi_pool`` otherwise (on a GPU its kernel runs every bin and channel in
    parallel; training needs its argmax for the backward pass). Both give the same output.
    """

    def __init__(self, output_size: int, spatial_scale: float):
        """
        Args:
            output_size (int): bins per side (7 for VGG16's fc6).
            spatial_scale (float): the pooled feature's scale (1 / stride).
        """
        super().__init__()
        self.output_size = (int(output_size), int(output_size))
        self.spatial_scale = float(spatial_scale)

    def use_sparse_table(self, feature: Tensor) -> bool:
        """
        Whether :meth:`forward` pools ``feature`` with :func:`sparse_table_roi_pool`. Never
        while tracing: its bins are computed in Python from the traced size, which a trace
        would keep as constants (wrong boxes at any other input size, without an error).
        """
        return (
            not torch.jit.is_tracing()
            and feature.device.type == "cpu"
            and feature.dtype == torch.float32
            and not (torch.is_grad_enabled() and feature.requires_grad)
        )

    def forward(
        self,
        x: List[Tensor],
        box_lists: List[Boxes],
        out: Optional[Tensor] = None,
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> Tensor:
        """
        Args:
            x (list[Tensor]): one (N, C, H, W) feature map.
            box_lists (list[Boxes]): the N images' boxes, in input-image coordinates.
            out (Tensor or None): (R, output_size, output_size, C) to write the result into
                (without autograd); None: a new tensor.
            image_sizes (list[tuple[int, int]] or None): (h, w) of each image before padding.
                Given, a box pools only its image's valid cells
                (:func:`~ion_d2.modeling.padding.valid_cell_counts`), as it would on the image
                alone with no padding: a box reaching the image's border rounds its last bin
                one cell past it (``round(72 / 16)`` = 5 of 5 valid rows), into the batch's
                padding, whose zeros would win the max over negative features (a linear
                context output). None: the whole map, as ``torchvision.ops.roi_pool``.

        Returns:
            Tensor: (R, C, output_size, output_size) for the R boxes of all images (a view of
            ``out`` when given).
        """
        if len(x) != 1:
            raise ValueError(f"IONROIPool pools one feature map; got {len(x)}.")
        feature = x[0]
        if len(box_lists) != feature.shape[0]:
            raise ValueError(
                f"IONROIPool got {len(box_lists)} box lists for a batch of {feature.shape[0]} "
                "feature maps; expected one per image."
            )
        rois = convert_boxes_to_pooler_format(box_lists)
        counts = self._valid_counts(feature, image_sizes)
        # Each ROI's valid rows and columns; None while tracing (no sparse table then, and
        # _zero_empty_bins finds empty bins by value).
        limits = None
        if counts is not None and not torch.jit.is_tracing():
            limits = counts.cpu().repeat_interleave(torch.tensor([len(b) for b in box_lists]), 0)
        if self.use_sparse_table(feature):
            return sparse_table_roi_pool(
                feature, rois, self.spatial_scale, self.output_size, out=out, limits=limits
            )
        if counts is not None:
            # The padding cannot win a max; a bin that holds nothing else is empty (0), as one
            # clipped away (_zero_empty_bins).
            valid = valid_cell_mask(counts, feature.shape[2], feature.shape[3])
            feature = feature.masked_fill(~valid, float("-inf"))
        pooled = tv_roi_pool(feature, rois.to(feature.dtype), self.output_size, self.spatial_scale)
        pooled = self._zero_empty_bins(pooled, rois, counts, limits)
        if out is None:
            return pooled
        out.copy_(pooled.permute(0, 2, 3, 1))
        return out.permute(0, 3, 1, 2)

    def _zero_empty_bins(
        self, pooled: Tensor, rois: Tensor, counts: Optional[Tensor], limits: Optional[Tensor]
    ) -> Tensor:
        """
        torchvision's output of a masked feature with each bin that holds no valid cell at 0,
        as one clipped away (its kernel starts each max at -FLT_MAX, and gives it no gradient).
        """
        if limits is not None:
            # Those bins from the boxes alone (no pass over the output), set in place: their
            # argmax is -1, so the backward pass gives them no gradient either way, and an
            # out-of-place fill would copy the output forward and its gradient backward.
            bins = roi_pool_bins(
                rois[:, 1:].cpu(), self.spatial_scale, self.output_size, limits[:, 0], limits[:, 1]
            )
            empty = _empty_bins(*bins).to(pooled.device)
            if bool(empty.any()):
                with torch.no_grad():
                    pooled.masked_fill_(empty[:, None], 0.0)
        elif counts is not None:  # tracing: the sizes vary, so a pass over the output
            pooled = pooled.masked_fill(pooled <= torch.finfo(pooled.dtype).min, 0.0)
        return pooled

    def _valid_counts(
        self, feature: Tensor, image_sizes: Optional[Sequence[Tuple[int, int]]]
    ) -> Optional[Tensor]:
        """Each image's valid (rows, columns) of ``feature``; None when all fill the map."""
        if image_sizes is None:
            return None
        stride = int(round(1.0 / self.spatial_scale))
        height, width = feature.shape[2], feature.shape[3]
        counts = valid_cell_counts(image_sizes, stride, height, width, feature.device)
        if torch.jit.is_tracing():
            return counts  # the traced sizes vary: always masked
        if bool((counts[:, 0] == height).all()) and bool((counts[:, 1] == width).all()):
            return None
        return counts
