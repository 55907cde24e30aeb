"""Facts about the installed detectron2 that ion_d2 adapts to."""

import functools


@functools.lru_cache(maxsize=None)
def has_compiled_ops() -> bool:
    """
    Returns:
        bool: True when detectron2's compiled extension (``detectron2._C``) is installed, False
        when it is ion_d2's Python-only fallback (see ``tools/d2_fallback_C.py``), whose
        compiled-only ops raise a clear error.
    """
    from detectron2 import _C

    return not getattr(_C, "ION_D2_FALLBACK", False)
