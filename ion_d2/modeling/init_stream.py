"""
ION's added modules draw their initial weights from their own random stream (issue 25).

A model with ION's parts and the stock model they are added to are compared seed for seed (the
accuracy gate, docs/BENCHMARKS.md). If the context module or the skip pooler's 1x1 conv drew its
weights from the global generator in build order, every part built after it (the RPN, the ROI
heads' fc layers) would start from other weights than the stock model's with the same seed, and
the comparison would carry the whole seed-to-seed spread of those initialisations: on the
bundled R50-FPN recipe a model whose added context stayed near 0 throughout training lost
2.4 AP on two seeds against the stock model's three, while the same model without the
context module, built as the stock model draws its weights, matched the stock seed within 0.4
AP. Built inside :func:`own_init_stream`, ION's modules leave the global generator where they
found it, so the stock parts of an ION model start exactly as the stock model's do.
"""

import contextlib
import zlib
from typing import Iterator

import torch

__all__ = ["own_init_stream"]


@contextlib.contextmanager
def own_init_stream(name: str) -> Iterator[None]:
    """
    Within the block, torch's CPU generator runs from a seed derived from its current state and
    ``name`` (so each named module has its own stream, reproducible under one seed); on exit it
    is restored to its state at entry, as if nothing had been drawn. Modules are initialised on
    the CPU (Detectron2 moves the built model to its device), so only that generator is used.
    """
    generator = torch.default_generator
    with torch.random.fork_rng(devices=[]):
        base = int(torch.randint(0, 2**62, (), generator=generator).item())
        generator.manual_seed((base + zlib.crc32(name.encode())) % 2**62)
        yield
