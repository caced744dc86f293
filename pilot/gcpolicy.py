"""Garbage-collector tuning and the memory allocator of the pilot process.

Why: with 1,000 streams pilot holds a few hundred thousand long-lived objects, and CPython's
default young-generation threshold (700 allocations) runs a collection every few
milliseconds of a push; each one scans survivors again, and under load they added 20-30 ms
to every rebuild plus 50-120 ms full collections in the middle of a fan-out. A higher
threshold makes young collections rare (garbage here is freed by reference counting; the
collector only finds cycles), and freezing what exists at start-up (imported modules,
protobuf descriptors) takes it out of every later full collection.

Rare is not enough at mission scale: a fleet connecting allocates hundreds of thousands of
objects, and the collections that follow left the counters wherever the connect ended, so the
next collection fell at a random point of the next fan-out: in two of three mission-scale runs a
middle collection (258-261 ms, with 2,000 streams) landed inside the second round's route change
and stalled every stream behind it. So pilot also collects when it is quiet
(`collect_when_quiet`, from the memory release a second after the last write): the counters then
start each change at zero, and a change's own allocations (fewer than the threshold) no longer
trigger one. The threshold is left as it was: deferring collections further (200,000, tried)
let a connecting fleet's garbage fragment the heap, and steady RSS rose from ~275 to 371 MB.

`meshctl up` also picks the allocator before it starts anything (`choose_allocator`): jemalloc
where it is installed, else (or with ``MESHCTL_MALLOC=glibc``) glibc malloc;
`allocator_environment` says why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence


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


# Collections pilot runs when quiet: below this many net allocations since the last one, nothing
# (a second quiet moment right after the first costs nothing).
QUIET_MINIMUM = 10_000


def collect_when_quiet() -> int | None:
    """Collect garbage now, while no stream is being written to; returns the generation collected
    (the young and middle ones, all of them when the full one is due by the collector's own
    count), or None when too little was allocated since the last collection.

    Why: a collection in the middle of a fan-out stalls every stream behind it; done here, it
    resets the collector's counters, so the next push starts from zero. Cost: mostly what the
    collections it replaces would have cost (tens of milliseconds at mission scale for the young
    and middle ones, ~0.1-0.2 s for a full one), at a moment when nothing waits for it.
    """
    young, _, middles = gc.get_count()  # allocations; young collections; middle collections since a full one
    if young < QUIET_MINIMUM:
        return None
    generation = 2 if middles + 1 >= gc.get_threshold()[2] else 1
    gc.collect(generation)
    return generation


def release_when_quiet() -> bool:
    """What pilot does once its streams stop taking responses (`pilot.xds.server.AdsServer`, the
    pusher): collect garbage (`collect_when_quiet`), then hand free pages back to the OS
    (`release_free_memory`: after the collection, so the cycles it freed go back too)."""
    collect_when_quiet()
    return release_free_memory()


# jemalloc's settings unless MALLOC_CONF is set: a background thread returns pages that stayed
# free for about 10 s straight to the OS (no "muzzy" stage), and pilot purges at once a second
# after pushes stop (`release_free_memory`). A shorter decay (1 s, tried) handed back pages in the
# middle of a push that its next writes then faulted back in: SotW route p99 went to 1.5-1.7x
# the replay baseline's at mission scale, against 1.1-1.3x under glibc. One arena for every thread:
# at mission scale 283 MB steady against 286 with jemalloc's default (four per core), and no
# slower (thread caches serve most allocations without the arena's lock).
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:10000,muzzy_decay_ms:0,narenas:1"
# jemalloc's "all arenas" index for mallctl("arena.<i>.purge").
_ALL_ARENAS = 4096


def release_free_memory() -> bool:
    """Hand heap pages freed since the last call back to the OS now: jemalloc's purge of every
    arena where jemalloc is the allocator, else glibc's `malloc_trim`.

    Why: after a push, megabytes of responses and request buffers are freed, but the allocator
    keeps the pages, so RSS stays at the peak of the last load spike. Releasing a second after a
    push returns them (measured under glibc: about 50 MB of 140 MB per 1,000 streams; jemalloc's
    background thread would do it within its decay time anyway). Takes a few milliseconds; False
    where neither allocator is there.
    """
    process = ctypes.CDLL(None)
    mallctl = getattr(process, "mallctl", None)
    if mallctl is not None:
        mallctl(f"arena.{_ALL_ARENAS}.purge".encode(), None, None, None, 0)
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.malloc_trim(0)
    return True


# What ``MESHCTL_MALLOC`` may say.
ALLOCATORS = ("jemalloc", "glibc")


def allocator_environment(environ: Mapping[str, str], jemalloc: str | None) -> dict[str, str] | None:
    """The environment to re-execute `meshctl up` in, or None to run as it is; ValueError when
    ``MESHCTL_MALLOC`` names neither of `ALLOCATORS`.

    None when ``PYTHONMALLOC`` is set (the operator chose; ``pymalloc`` keeps Python's own
    allocator). Otherwise Python allocates every object with the C allocator
    (``PYTHONMALLOC=malloc``): jemalloc where its library `jemalloc` names is there, nothing else
    is preloaded and ``MESHCTL_MALLOC`` does not say ``glibc`` (``LD_PRELOAD`` gains it,
    ``MALLOC_CONF`` defaults to `JEMALLOC_CONF`), else glibc malloc with ``MALLOC_ARENA_MAX=2``.
    ``MESHCTL_MALLOC`` tells the re-executed process which one it got.

    Why not Python's allocator: it returns a 1 MiB arena to the OS only once every object in it is
    gone, and the few long-lived objects made while a large config was loaded pin many of them:
    with 12,000 routes loaded then removed, pilot kept 45% of the 170 MB it grew by (the limit its
    test sets is 20%). glibc kept 13%, jemalloc 4%.

    Why jemalloc before glibc (session 41): pilot's per-stream push step, the work every proxy
    costs on every change, took 44-64 us under glibc against 31-46 under Python's allocator and
    34-36 under jemalloc (`benchmarks.stream_fanout`, 2,000 streams, alternating runs); glibc's
    tunables (a larger tcache, fastbins) did not close it. At mission scale pilot's rounds after a
    fleet reconnected cost up to 60% more CPU under glibc and not under jemalloc. What it costs:
    ~4 KB more per connection, 5-6 MB at 2,000 proxies, within the mission targets (README,
    Benchmarks, sessions 41-42). gRPC's TCP read slices (a fixed 8 KiB plus a header) land in
    jemalloc's 10 KiB size class, where glibc rounds to 16 bytes; replaced on every read, they also
    leave some of those slabs half used after a change (~7 MB at mission scale). One arena
    (`JEMALLOC_CONF`): 3 MB less than jemalloc's default of four per core, at no cost in speed
    measured.

    Why two arenas for glibc: glibc gives every thread that allocates its own arena (gRPC's
    threads, the build thread), and small objects spread over them cost steady memory: at mission
    scale pilot held 323 MB with the default and 291 MB with two.
    """
    wanted = environ.get("MESHCTL_MALLOC")
    if wanted is not None and wanted not in ALLOCATORS:  # a typo would otherwise mean glibc, silently
        raise ValueError(f"MESHCTL_MALLOC={wanted!r}: expected one of {', '.join(ALLOCATORS)}")
    if "PYTHONMALLOC" in environ:
        return None
    env = {**environ, "PYTHONMALLOC": "malloc"}
    if jemalloc and environ.get("MESHCTL_MALLOC", "jemalloc") == "jemalloc" and not environ.get("LD_PRELOAD"):
        env.update(LD_PRELOAD=jemalloc, MALLOC_CONF=environ.get("MALLOC_CONF", JEMALLOC_CONF),
                   MESHCTL_MALLOC="jemalloc")
    else:
        env.update(MALLOC_ARENA_MAX=environ.get("MALLOC_ARENA_MAX", "2"), MESHCTL_MALLOC="glibc")
    return env


def find_jemalloc() -> str | None:
    """jemalloc's shared library as the dynamic linker finds it (e.g. Debian's ``libjemalloc2``)."""
    return ctypes.util.find_library("jemalloc")


def choose_allocator(argv: Sequence[str], environ: Mapping[str, str]) -> None:
    """Re-execute this process (same pid) as ``python <argv>`` under the allocator
    `allocator_environment` picks, unless it says to run as it is. Only a process entry point
    (`meshctl up`) calls this, before it starts anything."""
    env = allocator_environment(environ, find_jemalloc())
    if env is not None:
        os.execve(sys.executable, [sys.executable, *argv], env)


def forget_preload(environ: MutableMapping[str, str]) -> None:
    """Drop the ``LD_PRELOAD`` `allocator_environment` added from `environ` (``os.environ``) once
    the process runs under it, so programs pilot starts (Envoy has its own allocator) do not
    inherit jemalloc."""
    if environ.get("MESHCTL_MALLOC") == "jemalloc" and environ.get("LD_PRELOAD"):
        del environ["LD_PRELOAD"]


def allocator_in_use(environ: Mapping[str, str]) -> str:
    """Which allocator this process runs under: ``jemalloc`` (its ``mallctl`` is in the process),
    ``glibc`` (``PYTHONMALLOC=malloc`` without it) or ``pymalloc`` (Python's own, on top of glibc)."""
    if getattr(ctypes.CDLL(None), "mallctl", None) is not None:
        return "jemalloc"
    return "glibc" if environ.get("PYTHONMALLOC") == "malloc" else "pymalloc"
