"""Work that waits until pilot is quiet: no push, no response written, no stream ended for a while.

Why: a push is published long before its writes end (at mission scale 2,000 streams write a route
change for about a second after the last class is published), and gRPC frees a stream's buffers
only as its call ends. Handing memory back to the OS, dropping the responses kept for sharing or
collecting garbage in the middle of that would trim pages the rest of the fan-out faults straight
back in, make the streams still due encode their own copies, or stall every stream behind a
collection. So the pusher and the ADS server report what they do here (`touch`), and the actions
(the pusher's release: `pilot.push.Pusher`) run once nothing was reported for `delay` seconds.

One object per pilot, shared by the pusher and the ADS server (`pilot.app`), so a release waits for
both. Cost: a counter increment per report, and one timer a second while reports keep coming;
nothing while pilot is idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class WhenQuiet:
    """Runs its actions once, `delay` seconds after the last `touch` of a burst of them."""

    def __init__(self, delay: float = 1.0) -> None:
        self.delay = delay
        self._actions: list[Callable[[], object]] = []
        self._events = 0  # touches so far
        self._seen = 0  # touches when the timer was last set
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def on_quiet(self, action: Callable[[], object]) -> None:
        """Run `action` whenever a burst of activity has settled (actions run in the order added)."""
        self._actions.append(action)

    def touch(self, events: int = 1) -> None:
        """Something happened (`events` of it: responses written, a call ended, a push): the actions
        wait until `delay` passes without another touch. Outside a running event loop (a
        synchronous caller, nothing to wait for) and after `close`, nothing is armed."""
        self._events += events
        if self._timer is not None or self._closed or not self._actions:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._seen = self._events
        self._timer = loop.call_later(self.delay, self._fire)

    def busy(self) -> bool:
        """Whether a burst is in progress: something was reported and the actions have not run
        since (what background chores, such as the file source's safety sweep, wait out)."""
        return self._timer is not None

    def close(self) -> None:
        """Cancel the pending run; later touches arm nothing (the server is stopping)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        """One timer for the whole burst: while touches came since it was set, it is set again
        (rather than a timer per touch: a fan-out touches 2,000 times a second)."""
        self._timer = None
        if self._events != self._seen:
            self._seen = self._events
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._fire)
            return
        for action in self._actions:
            action()
