"""gRPC's completion wake-ups drained in full, so a burst of completions reaches the event loop at once.

Why: grpcio's asyncio API hands each completion (a write done, a request read) to the event loop
through a queue and a socket pair: its poller thread queues the completion and writes one byte;
the loop's reader callback (`PollerCompletionQueue._handle_events`) reads one byte and takes every
queued completion. So a burst leaves its bytes unread, one per completion already taken. A 1-byte
write costs a Unix socket hundreds of bytes of buffer, so a few hundred unread bytes fill it; the
poller thread then blocks on its next write, and until the loop has read most of them back, one
byte per loop turn, no completion reaches Python at all. At mission scale a SotW fan-out (2,000
writes, then 2,000 EDS ACKs of 148 KB) ran into this: no write completion and no ACK reached
pilot until the last write had started, while gRPC held the ACKs it had read (266 MB of read
buffers at the heap's peak, session 33, benchmarks/README).

`drain_wakeups` wraps that reader: on each wake-up it counts the pending bytes (`FIONREAD`), runs
gRPC's own callback, which reads one and takes the queue, and then reads the rest of those it
counted. No completion is lost: a byte is written only after its completion was queued, so every
byte counted stands for a completion the callback took; bytes written since stay for the next
wake-up. When the callback raises (a completion for an event loop already closed, as in a test
process that runs many loops), nothing more is read, so the bytes left wake the loop again and
the rest of the queue is taken as gRPC alone would. Cost: one ioctl and at most one read per
wake-up.

It reaches into grpcio (its reader is a partial of `PollerCompletionQueue._handle_events`) and
asyncio (the selector's registered handle). Where either has another shape it finds nothing,
says so in the log, and gRPC runs as it does by itself.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import os
import termios
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

GRPC_READER = "_handle_events"  # PollerCompletionQueue's reader callback in grpcio's asyncio API


def drain_wakeups(loop: asyncio.AbstractEventLoop) -> bool:
    """Wrap gRPC's completion wake-up reader on `loop` (see the module docstring); True if it is
    wrapped now or was already, False if this loop has no such reader (gRPC's asyncio server not
    started on it, or another grpcio or event loop implementation)."""
    selector = getattr(loop, "_selector", None)
    if selector is None:
        log.info("gRPC wake-ups not drained: the event loop has no selector to look in")
        return False
    for key in list(selector.get_map().values()):
        handle = key.data[0] if isinstance(key.data, tuple) else None
        if handle is None:
            continue
        callback = handle._callback
        if getattr(callback, "draining", False):
            return True
        if getattr(getattr(callback, "func", None), "__name__", "") != GRPC_READER:
            continue
        wrapped = _draining(key.fd, callback, tuple(handle._args))
        loop.remove_reader(key.fd)
        loop.add_reader(key.fd, wrapped)
        return True
    log.info("gRPC wake-ups not drained: no %s reader on the event loop", GRPC_READER)
    return False


def _draining(fd: int, callback: Callable[..., Any], args: tuple[Any, ...]) -> Callable[[], None]:
    pending = array.array("i", [0])  # FIONREAD's answer, reused: the loop calls this one at a time

    def on_wakeup() -> None:
        fcntl.ioctl(fd, termios.FIONREAD, pending)
        callback(*args)
        if pending[0] > 1:
            os.read(fd, pending[0] - 1)

    on_wakeup.draining = True  # type: ignore[attr-defined]
    return on_wakeup
