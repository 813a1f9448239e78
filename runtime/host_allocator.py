"""Host allocator tuning: keeps glibc from unmapping XLA:CPU's scratch memory after every step.

XLA:CPU allocates each execution's temporary buffer (64 MB for the CPU GPT config's training
step) with malloc. glibc serves allocations above its mmap threshold (at most 32 MB) with a
fresh mmap and unmaps them on free, so every step page-faults its whole scratch area in again
(docs/performance.md has what that cost the CPU GPT step). Raising the mmap and trim
thresholds keeps the memory in the heap for reuse, as tcmalloc or jemalloc would. It changes
speed only, never results. Call it first thing, before jax and TensorFlow start threads (as
train.py and tools/bench.py do).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: larger single allocations still get their own mapping


def keep_freed_memory_mapped() -> bool:
    """Raises glibc's mmap and trim thresholds for this process; False where that does not
    apply (not Linux/glibc) or when JAXLAB_MALLOC_TUNING=0 turns it off."""
    if os.environ.get("JAXLAB_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    # (Capping malloc at one arena, so that XLA's worker threads share the main heap, measured
    # no better: lock contention ate the gain.)
    settings = ((_M_MMAP_THRESHOLD, _THRESHOLD), (_M_TRIM_THRESHOLD, _THRESHOLD))
    return all(mallopt(param, value) == 1 for param, value in settings)
