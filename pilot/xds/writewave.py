"""The writes pilot has in flight on all ADS streams, so that ACKs wait for a push's writes to end.

Why: at mission scale one push writes to 2,000 streams from one event loop, on cores it shares
with gRPC's own threads (which move the bytes to the sockets) and, on a small machine, with the
proxies themselves. Each proxy ACKs as soon as it has its response, and applying an ACK (gRPC's
read, a task switch, the session's bookkeeping, the next read) is CPU that the rest of the
fan-out then waits behind, although nothing waits for the ACK itself. So after a request that
needs no answer, a stream's reader does not read its next request while a wave of writes is in
flight (`hold`); it reads on when the wave ends, and the ACKs that came meanwhile are applied
then, in a burst.

Delta streams only (`pilot.xds.server`): held SotW ACKs made pilot's CPU per route change at
1,000 proxies about 25% higher (0.23-0.28 s against 0.15-0.24 in three alternating pairs), and
at mission scale SotW did not gain.

Bounded: a wave that lasts longer than `patience` (a proxy that does not read, endpoints that
keep changing) stops holding readers: they read as before until the writes in flight drain once.
A request that calls for a response is never held back itself, but the request after a plain
ACK (a NACK, a new subscription) may wait for the rest of a wave, `patience` at most.

Measured at mission scale (`benchmarks.ads_load`, 2,000 delta proxies, alternating runs with
`ACK_HOLD_MS=0`): pilot's CPU per route change 0.78 s against 0.85 s over seven runs each, p99s
2-8% lower, endpoint changes and SotW within their noise (`benchmarks/SESSIONS.md`, session 27). Cost:
two integer updates per write (SotW's too: a delta reader waits for every write), at most one
timer firing per `patience` (`WriteWave`), and per held reader one `asyncio.Event` wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, Metric

DEFAULT_PATIENCE = 1.0  # seconds a wave of writes may hold readers


class WriteWave:
    """Writes in flight server-wide (`begin`/`end` around each), and readers held until they end.

    The patience is kept by one timer that outlives waves: it is armed when a wave begins and
    none is pending, and when it fires it releases the wave in flight if that wave is old enough,
    else re-arms itself for the wave's own deadline (or stops when no wave is in flight). Why:
    when a push's writes do not overlap (each completes before the next begins: a fast proxy,
    a small response), every write is a wave of its own, and a timer made and cancelled per
    wave was a `TimerHandle`, a heap push and a cancellation per write.
    """

    def __init__(self, patience: float = DEFAULT_PATIENCE) -> None:
        self.patience = patience
        self.in_flight = 0
        self.holds = 0  # readers held back so far
        self.released = 0  # waves that outlasted `patience`
        self._open: asyncio.Event | None = None  # set: readers read; made on the loop, lazily
        self._began = 0.0  # loop time the wave in flight began
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = 0.0  # loop time the timer fires at
        self._closed = False

    @property
    def holding(self) -> bool:
        """Whether a reader that has just applied a plain ACK should wait (`hold`) before reading on."""
        return self._open is not None and not self._open.is_set()

    def begin(self) -> None:
        """A write starts. The first of a wave closes the gate for `patience` at most."""
        self.in_flight += 1
        if self.in_flight == 1 and not self._closed:
            if self._open is None:
                self._open = asyncio.Event()
            self._open.clear()
            loop = asyncio.get_running_loop()
            self._began = loop.time()
            if self._timer is None:
                self._arm(loop, self._began + self.patience)

    def end(self) -> None:
        """A write completed, failed or was cancelled. The last of a wave opens the gate (the timer
        stays armed for the next wave; it stops by itself when it finds none)."""
        self.in_flight -= 1
        if self.in_flight == 0 and self._open is not None:
            self._open.set()

    async def hold(self) -> None:
        """Wait until the writes in flight end, or the wave has lasted `patience`."""
        if self._open is None or self._open.is_set():
            return
        self.holds += 1
        await self._open.wait()

    def close(self) -> None:
        """Open the gate for good and stop the timer (the server stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._closed = True
        if self._open is not None:
            self._open.set()

    def metric_families(self) -> Iterator[Metric]:
        """`pilot_xds_ack_holds_total` and `pilot_xds_write_waves_outlasted_total`, made when scraped
        (`pilot.metrics.ScrapeTime`)."""
        yield CounterMetricFamily("pilot_xds_ack_holds", "times a stream waited for pilot's writes in flight to "
                                  "end before reading its next request (after a plain ACK)", value=self.holds)
        yield CounterMetricFamily("pilot_xds_write_waves_outlasted", "waves of writes that lasted longer than the "
                                  "ACK hold's patience, so readers read on before they ended", value=self.released)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._armed_for = when
        self._timer = loop.call_at(when, self._outlasted)

    def _outlasted(self) -> None:
        self._timer = None
        if self._open is None or self._open.is_set():
            return  # no wave holds anyone: the next wave arms the timer again
        deadline = self._began + self.patience
        if deadline > self._armed_for:  # a later wave than the one this timer was armed for
            self._arm(asyncio.get_running_loop(), deadline)
            return
        self.released += 1
        self._open.set()  # until the writes drain: the next wave closes it again
