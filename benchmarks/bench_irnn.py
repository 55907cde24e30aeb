"""
Time ION's IRNN recurrences and context module on a conv5-sized map (section 3.2).

Compares, in one run and on the same input:

1. a learned-``Whh`` scan: the batched scan (:func:`ion_d2.modeling.context.irnn_scan.irnn_scans`,
   one ``(N*H, C) x (C, C)`` matmul per step for all rows of all images, four directions at once)
   against a cell-by-cell loop (one ``(C, C) x (C,)`` matvec per cell), as the paper's "stepping all
   IRNNs together with a single matrix multiply" vs "computing each RNN cell one at a time";
2. the ``Whh = I`` scan: the step loop ``h = relu(h + x_t)`` (``identity_method="step"``, the
   CPU's choice) against the cumsum/cummin closed form (``"closed_form"``, the GPU's choice),
   forward only and forward + backward; for scale, the forward also times the learned scan
   with ``Whh = I`` (what "removing Whh" saves);
3. the whole :class:`ion_d2.modeling.context.IRNN` module in eval (``--layers`` 4-direction
   layers of ``--hidden`` units on a ``--hidden``-channel map), ``Whh`` learned and removed; with
   ``--trunk``, also the VGG16 trunk on the image that gives this map (16 px per cell) and the
   module's share of the trunk's time.

Each line reports the median time per call, the speed-up over the section's first line (the
baseline) and the largest difference from the baseline's output relative to the baseline's
largest value. On a shared CPU the times are noisy: compare lines of one run. Example::

    python benchmarks/bench_irnn.py --threads 2 --trunk
"""

import argparse
import statistics
import time
from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor

from ion_d2.modeling.context import IRNN
from ion_d2.modeling.context.irnn_scan import IRNN_DIRECTIONS, irnn_scans
from ion_d2.modeling.vgg16 import IONVGG16


def cell_by_cell_scan(x: Tensor, whh: Tensor, direction: str) -> Tensor:
    """Reference: ``h = relu(whh @ h + x)`` one cell at a time (the slow way)."""
    n, c, height, width = x.shape
    out = torch.empty_like(x)
    horizontal = direction in ("right", "left")
    outer, inner = (height, width) if horizontal else (width, height)
    steps = list(range(inner))
    if direction in ("left", "up"):
        steps.reverse()
    for b in range(n):
        for a in range(outer):
            h = torch.zeros(c, dtype=x.dtype)
            for t in steps:
                i, j = (a, t) if horizontal else (t, a)
                h = torch.relu(torch.mv(whh, h) + x[b, :, i, j])
                out[b, :, i, j] = h
    return out


def timeit(fn: Callable[[], Tensor], repeats: int, warmup: int = 1) -> Tuple[float, Tensor]:
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def forward_backward(fn: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], Tensor]:
    def run() -> Tensor:
        inp = x.detach().requires_grad_(True)
        out = fn(inp)
        out.backward(torch.ones_like(out))
        return inp.grad

    return run


def report(name: str, rows: Sequence[Tuple[str, float, Tensor]]) -> None:
    """Print each row's time, and its speed-up over the first row and difference from it."""
    base_name, base_t, base_out = rows[0]
    scale = base_out.abs().max().clamp(min=1e-30)
    print(name)
    print(f"  {base_name:<44s} {base_t * 1e3:9.2f} ms   (baseline)")
    for row_name, row_t, row_out in rows[1:]:
        diff = ((row_out - base_out).abs().max() / scale).item()
        print(
            f"  {row_name:<44s} {row_t * 1e3:9.2f} ms   speed-up {base_t / row_t:6.1f}x   "
            f"max |diff| / max |baseline| {diff:.1e}"
        )


