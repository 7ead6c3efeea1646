"""Allocator tuning: after keep_freed_memory(), glibc serves large blocks from the heap and keeps them.

What the tuning buys (page faults and time per pass) depends on the machine and is measured by
`bench/allocator_bench.py`; here only what is deterministic is asserted: the settings took effect.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Allocates a 16 MiB block with libc's malloc and reports, from glibc's mallinfo2(), how many bytes sit in
# mmapped chunks and in the heap while it is live and after it is freed.
_PROBE = """
import ctypes, json, sys
from sinkstream.service.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.mallinfo2.restype = MallInfo2
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else False
size = 16 << 20
before = libc.mallinfo2()
block = libc.malloc(size)
live = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"tuned": tuned, "mmapped_growth": live.hblkhd - before.hblkhd,
                  "heap_kept_after_free": after.arena - before.arena, "size": size}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_keep_freed_memory_serves_large_blocks_from_the_heap_and_keeps_them():
    plain, tuned = _probe("plain"), _probe("tuned")
    size = plain["size"]
    # Untuned, glibc maps a block this large on its own and unmaps it on free (faulted in afresh next time).
    assert plain["mmapped_growth"] >= size
    assert plain["heap_kept_after_free"] < size
    # Tuned, the block comes from the heap and the heap is not trimmed when it is freed.
    assert tuned["tuned"], "mallopt was refused"
    assert tuned["mmapped_growth"] == 0
    assert tuned["heap_kept_after_free"] >= size
