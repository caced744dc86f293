"""The send timeout of every ADS stream, kept by one timer instead of one per write.

Why: a push at mission scale is 2,000 writes; a timer per write (`asyncio.timeout`) costs a
timer object, a heap push and a cancellation each, on the event loop that does the writing.
Here a write costs two dictionary operations, and one check per `tick` (a quarter of the
timeout, at most a second) looks at the writes in flight while there are any.

Semantics: a write that has not completed `timeout` seconds after it began is cancelled at the
next tick, so within `timeout + tick`; the writer then sees `expired()` and closes its stream
(`abort_stuck`). Everything runs on the event loop.
"""

from __future__ import annotations

import asyncio
import time

import grpc

CLOSE_SETTLE = 0.1  # seconds for gRPC to notice a closed connection (see `abort_stuck`)


class SendTimeoutError(Exception):
    """The proxy did not take a response within the send timeout; its stream is closed."""


class SendWatch:
    """Writes in flight (writer task -> monotonic deadline) and a timer looking at them."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.tick = min(1.0, timeout / 4)
        self.writing: dict[asyncio.Task[object], float] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, task: asyncio.Task[object]) -> None:
        """`task` starts a write now."""
        self.writing[task] = time.monotonic() + self.timeout
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.tick, self._check)

    def end(self, task: asyncio.Task[object]) -> None:
        """`task`'s write completed or failed."""
        self.writing.pop(task, None)

    def expired(self, task: asyncio.Task[object]) -> bool:
        """Whether `task` was cancelled by this watch (its write timed out); takes the
        cancellation back, so the writer can close its stream instead of being cancelled."""
        if task not in self._expired:
            return False
        self._expired.discard(task)
        task.uncancel()
        return True

    def _check(self) -> None:
        now = time.monotonic()
        late = [task for task, deadline in self.writing.items() if deadline <= now]
        for task in late:
            del self.writing[task]
            self._expired.add(task)
            task.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.tick, self._check) if self.writing else None

    def close(self) -> None:
        """Stop the timer (the server stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def abort_stuck(context: grpc.aio.ServicerContext, reason: str) -> None:
    """End a call whose last response is stuck: DEADLINE_EXCEEDED, queued behind that response.

    The status waits in gRPC until the proxy reads the response (then it learns why and
    reconnects) or the connection ends. If the connection ends first, the status cannot be
    sent; gRPC ends such a call quietly once it has seen the client go, so wait for that.
    """
    try:
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"pilot closed the stream: {reason}")
    except grpc.aio.InternalError:
        await asyncio.sleep(CLOSE_SETTLE)  # let gRPC record the closed connection first
        raise