def time_module(args: argparse.Namespace, x: Tensor) -> None:
    """Section 3: the IRNN module in eval, learned and removed, and optionally the trunk."""
    feature = torch.randn(args.batch, args.hidden, args.height, args.width)
    times = {}
    with torch.no_grad():
        for recurrent in ("learned", "removed"):
            module = IRNN(
                in_feature="conv5",
                in_channels=args.hidden,
                stride=16,
                hidden_dim=args.hidden,
                num_layers=args.layers,
                recurrent=recurrent,
            ).eval()
            times[recurrent] = timeit(lambda: module({"conv5": feature})["context"], args.repeats)
        trunk_t = None
        if args.trunk:
            trunk = IONVGG16(out_features=["conv5"]).eval()
            image = torch.randn(args.batch, 3, 16 * args.height, 16 * args.width)
            trunk_t = timeit(lambda: trunk(image)["conv5"], args.trunk_repeats)[0]
    print(
        f"[4] IRNN module, eval forward ({args.layers} layers, hidden {args.hidden}, "
        f"{tuple(feature.shape)})"
    )
    for recurrent, (t, _) in times.items():
        share = "" if trunk_t is None else f"   {100 * t / trunk_t:5.1f} % of the trunk"
        print(f"  Whh {recurrent:<40s} {t * 1e3:9.2f} ms{share}")
    if trunk_t is not None:
        size = (16 * args.height, 16 * args.width)
        print(f"  VGG16 trunk to conv5, {size[0]}x{size[1]} image {trunk_t * 1e3:11.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512, help="hidden units per direction")
    parser.add_argument("--height", type=int, default=38, help="conv5 height (600 px / 16)")
    parser.add_argument("--width", type=int, default=63, help="conv5 width (1000 px / 16)")
    parser.add_argument("--layers", type=int, default=2, help="IRNN layers of the module")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of the fast paths")
    parser.add_argument("--cell-repeats", type=int, default=1, help="timed cell-by-cell runs")
    parser.add_argument("--trunk", action="store_true", help="also time the VGG16 trunk")
    parser.add_argument("--trunk-repeats", type=int, default=3, help="timed trunk runs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default). 1 by default: on a small shared CPU, "
        "waking the thread pool costs milliseconds per large op and swamps what is measured.",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shape = (args.batch, args.height, args.width, 1, args.hidden)
    x = torch.randn(shape)  # one input-to-hidden map shared by the four directions
    x_nchw = x[:, :, :, 0].permute(0, 3, 1, 2).contiguous()
    whh = torch.eye(args.hidden) + 0.01 * torch.randn(4, args.hidden, args.hidden)
    print(
        f"input-to-hidden map {tuple(x_nchw.shape)}, 4 directions, float32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; median time per call"
    )

    def step(t: Tensor) -> Tensor:
        return irnn_scans(t, IRNN_DIRECTIONS, identity_method="step")

    def closed(t: Tensor) -> Tensor:
        return irnn_scans(t, IRNN_DIRECTIONS, identity_method="closed_form")

    eye = torch.eye(args.hidden).expand(4, -1, -1)
    with torch.no_grad():
        cell = timeit(
            lambda: torch.stack(
                [cell_by_cell_scan(x_nchw, whh[d], s) for d, s in enumerate(IRNN_DIRECTIONS)],
                dim=1,
            ),
            args.cell_repeats,
            warmup=0,
        )
        batched = timeit(lambda: irnn_scans(x, IRNN_DIRECTIONS, whh), args.repeats)
        # cell-by-cell states are (N, 4, C, H, W); irnn_scans' are (N, H, W, 4, C)
        batched = (batched[0], batched[1].permute(0, 3, 4, 1, 2))
        report(
            "[1] learned Whh, forward",
            [
                ("cell-by-cell loop (1 matvec per cell)", *cell),
                ("batched scan irnn_scans (1 matmul/step)", *batched),
            ],
        )
        report(
            "[2] Whh removed, forward",
            [
                ("closed form (cumsum/cummin)", *timeit(lambda: closed(x), args.repeats)),
                ("step loop h = relu(h + x_t)", *timeit(lambda: step(x), args.repeats)),
                (
                    "learned scan with Whh = I (1 matmul/step)",
                    *timeit(lambda: irnn_scans(x, IRNN_DIRECTIONS, eye), args.repeats),
                ),
            ],
        )

    report(
        "[3] Whh removed, forward + backward (input gradients compared)",
        [
            ("closed form (cumsum/cummin)", *timeit(forward_backward(closed, x), args.repeats)),
            ("step loop h = relu(h + x_t)", *timeit(forward_backward(step, x), args.repeats)),
        ],
    )
    time_module(args, x)


if __name__ == "__main__":
    main()
