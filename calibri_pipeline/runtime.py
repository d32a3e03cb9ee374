"""Process-wide settings that every entry point needs before tensors are allocated.

**glibc's allocator.** By default glibc serves allocations above its mmap threshold (128 KiB at
first, raised as it sees large frees) with a fresh ``mmap`` and gives them back with ``munmap`` on
free, and trims the heap's top whenever more than twice that threshold is free. A sampler
allocates and frees the same activations at every transformer call, so each call faults their
pages in anew: the demo took 207 million minor page faults and 782 s of system time on the EPYC
(DESIGN.md §9). ``tune_allocator`` sets, with ``mallopt``, the mmap threshold to the largest value
glibc accepts (32 MiB) and the trim threshold out of reach: freed activations stay in the heap and
the next call reuses pages already mapped (a 32-image sampler call: 0 faults instead of 228-703 k).
The process keeps its peak heap; a sampler needs it again a moment later anyway. Disabling mmap
altogether (``M_MMAP_MAX=0``) was measured too: no faster, and a loop allocating the same 64 MiB
block grew the heap to 795 MiB (283 MiB with mmap) through alignment slack, so it is not used.
``CALIBRI_MALLOC=default`` keeps glibc's defaults (to measure the difference).

It runs when ``calibri_pipeline`` is imported, so the ``calibri`` commands, Dagster's run and code
server processes (they import the code location) and the tests all get it. ``mallopt`` acts on
allocations made after the call, whenever that is; on a libc without ``mallopt`` it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)

ENV = "CALIBRI_MALLOC"
_state: dict[str, object] = {"tuned": False, "reason": "not run"}


def tune_allocator() -> bool:
    """Keep freed activations in the heap (mmap only above 32 MiB, no trimming); True when applied."""
    if os.environ.get(ENV, "").strip().lower() == "default":
        _state.update(tuned=False, reason=f"{ENV}=default")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _state.update(tuned=False, reason="no glibc mallopt")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    _state.update(
        tuned=ok, reason="mallopt: M_MMAP_THRESHOLD=32MiB, M_TRIM_THRESHOLD=2^31-1" if ok else "mallopt failed"
    )
    return ok


def allocator_report() -> dict[str, object]:
    """What :func:`tune_allocator` did in this process (for benchmarks and logs)."""
    return dict(_state)
