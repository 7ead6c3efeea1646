"""Keep memory freed by a forward pass mapped for the next one, instead of handing it back to the OS.

glibc serves large allocations (above a threshold of at most 32 MiB that it adjusts itself) with a fresh
mmap and unmaps them on free, so every forward pass page-faults its big temporaries (logits [chunk, vocab],
attention and MLP activations) in again; raising glibc's thresholds keeps that memory mapped (for the
measured effect see bench/results/allocator.md). Memory stays bounded: passes have a bounded size, so the
retained memory is at most one pass's peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # allocations below this come from the heap; free memory below it is not trimmed


def keep_freed_memory(threshold: int = KEEP_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where that does not apply (not
    Linux, or a C library without mallopt, such as musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold))
