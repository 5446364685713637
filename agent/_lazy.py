"""A lighter daemon: numpy on first use (an idle daemon, no model loaded, is some 19 MiB lighter
without it), and the C heap's free pages handed back after start-up.

    if TYPE_CHECKING:
        import numpy as np
    else:
        np = lazy_module("numpy")

The first attribute read imports the module and copies its namespace into the stand-in, so later
reads are plain attribute lookups.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from types import ModuleType
from typing import Any


class _LazyModule(ModuleType):
    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)


def lazy_module(name: str) -> Any:
    return _LazyModule(name)


def release_free_memory() -> None:
    """Ask glibc to return the free pages of its heaps (``malloc_trim``); a no-op elsewhere."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: glibc's, on glibc
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    logging.getLogger("agent").debug("free heap pages returned to the system")
