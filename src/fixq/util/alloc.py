"""Keep freed memory in the process (glibc ``mallopt``) for long CPU runs.

glibc serves every block over 32 MiB with its own ``mmap`` and returns it to the kernel when
freed, so each large tensor of a simulation (an activation of a batch) costs fresh pages:
one page fault and one zeroed page per 4 KiB, on every batch of every trial. On a 2-core
machine a search then spent about as much time in the kernel as in its own work. With
``M_MMAP_MAX = 0`` large blocks come from the heap and, with a high ``M_TRIM_THRESHOLD``,
stay there when freed: the next batch reuses them. Values are unchanged (this is where
memory comes from, not what is computed); the resident size keeps its peak instead of
shrinking between batches. ``FIXQ_MALLOC=0`` leaves the allocator as it is; elsewhere than
glibc (musl, macOS, Windows) nothing is done.

>>> keep_freed_memory() in (True, False)
True
"""
from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
_TRIM_BYTES = 1 << 30  # freed memory at the top of the heap is returned beyond 1 GiB only


def keep_freed_memory() -> bool:
    """Set the allocator as the module docstring says; True when it was set."""
    if os.environ.get("FIXQ_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES))
