"""The snapshot cache: proxy class -> latest consistent Snapshot, with change notification.

Concurrency: everything runs on one event loop. The pusher is the only writer (`set`);
ADS streams are readers woken by a callback they register with `watch`, so nothing polls.
`watch` also tells the pusher which classes are in demand, so it can generate a snapshot for
a class the moment its first proxy connects.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from pilot.model.proxy import ProxyClass
from pilot.xds.resources import View
from pilot.xds.snapshot import InconsistentSnapshotError, Snapshot

DemandListener = Callable[[ProxyClass], None]


class SnapshotCache:
    """Holds one snapshot per proxy class; refuses inconsistent ones."""

    def __init__(self) -> None:
        self._snapshots: dict[ProxyClass, Snapshot] = {}
        self._watchers: Counter[ProxyClass] = Counter()
        self._demand_listeners: list[DemandListener] = []
        self._idle_listeners: list[DemandListener] = []
        self._wakers: dict[ProxyClass, set[Callable[[], None]]] = {}
        # Each class as the one object every table keys it by (`canonical`), while it has a
        # snapshot or a watcher.
        self._canonical: dict[ProxyClass, ProxyClass] = {}
        # Views on which streams keep shared encoded responses (the ADS server's sessions add them,
        # `pilot.xds.session.Subscriptions`), so forgetting those costs O(such views), not O(classes).
        self.sharing: weakref.WeakSet[View] = weakref.WeakSet()

    def set(self, key: ProxyClass, snapshot: Snapshot) -> bool:
        """Publish a snapshot after checking it; wakes every stream of that class. Returns whether
        it was published: False when the class holds the same content already (no push).

        Raises InconsistentSnapshotError and keeps the previous snapshot if the new one
        refers to resources it does not contain.
        """
        previous = self._snapshots.get(key)
        errors = snapshot.consistency_errors(previous)  # what `previous` shares passed already
        if errors:
            raise InconsistentSnapshotError(key, errors)
        if previous is not None and previous.same_content(snapshot):
            return False  # identical content: no push
        if previous is None:
            key = self._canonical.setdefault(key, key)
        self._snapshots[key] = snapshot
        for wake in self._wakers.get(key, ()):
            wake()
        return True

    def get(self, key: ProxyClass) -> Snapshot | None:
        return self._snapshots.get(key)

    def canonical(self, key: ProxyClass) -> ProxyClass:
        """The object this cache keys `key`'s class by (`key` itself if the class has neither a
        snapshot nor a watcher here; `watch` makes it the one).

        Why: a dictionary lookup with an equal key that is another object runs the dataclass's
        `__eq__` (a Python call comparing seven fields) after the hash matches; with the stored
        object it stops at the identity check. Each stream classifies its Node into a new object,
        and a proxy reconnecting before its class was let go would otherwise pay that on every
        push, here and in the pusher's tables (13-22 py-spy samples of a pilot-only route change
        after a fleet reconnected). Streams look up by the canonical object (`ClassWatch`).
        """
        return self._canonical.get(key, key)

    def keys(self) -> list[ProxyClass]:
        """Classes that have a snapshot."""
        return list(self._snapshots)

    def watched(self) -> list[ProxyClass]:
        """Classes with at least one connected stream."""
        return [k for k, n in self._watchers.items() if n > 0]

    def on_demand(self, listener: DemandListener) -> None:
        """Call `listener(key)` whenever a class gains its first watching stream."""
        self._demand_listeners.append(listener)

    def on_idle(self, listener: DemandListener) -> None:
        """Call `listener(key)` whenever a class loses its last watching stream (its snapshot
        can then go: see `drop_unwatched`)."""
        self._idle_listeners.append(listener)

    @contextlib.contextmanager
    def watch(self, key: ProxyClass, wake: Callable[[], None] | None = None) -> Iterator[None]:
        """Mark a class as in demand for the duration of a stream; `wake()` runs on each new snapshot.

        A callback is cheaper than a waiting task per stream when a push wakes thousands of them.
        """
        key = self._canonical.setdefault(key, key)
        if wake is not None:
            self._wakers.setdefault(key, set()).add(wake)
        self._watchers[key] += 1
        if self._watchers[key] == 1:
            for listener in self._demand_listeners:
                listener(key)
        try:
            yield
        finally:
            self._watchers[key] -= 1
            if self._watchers[key] <= 0:
                del self._watchers[key]
                if key not in self._snapshots:
                    self._canonical.pop(key, None)
                for listener in self._idle_listeners:
                    listener(key)
            if wake is not None:
                self._wakers[key].discard(wake)
                if not self._wakers[key]:
                    del self._wakers[key]

    def drop_unwatched(self) -> list[ProxyClass]:
        """Forget snapshots of classes no stream watches any more; returns those classes (what
        callers keep per class can go with them)."""
        gone = [k for k in self._snapshots if self._watchers[k] <= 0]
        for key in gone:
            del self._snapshots[key]
            self._canonical.pop(key, None)
        return gone

    def forget_responses(self) -> int:
        """Drop the encoded responses shared on views (see `sharing`); returns how many.

        They only save work while a push fans out; kept afterwards, a class's own view would hold
        a copy of its (possibly megabyte) response for as long as the snapshot lives. Only the
        views streams registered are visited: walking every class's snapshot took 7-37 ms of the
        event loop per push at mission scale (2,000 classes).
        """
        dropped = 0
        for view in list(self.sharing):
            dropped += len(view.responses)
            view.responses.clear()
        self.sharing.clear()
        return dropped


class ClassWatch:
    """A stream's `SnapshotCache.watch` that can move to another class (`move`), for a proxy whose
    class changes while it is connected (its Pod relabelled). Enter it as the watch itself."""

    def __init__(self, cache: SnapshotCache, key: ProxyClass, wake: Callable[[], None]) -> None:
        self.cache, self.key, self.wake = cache, cache.canonical(key), wake
        self._held: AbstractContextManager[None] | None = None

    def __enter__(self) -> ClassWatch:
        self._held = self._watch(self.key)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._held is not None:
            self._held.__exit__(None, None, None)
            self._held = None

    def move(self, key: ProxyClass) -> None:
        """Watch `key` instead: the new class first (so it is published on demand and never left
        without a watcher in between), then the old one goes."""
        if key == self.key:
            return
        key = self.cache.canonical(key)
        held = self._watch(key)
        self.__exit__()
        self.key, self._held = key, held

    def _watch(self, key: ProxyClass) -> AbstractContextManager[None]:
        watching = self.cache.watch(key, self.wake)
        watching.__enter__()
        return watching
