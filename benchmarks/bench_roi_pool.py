"""
Time ION's ROI max pooling against torchvision's on VGG16-sized maps (section 3.1).

For conv3 (stride 4, 256 channels), conv4 (stride 8, 512) and conv5 (stride 16, 512) of a 600x1000
image, and for boxes of three size ranges, it times in one run, interleaved,
``torchvision.ops.roi_pool`` (what Detectron2's ``ROIPooler`` calls) against
:func:`ion_d2.modeling.roi_pool.sparse_table_roi_pool` (what
:class:`ion_d2.modeling.roi_pool.IONROIPool` calls on a CPU without autograd), checks that the
outputs are equal, and prints the median times and the speed-up. Example::

    python benchmarks/bench_roi_pool.py --boxes 1000 --threads 2
"""

import argparse
import math
import statistics
import time
from typing import Callable, List

import torch
from torchvision.ops import roi_pool

from ion_d2.modeling.roi_pool import sparse_table_roi_pool

# (name, stride, channels) of VGG16's pooled features.
FEATURES = [("conv3", 4, 256), ("conv4", 8, 512), ("conv5", 16, 512)]
# Box side ranges in pixels (log-uniform).
SIZES = [(16, 64), (64, 256), (256, 600)]


def make_rois(n: int, lo: float, hi: float, height: int, width: int, seed: int) -> torch.Tensor:
    """(n, 5) ROIs of one image: uniform centres, sides log-uniform in [lo, hi], clipped."""
    g = torch.Generator().manual_seed(seed)
    sides = torch.exp(math.log(lo) + torch.rand(n, 2, generator=g) * math.log(hi / lo))
    centres = torch.rand(n, 2, generator=g) * torch.tensor([float(width), float(height)])
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return torch.cat([torch.zeros(n, 1), boxes], dim=1)


def median_time(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    times: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boxes", type=int, default=1000)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"{args.boxes} boxes on one {args.height}x{args.width} image, float32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of "
        f"{args.repeats} (after a warm-up), the two implementations interleaved"
    )
    print(
        f"{'feature':<8s} {'box sides px':>13s} {'torchvision':>12s} {'sparse table':>13s} "
        f"{'speed-up':>9s}  equal"
    )
    for name, stride, channels in FEATURES:
        g = torch.Generator().manual_seed(args.seed)
        size = (-(-args.height // stride), -(-args.width // stride))
        # Post-ReLU-like features: non-negative with many zeros (ties), as VGG16's.
        feature = torch.relu(torch.randn(1, channels, *size, generator=g))
        for lo, hi in SIZES:
            rois = make_rois(args.boxes, lo, hi, args.height, args.width, args.seed)

            def torchvision_pool():
                return roi_pool(feature, rois, (7, 7), 1.0 / stride)

            def table_pool():
                return sparse_table_roi_pool(feature, rois, 1.0 / stride, (7, 7))

            equal = torch.equal(torchvision_pool(), table_pool())  # also the warm-up
            times = {"tv": [], "st": []}
            for _ in range(args.repeats):
                times["tv"].append(median_time(torchvision_pool, 1))
                times["st"].append(median_time(table_pool, 1))
            tv, st = statistics.median(times["tv"]), statistics.median(times["st"])
            print(
                f"{name:<8s} {f'{lo}-{hi}':>13s} {tv:11.3f}s {st:12.3f}s {tv / st:8.1f}x  "
                f"{equal}"
            )


if __name__ == "__main__":
    main()
