"""
Keeping the memory a CPU training step frees for the next step (``ION_KEEP_FREED_CPU_MEMORY``,
issue 27).

A training step allocates and frees the same large tensors every iteration: activations, their
gradients, the per-ROI descriptors, tens of MB each. glibc's malloc gives an allocation above its
mmap threshold (128 KB at first, raised by use up to 32 MB) its own ``mmap`` and unmaps it when
it is freed, and it returns the free top of its heap to the kernel beyond 128 KB. The next step's
tensors then fault their pages in again, each zero-filled by the kernel: on the project's 2-core
VMs a fresh 64 MB tensor took 13-22 ms to fill against 3-4 ms for a reused one (about 1 us per
4 KiB page), and kernel time was 18 % of the CPU time of the paper-scale benchmark's steps
(docs/BENCHMARKS.md, "Freed memory kept for the next step").

:func:`keep_freed_cpu_memory` tells glibc's malloc to serve every allocation from its heap
(``M_MMAP_MAX`` 0) and to keep its free top (``M_TRIM_THRESHOLD`` 2 GB - 1): freed memory
stays in the process and the next step reuses it. The process's resident memory then stays near
its peak instead of dropping between steps. The setting is the process's; the data loader's
worker processes, forked after it, inherit it.
"""

import ctypes
import logging
import platform
from typing import Optional

__all__ = ["keep_freed_cpu_memory", "malloc_keeps_freed_memory"]

logger = logging.getLogger(__name__)

# glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, 2 GB - 1

_APPLIED = False


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's glibc, or None where the C library is another (macOS, musl, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_cpu_memory() -> bool:
    """
    Have glibc's malloc keep freed memory in this process for reuse (see the module's
    docstring).

    Returns:
        bool: True when it is set (now or by an earlier call); False where the process's C
        library is not glibc, which is logged with the reason.

    Raises:
        RuntimeError: glibc refused a setting (``mallopt`` returned 0).
    """
    global _APPLIED
    if _APPLIED:
        return True
    libc = _glibc()
    if libc is None:
        logger.warning(
            "ION_KEEP_FREED_CPU_MEMORY: not applied, the C library is %r on %s, not glibc "
            "(only glibc's malloc is tuned; training runs with the default allocator).",
            platform.libc_ver()[0] or "unknown",
            platform.system(),
        )
        return False
    for name, param, value in (
        ("M_MMAP_MAX", _M_MMAP_MAX, 0),
        ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
    ):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(
                f"ION_KEEP_FREED_CPU_MEMORY: glibc's mallopt({name}, {value}) failed."
            )
    _APPLIED = True
    logger.info(
        "ION_KEEP_FREED_CPU_MEMORY: glibc's malloc keeps freed memory for reuse "
        "(M_MMAP_MAX 0, M_TRIM_THRESHOLD %d).",
        _TRIM_THRESHOLD,
    )
    return True


def malloc_keeps_freed_memory() -> bool:
    """Whether :func:`keep_freed_cpu_memory` has set this process's malloc."""
    return _APPLIED
