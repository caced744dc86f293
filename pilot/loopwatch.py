"""A watchdog for pilot's event loop: a stall is logged once, with the stack of what holds the loop,
and counted (`pilot_event_loop_stalls_total`).

Why: everything pilot serves (xDS writes and ACKs, the CA's answers on the shared port, the debug
API) runs on one event loop, so a callback that holds it (a synchronous step too long, a blocking
call) stalls every proxy at once, and without this nothing in the log says what it was. Pilot's
own steps are meant to give the loop back within about 20 ms (publishing yields every slice); a
stall past `threshold` (1 s by default, `loop_stall_ms`) is a bug or a starved machine, and the
stack printed names which.

How: the loop beats every `interval` (a timer callback noting the time); a thread checks the beat
each `interval`, and when the last one is older than `threshold` it takes the loop thread's current
frame (`sys._current_frames`) and logs its stack, once per stall, then the stall's length once the
loop beats again. Cost: one timer callback per `interval` on the loop (10 a second at 100 ms, a few
µs each) and a thread waking as often; nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)


class LoopWatch:
    """Watches one event loop from a thread of its own: `start` on the loop, `stop` to end both."""

    def __init__(self, registry: CollectorRegistry, threshold: float = 1.0, interval: float = 0.1) -> None:
        self.threshold = threshold
        self.interval = interval
        self.stalls = Counter("pilot_event_loop_stalls", "times the event loop ran no callback for longer than "
                              "the stall threshold (each logged with the stack that held it)", registry=registry)
        self._beat = time.monotonic()
        self._loop_thread = 0
        self._timer: asyncio.TimerHandle | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        """Begin beating on the running loop and watching from a daemon thread."""
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopped.clear()
        self._beat = time.monotonic()
        self._timer = loop.call_later(self.interval, self._tick)
        self._thread = threading.Thread(target=self._watch, name="pilot-loop-watch", daemon=True)
        self._thread.start()

    @property
    def watching(self) -> bool:
        """Whether the watching thread runs (between `start` and `stop`)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Stop beating and end the thread (it wakes within `interval`)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 2 * self.interval))
            self._thread = None

    def _tick(self) -> None:
        self._beat = time.monotonic()
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def _watch(self) -> None:
        stalled_since = 0.0  # the beat a reported stall began after; 0.0 while the loop runs
        while not self._stopped.wait(self.interval):
            beat = self._beat
            late = time.monotonic() - beat
            if late >= self.threshold and stalled_since != beat:
                stalled_since = beat
                self.stalls.inc()
                frame = sys._current_frames().get(self._loop_thread)
                stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
                log.warning("event loop stalled: no callback ran for %.1f s; what holds it now:\n%s", late,
                            stack.rstrip())
            elif stalled_since and beat != stalled_since:
                log.warning("event loop ran again after a stall of %.1f s", beat - stalled_since)
                stalled_since = 0.0
