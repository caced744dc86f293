"""The wake-up drain's contract, on a real socket pair: what `pilot.xds.wakeups` leaves unread.

gRPC's reader is stood in for by a function of the same name and shape (a partial of
`_handle_events` registered as the loop's reader): like grpcio's, each call reads one byte and
takes the completions queued so far. Over real gRPC (`test_grpc_wakeups`) that callback never
raises in a test, but grpcio's does when a completion belongs to an event loop already closed;
the bytes the drain counted must then stay, so the loop is woken again for the rest of the queue
(reading them first, as the drain once did, left the rest of gRPC's queue waiting for good).
"""

from __future__ import annotations

import asyncio
import functools
import socket
from typing import Any

import pytest

from pilot.xds.wakeups import drain_wakeups


class _Queue:
    """A completion queue like grpcio's: a completion is queued, then its byte written."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.queued = 0
        self.taken: list[int] = []  # completions taken per call of the reader
        self.fail_next = False

    def complete(self, count: int = 1) -> None:
        for _ in range(count):
            self.queued += 1
            self.writer.send(b"\0")

    def pending_bytes(self) -> int:
        try:
            return len(self.reader.recv(4096, socket.MSG_PEEK))
        except BlockingIOError:
            return 0


def _handle_events(queue: _Queue, during: Any = None) -> None:
    """Reads one byte and takes every queued completion; raises once when told to (after taking
    nothing, as grpcio's reader raises on its first completion of a closed loop)."""
    queue.reader.recv(1)
    if queue.fail_next:
        queue.fail_next = False
        raise RuntimeError("a completion for an event loop already closed")
    queue.taken.append(queue.queued)
    queue.queued = 0
    if during is not None:
        during()


async def _until(condition: Any) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the loop never got there")


@pytest.mark.timeout(20)
async def test_one_wake_up_takes_a_burst_and_reads_only_the_bytes_it_counted() -> None:
    loop = asyncio.get_running_loop()
    queue = _Queue()
    once = [True]

    def one_more() -> None:  # a completion queued while gRPC's reader runs: its byte must stay
        if once[0]:
            once[0] = False
            queue.complete()

    loop.add_reader(queue.reader.fileno(), functools.partial(_handle_events, queue, one_more))
    try:
        assert drain_wakeups(loop)
        # A burst while the loop is elsewhere (100 bytes: a few hundred fill a Unix socket pair).
        queue.complete(100)
        await _until(lambda: queue.taken)
        assert queue.taken[0] == 100  # one call took them all
        # The completion queued during that call kept its byte, so the loop was woken once more.
        await _until(lambda: len(queue.taken) >= 2)
        assert queue.taken == [100, 1]
        await asyncio.sleep(0.05)
        assert queue.taken == [100, 1] and queue.pending_bytes() == 0
    finally:
        loop.remove_reader(queue.reader.fileno())
        queue.reader.close()
        queue.writer.close()


@pytest.mark.timeout(20)
async def test_when_grpcs_reader_raises_the_counted_bytes_stay_and_wake_the_loop_again() -> None:
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(str(context.get("exception"))))
    queue = _Queue()
    loop.add_reader(queue.reader.fileno(), functools.partial(_handle_events, queue))
    try:
        assert drain_wakeups(loop)
        queue.fail_next = True
        queue.complete(50)
        await _until(lambda: queue.taken)
        assert errors == ["a completion for an event loop already closed"]
        assert queue.taken == [50]  # the next wake-up came from the bytes left, and took the queue
        await asyncio.sleep(0.05)
        assert queue.pending_bytes() == 0  # and then read what it had counted
    finally:
        loop.set_exception_handler(None)
        loop.remove_reader(queue.reader.fileno())
        queue.reader.close()
        queue.writer.close()
