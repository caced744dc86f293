"""Garbage-collector tuning for the pilot process.

Why: with 1,000 streams pilot holds a few hundred thousand long-lived objects, and CPython's
default young-generation threshold (700 allocations) runs a collection every few
milliseconds of a push; each one scans survivors again, and under load they added 20-30 ms
to every rebuild plus 50-120 ms full collections in the middle of a fan-out. A higher
threshold makes young collections rare (garbage here is freed by reference counting; the
collector only finds cycles), and freezing what exists at start-up (imported modules,
protobuf descriptors) takes it out of every later full collection.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from collections.abc import Mapping, Sequence


def tune_gc(young_threshold: int) -> tuple[int, int, int]:
    """Freeze the objects alive now and raise the young threshold; returns the previous thresholds.

    `young_threshold` 0 keeps Python's thresholds (the freeze still happens). Process-wide,
    so only a process entry point (`meshctl up`) calls it, never a library or a test.
    """
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    if young_threshold:
        gc.set_threshold(young_threshold, previous[1], previous[2])
    return previous


def release_free_memory() -> bool:
    """Hand heap pages freed since the last call back to the OS (glibc `malloc_trim`).

    Why: after a push, megabytes of responses and request buffers are freed, but glibc keeps the
    pages in its arenas, so RSS stays at the peak of the last load spike. Trimming a second after
    a push returns them (measured: about 50 MB of 140 MB per 1,000 streams). Takes a few
    milliseconds; False where glibc is not the allocator.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.malloc_trim(0)
    return True


def use_system_malloc(argv: Sequence[str], environ: Mapping[str, str]) -> None:
    """Re-execute this process (same pid) as ``python <argv>`` under glibc malloc, unless
    ``PYTHONMALLOC`` is set already (set it, e.g. to ``pymalloc``, to keep Python's allocator).

    Why: Python's small-object allocator returns a 1 MiB arena to the OS only once every object
    in it is gone, and the few long-lived objects created while a large config was loaded pin
    hundreds of them: measured with 30,000 routes loaded then removed, pilot kept 100 of the
    326 MB it grew by. Under glibc malloc, `release_free_memory` hands back free pages one by
    one: it kept 12 MB, peaked lower (291 vs 404 MB) and loaded no slower. Only a process entry
    point (`meshctl up`) calls this, before it starts anything.

    glibc gives every thread that allocates its own arena (gRPC's threads, the build thread), and
    small objects spread over them cost steady memory: at mission scale (2,000 streams) pilot held
    323 MB with the default and 291 MB with two arenas, so ``MALLOC_ARENA_MAX`` is 2 unless set.
    """
    if "PYTHONMALLOC" in environ:
        return
    os.execve(sys.executable, [sys.executable, *argv],
              {**environ, "PYTHONMALLOC": "malloc", "MALLOC_ARENA_MAX": environ.get("MALLOC_ARENA_MAX", "2")})

