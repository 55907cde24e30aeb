"""Facts about the installed detectron2 that ion_d2 adapts to."""

import functools
import importlib.machinery


@functools.lru_cache(maxsize=None)
def has_compiled_ops() -> bool:
    """
    Returns:
        bool: True when ``detectron2._C`` is a compiled extension module, False when it is
        missing or a Python stand-in (such as the one ``make setup`` installs without a
        compiler-built detectron2, see ``tools/bootstrap/``), whose compiled-only ops raise.
    """
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return str(getattr(_C, "__file__", "")).endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
