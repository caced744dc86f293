"""How many bytes of connecting proxies' large first responses gRPC may hold at once.

Why: gRPC copies every response a stream writes and keeps the copy until the proxy has taken it
(a stream's writer waits for that, so each stream has at most one). A proxy's first config is its
largest (at mission scale a 0.9 MB cluster set, 0.47 MB of endpoints, a 0.57 MB route
configuration), and a fleet connecting at once (pilot restarted, a node pool scaled up) asks for
all of it together, faster than the proxies read it when they share the cores: with the simulated
Envoys on one core and pilot on the other (`ads_load --pin`), 2,000 delta proxies connecting
peaked at 562-673 MB in six runs (190,000-304,000 page faults in pilot where recorded), against
461-515 MB with a 64 MB budget in seven (90,000-165,000 faults; session 26). When the proxies keep
up (the unpinned mission run) the budget changes nothing measurable: peaks 364-419 MB and route
p99 1.0-1.2 s either way (two runs of two rounds each).

Only a stream's first response of each type waits for it: pushes to proxies already connected
never do, so a flood of new proxies cannot hold up what connected ones are sent (Istio bounds
concurrent pushes instead, `PILOT_PUSH_THROTTLE`: 25 on two cores; pilot counts bytes, since
responses range from a few hundred bytes to a megabyte).

The budget is 32 MB since session 29 (64 MB before): with simulated Envoys that read as fast as
Envoy, ten mission-scale connects with each (alternating, 13:36-14:04 UTC) peaked at 395-492 MB,
445 MB on average, against 423-510 MB, 468 on average, in the same time to connect. gRPC's copy
of a class's own response (its clusters) is not the only one while it is written: the stream's
writer holds the encoded bytes too, so such a counted byte costs about two.

Pushes have no budget: one of their own (128 MB, tried in session 29 with simulated Envoys that
read as fast as Envoy) left a mission-scale route change's peak RSS where it was (388-434 MB
against 389-470 without) and cost 0.06 s of CPU and 80 ms of p99 per change, the price of 2,000
writes taking turns.

What it costs: a response under `small` passes without being counted. A large first response is
counted while gRPC holds it; when the budget is spent, its stream waits its turn (first come,
first served). A stream waiting for the budget is not writing, so its send timeout has not
started.

Stuck proxies: a proxy that stops reading holds its share until its send timeout closes the
stream. So that a few dozen of them (a hostile client opening many streams on the plaintext port)
cannot hold up every other connecting proxy for that long, a waiting stream writes anyway, over
budget, once the budget has given nothing back for `patience` seconds (and it has waited that
long itself), and is counted as such (`overdrawn`). Memory is then bounded as without a budget;
nothing is ever refused. While writes keep completing, a stream waits its turn however long the
queue: until session 29 each stream's patience ran from its own arrival, and a fleet of 2,000
proxies connecting at once (a queue of several seconds at ~1 GB/s) overdrew by the hundreds
(1,247 of 5,920 waits in one mission-scale connect, 254 MB counted instead of 64, a 701 MB peak).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

DEFAULT_LIMIT = 32 * 1024 * 1024
DEFAULT_SMALL = 64 * 1024
DEFAULT_PATIENCE = 2.0


@dataclass
class _Waiter:
    size: int
    future: asyncio.Future[None]
    came: float  # monotonic time it started waiting


@dataclass
class WriteBudget:
    """Bytes of large responses handed to gRPC and not yet taken (see the module docstring).

    `limit` bytes at once (one response larger than it still goes alone); responses under `small`
    bytes are not counted; a stream waits its turn until the budget has given nothing back for
    `patience` seconds.
    """

    limit: int = DEFAULT_LIMIT
    small: int = DEFAULT_SMALL
    patience: float = DEFAULT_PATIENCE
    in_flight: int = 0  # bytes counted now
    waits: int = 0  # writes that had to wait for their turn, ever
    overdrawn: int = 0  # writes that went over budget once it had stalled for `patience`, ever
    progress_at: float = 0.0  # monotonic time bytes were last given back
    _waiting: collections.deque[_Waiter] = field(default_factory=collections.deque)
    # One timer for all waiters: when it fires, those that waited `patience` go over budget if the
    # budget stalled that long too; then it is armed for the next waiter's earliest moment.
    _watchdog: asyncio.TimerHandle | None = None

    def take_now(self, size: int) -> int | None:
        """The bytes to give back after the write (0: not counted), or None if the stream must
        wait (`take`)."""
        if size < self.small:
            return 0
        if not self._waiting and (not self.in_flight or self.in_flight + size <= self.limit):
            self.in_flight += size
            return size
        return None

    async def take(self, size: int) -> int:
        """Wait for `size` bytes of the budget (after everyone waiting before); the bytes to give
        back. Taken over budget once neither this stream's wait nor the budget's last progress
        (bytes given back) is younger than `patience`: the writes holding it are stuck.

        Cost: a future per waiting write; the patience is one timer for the whole queue (a timer
        per waiter, `wait_for` and a shield, was ~10% of pilot's event loop when 2,000 writes took
        turns in a mission-scale route change, under the push budget that was tried)."""
        taken = self.take_now(size)
        if taken is not None:
            return taken
        loop = asyncio.get_running_loop()
        waiter = _Waiter(size, loop.create_future(), time.monotonic())
        self._waiting.append(waiter)
        self.waits += 1
        if self._watchdog is None:
            self._arm(loop)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():  # granted, then cancelled
                self.give_back(size)
            else:
                waiter.future.cancel()
                self._grant()
            raise
        return size

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Arm the watchdog for the moment the first waiter may go over budget (none: unarmed)."""
        head = next((w for w in self._waiting if not w.future.done()), None)
        if head is None:
            self._watchdog = None
            return
        at = max(head.came, self.progress_at) + self.patience
        self._watchdog = loop.call_later(max(0.0, at - time.monotonic()), self._stalled, loop)

    def _stalled(self, loop: asyncio.AbstractEventLoop) -> None:
        """The watchdog: if nothing was given back for `patience`, every waiter that has waited
        that long goes, in order, over budget; then it is armed again."""
        now = time.monotonic()
        waiting = self._waiting
        if now >= self.progress_at + self.patience:
            while waiting and (waiting[0].future.done() or waiting[0].came + self.patience <= now):
                waiter = waiting.popleft()
                if waiter.future.done():  # gave up (cancelled)
                    continue
                self.overdrawn += 1
                self.in_flight += waiter.size
                waiter.future.set_result(None)
        self._arm(loop)

    def give_back(self, taken: int) -> None:
        """The write that took `taken` bytes ended (written, failed or timed out)."""
        if taken:
            self.in_flight -= taken
            self.progress_at = time.monotonic()
            self._grant()

    def metric_families(self) -> Iterator[Metric]:
        """`pilot_xds_write_budget_bytes` (counted now), `pilot_xds_write_budget_waits_total` and
        `pilot_xds_write_budget_overdrawn_total`, made when scraped (`pilot.metrics.ScrapeTime`):
        nothing is updated per write."""
        yield GaugeMetricFamily("pilot_xds_write_budget_bytes",
                                "bytes of large xDS responses gRPC holds for proxies now", value=self.in_flight)
        yield CounterMetricFamily("pilot_xds_write_budget_waits",
                                  "large xDS responses that waited for the write budget", value=self.waits)
        yield CounterMetricFamily("pilot_xds_write_budget_overdrawn",
                                  "large xDS responses written over budget once it stalled for its patience",
                                  value=self.overdrawn)

    def _grant(self) -> None:
        """Let waiting streams go, in order, while the budget has room."""
        waiting = self._waiting
        while waiting:
            head = waiting[0]
            if head.future.done():  # gave up (cancelled, or past its patience)
                waiting.popleft()
                continue
            if self.in_flight and self.in_flight + head.size > self.limit:
                return
            waiting.popleft()
            self.in_flight += head.size
            head.future.set_result(None)
