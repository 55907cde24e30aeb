"""
Time ION's IRNN recurrences on a conv5-sized map (section 3.2).

Compares, in one run and on the same input:

1. a learned-``Whh`` scan: the batched scan (:func:`ion_d2.irnn_scan.irnn_scan`, one
   ``(N*H, C) x (C, C)`` matmul per step for all rows of all images) against a cell-by-cell loop
   (one ``(C, C) x (C,)`` matvec per cell), as the paper's "stepping all IRNNs together with a
   single matrix multiply" vs "computing each RNN cell one at a time";
2. the ``Whh = I`` scan: the cumsum/cummin closed form
   (:func:`ion_d2.irnn_scan.irnn_scan_identity`) against the batched step loop
   ``h = relu(h + x_t)``, forward only and forward + backward; for scale, the forward also
   times :func:`ion_d2.irnn_scan.irnn_scan` with ``Whh = I`` (what "removing Whh" saves).

Each line reports the median time per call over all four directions (right, left, down, up),
the speed-up over the section's first line (the baseline) and the largest difference from the
baseline's output relative to the baseline's largest value. Example::

    python benchmarks/bench_irnn.py --height 38 --width 50 --hidden 512
"""

import argparse
import statistics
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ion_d2.irnn_scan import IRNN_DIRECTIONS, irnn_scan, irnn_scan_identity


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


def batched_identity_step_loop(x: Tensor, direction: str) -> Tensor:
    """``h_t = relu(h_{t-1} + x_t)`` with a Python loop over steps, all rows/columns at once."""
    dim = 3 if direction in ("right", "left") else 2
    length = x.shape[dim]
    steps = range(length - 1, -1, -1) if direction in ("left", "up") else range(length)
    states: List[Optional[Tensor]] = [None] * length
    h = None
    for t in steps:
        x_t = x.select(dim, t)
        h = torch.relu(x_t) if h is None else torch.relu(h + x_t)
        states[t] = h
    return torch.stack(states, dim=dim)


def all_directions(scan: Callable[[str], Tensor]) -> Tensor:
    return torch.cat([scan(d) for d in IRNN_DIRECTIONS], dim=1)


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
    print(f"  {base_name:<40s} {base_t * 1e3:9.2f} ms   (baseline)")
    for row_name, row_t, row_out in rows[1:]:
        diff = ((row_out - base_out).abs().max() / scale).item()
        print(
            f"  {row_name:<40s} {row_t * 1e3:9.2f} ms   speed-up {base_t / row_t:6.1f}x   "
            f"max |diff| / max |baseline| {diff:.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512, help="hidden units per direction")
    parser.add_argument("--height", type=int, default=38, help="conv5 height (600 px / 16)")
    parser.add_argument("--width", type=int, default=50, help="conv5 width (800 px / 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of the fast paths")
    parser.add_argument("--cell-repeats", type=int, default=1, help="timed cell-by-cell runs")
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
    shape = (args.batch, args.hidden, args.height, args.width)
    x = torch.randn(shape)
    whh = torch.eye(args.hidden) + 0.01 * torch.randn(args.hidden, args.hidden)
    print(
        f"input-to-hidden map {tuple(shape)}, 4 directions, float32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; median time per call"
    )

    def identity_loop(t: Tensor) -> Tensor:
        return all_directions(lambda d: batched_identity_step_loop(t, d))

    def identity_closed(t: Tensor) -> Tensor:
        return all_directions(lambda d: irnn_scan_identity(t, d))

    eye = torch.eye(args.hidden)
    with torch.no_grad():
        cell = timeit(
            lambda: all_directions(lambda d: cell_by_cell_scan(x, whh, d)),
            args.cell_repeats,
            warmup=0,
        )
        batched = timeit(lambda: all_directions(lambda d: irnn_scan(x, whh, d)), args.repeats)
        report(
            "[1] learned Whh, forward",
            [
                ("cell-by-cell loop (1 matvec per cell)", *cell),
                ("batched scan irnn_scan (1 matmul/step)", *batched),
            ],
        )

        loop = timeit(lambda: identity_loop(x), args.repeats)
        closed = timeit(lambda: identity_closed(x), args.repeats)
        matmul = timeit(lambda: all_directions(lambda d: irnn_scan(x, eye, d)), args.repeats)
        report(
            "[2] Whh removed, forward",
            [
                ("batched step loop h = relu(h + x_t)", *loop),
                ("closed form irnn_scan_identity", *closed),
                ("irnn_scan with Whh = I (1 matmul/step)", *matmul),
            ],
        )

    loop = timeit(forward_backward(identity_loop, x), args.repeats)
    closed = timeit(forward_backward(identity_closed, x), args.repeats)
    report(
        "[3] Whh removed, forward + backward (input gradients compared)",
        [
            ("batched step loop h = relu(h + x_t)", *loop),
            ("closed form irnn_scan_identity", *closed),
        ],
    )


if __name__ == "__main__":
    main()
