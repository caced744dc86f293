"""The ConfigStore: every valid API object from every source, keyed by (kind, namespace, name).

Concurrency: one event loop. Sources call the synchronous writers (`apply`, `delete`,
`replace_source`) on the loop thread; consumers `await wait_for_change(rev)`, which wakes on
an `asyncio.Event` swapped at every revision, so nothing polls. A write that changes no
object does not bump the revision, so re-reading unchanged files causes no push.

Two sources may define the same key; the source with the smallest id wins, deterministically,
and the loser is listed under ``shadowed`` on the debug page instead of vanishing.

Bad input never costs good config: when a source reports a rejected document that names an
object (kind, namespace, name) it held a valid version of, the store keeps serving that last
good version and marks the rejection "serving the previous version" (Istio's validating webhook
gives the same result on Kubernetes: an invalid update is refused, the stored object stays).
The cost is a dictionary lookup per rejected document.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

from pilot.api import ApiObject
from pilot.config.documents import DocumentError

Key = tuple[str, str, str]  # (kind, namespace, name)
DEFAULT_SOURCE = "api"
SERVING_PREVIOUS = "serving the previous version"
# How many removals the store remembers (about 100 bytes each) for `meshctl wait --for=delete`.
REMOVALS_KEPT = 10_000


class ConfigStore:
    """Typed objects with a monotonically increasing revision and change notification."""

    def __init__(self) -> None:
        self._by_source: dict[str, dict[Key, ApiObject]] = {}
        self._errors: dict[str, tuple[DocumentError, ...]] = {}
        # source -> keys served from their last good version, with the error that rejected the new one
        self._previous: dict[str, dict[Key, DocumentError]] = {}
        self._effective: dict[Key, tuple[str, ApiObject]] = {}
        self._revision = 0
        self._changed = asyncio.Event()
        # (revision, kinds it changed), newest last; lets the pusher take the endpoint fast path.
        self._kind_log: collections.deque[tuple[int, frozenset[str]]] = collections.deque(maxlen=256)
        self._sorted_keys: list[Key] | None = None  # every effective key, sorted; None once a key came or went
        # The effective objects in `_sorted_keys` order and each key's position there, kept while no
        # key comes or goes: an edit replaces its object in place.
        self._ordered: list[ApiObject] | None = None
        self._position: dict[Key, int] = {}
        # key -> (revision, wall time) at which its current effective content arrived; one entry per
        # object, written only when it changes (`/debug/config_distribution`, `meshctl wait`).
        self._arrived: dict[Key, tuple[int, float]] = {}
        # key -> (revision, wall time) at which it was removed, for `meshctl wait --for=delete`; the
        # newest REMOVALS_KEPT only (a dict keeps insertion order), dropped when the key comes back.
        self._removed: dict[Key, tuple[int, float]] = {}

    @property
    def revision(self) -> int:
        """Bumped once per write that changed the effective set of objects."""
        return self._revision

    def get(self, kind: str, namespace: str, name: str) -> ApiObject | None:
        found = self._effective.get((kind, namespace, name))
        return found[1] if found else None

    def objects(self, kind: str | None = None) -> list[ApiObject]:
        """Effective objects sorted by key (optionally of one kind).

        Every push asks for all of them. Sorting ~9,000 keys (1,000 services) costs ~15-20 ms,
        and a pass of lookups over them a few more, so the sorted list is kept while no key comes
        or goes, and an edit (the usual change) replaces its object in it: a push then costs a
        copy of the list (~0.1 ms).
        """
        if self._ordered is None:
            if self._sorted_keys is None:
                self._sorted_keys = sorted(self._effective)
            effective = self._effective
            self._ordered = [effective[key][1] for key in self._sorted_keys]
            self._position = {key: i for i, key in enumerate(self._sorted_keys)}
        if kind is None:
            return list(self._ordered)
        # Keys sort by kind first, so one kind's objects are one run of the list: two bisections
        # instead of a pass over ~9,000 keys (two callers ask on every push: 4 ms of the loop).
        keys = self._sorted_keys if self._sorted_keys is not None else sorted(self._effective)
        start = bisect.bisect_left(keys, (kind,))
        return self._ordered[start:bisect.bisect_left(keys, (kind + "\x00",), start)]

    def apply(self, obj: ApiObject, source_id: str = DEFAULT_SOURCE) -> bool:
        """Add or replace one object; True if the effective config changed."""
        self._by_source.setdefault(source_id, {})[obj.key] = obj
        return self._settle([obj.key])

    def delete(self, kind: str, namespace: str, name: str, source_id: str = DEFAULT_SOURCE) -> bool:
        """Remove one object of a source; True if the effective config changed."""
        key = (kind, namespace, name)
        if self._by_source.get(source_id, {}).pop(key, None) is None:
            return False
        return self._settle([key])

    def replace_source(
        self, source_id: str, objects: Iterable[ApiObject] | Mapping[Key, ApiObject],
        errors: Sequence[DocumentError] = (), changed: Collection[Key] | None = None,
    ) -> bool:
        """Make ``objects`` the whole content of a source (and ``errors`` its rejections).

        ``objects`` may come keyed already (key -> object). Objects the source no longer has
        are deleted, except those an error in ``errors`` names: their last good version keeps
        serving (see `serving_previous`). ``changed``, when the source knows it, names every key
        whose object may differ from its previous call (all others are the very same instances):
        only those are compared, so one edited file of 1,000 costs its own objects. True if the
        effective config changed.
        """
        new = dict(objects) if isinstance(objects, Mapping) else {obj.key: obj for obj in objects}
        old = self._by_source.get(source_id, {})
        previous: dict[Key, DocumentError] = {}
        for err in errors:
            key = err.key
            if key is not None and key not in new and key in old:
                new[key] = old[key]
                previous[key] = err
        self._by_source[source_id] = new
        self._errors[source_id] = tuple(errors)
        self._previous[source_id] = previous
        # Only keys whose object is not the very same instance can change a winner: a reload of
        # 1,000 files with one edited settles a few keys, not all ~9,000 (this runs on the loop).
        if changed is None:
            keys = [key for key, obj in new.items() if old.get(key) is not obj]
            keys += [key for key in old if key not in new]
        else:
            keys = [key for key in changed if old.get(key) is not new.get(key)]
        settled = self._settle(keys)
        self._written(source_id, [(key[0], "delete" if key not in new else "update" if key in old else "add")
                                  for key in keys], settled)
        return settled

    def _written(self, source_id: str, events: list[tuple[str, str]], changed: bool) -> None:
        """Called after each write of a source: (kind, add/update/delete) per object it replaced,
        and whether the effective config changed. For subclasses that observe writes."""

    def serving_previous(self, source_id: str) -> Mapping[Key, DocumentError]:
        """Keys of a source whose new version was rejected, so their previous version serves."""
        return self._previous.get(source_id, {})

    async def wait_for_change(self, after_revision: int) -> int:
        """Wait until the revision exceeds ``after_revision``; return the new revision."""
        while self._revision <= after_revision:
            await self._changed.wait()
        return self._revision

    def _settle(self, keys: Iterable[Key]) -> bool:
        kinds: set[str] = set()
        for key in keys:
            winner = self._winner(key)
            before = self._effective.get(key)
            if winner != before:
                kinds.add(key[0])
                if winner is None:
                    del self._effective[key]
                    self._arrived.pop(key, None)
                    self._removed.pop(key, None)  # re-inserted: newest last
                    self._removed[key] = (self._revision + 1, time.time())
                    if len(self._removed) > REMOVALS_KEPT:
                        del self._removed[next(iter(self._removed))]
                    self._sorted_keys = self._ordered = None
                else:
                    if key not in self._effective:
                        self._sorted_keys = self._ordered = None
                    elif self._ordered is not None:
                        self._ordered[self._position[key]] = winner[1]
                    self._effective[key] = winner
                    # A status write (Kubernetes: new resourceVersion and status) is not new content:
                    # `meshctl wait` judges proxies against when the content arrived.
                    if before is None or key not in self._arrived or not before[1].same_content(winner[1]):
                        self._arrived[key] = (self._revision + 1, time.time())  # the revision _bump makes
                    self._removed.pop(key, None)
        if kinds:
            self._bump(frozenset(kinds))
        return bool(kinds)

    def arrival(self, key: Key) -> tuple[int, float] | None:
        """(store revision, wall time) at which the object's current content arrived; None if absent."""
        return self._arrived.get(key)

    def removal(self, key: Key) -> tuple[int, float] | None:
        """(store revision, wall time) at which an object that is gone was removed; None if it is
        present, never was, or its removal is older than the newest `REMOVALS_KEPT`."""
        return self._removed.get(key)

    def rejection(self, key: Key) -> tuple[str, bool] | None:
        """Why a source's latest document for `key` was refused, and whether a previous version
        still serves; None when no source reports an error naming it. Scans the errors (few)."""
        for source_id in sorted(self._errors):
            for err in self._errors[source_id]:
                if err.key == key:
                    return str(err), self._previous.get(source_id, {}).get(key) == err
        return None

    def kinds_changed_since(self, revision: int) -> frozenset[str] | None:
        """Kinds of the objects changed after ``revision``; None if unknown (a touch, or too old)."""
        if revision >= self._revision:
            return frozenset()
        found: set[str] = set()
        covered = self._revision
        for rev, kinds in reversed(self._kind_log):
            if rev <= revision:
                break
            if rev != covered:
                return None  # a revision without a log entry (touch) or trimmed history
            found |= kinds
            covered -= 1
        return frozenset(found) if covered == revision else None

    def touch(self) -> int:
        """Bump the revision with no change, so consumers rebuild (an operator touched config).

        Identical output serializes to identical versions downstream, so Envoy sees no push.
        """
        self._bump(None)
        return self._revision

    def _bump(self, kinds: frozenset[str] | None) -> None:
        self._revision += 1
        if kinds is not None:
            self._kind_log.append((self._revision, kinds))
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _winner(self, key: Key) -> tuple[str, ApiObject] | None:
        for source_id in sorted(self._by_source):
            obj = self._by_source[source_id].get(key)
            if obj is not None:
                return source_id, obj
        return None

    def debug_dump(self) -> dict[str, Any]:
        """JSON-ready view for ``/debug/configz``: objects with warnings, rejections, shadowing."""
        objects = [
            {
                "source": source_id,
                "kind": key[0],
                "namespace": key[1],
                "name": key[2],
                "warnings": [str(w) for w in obj.warnings],
                **self._previous_note(source_id, key),
                "object": obj.to_dict(),
            }
            for key, (source_id, obj) in sorted(self._effective.items())
        ]
        rejected = [self._rejection(source_id, err) for source_id in sorted(self._errors)
                    for err in self._errors[source_id]]
        shadowed = [
            {
                "source": source_id,
                "kind": k[0],
                "namespace": k[1],
                "name": k[2],
                "winner": self._effective[k][0],
            }
            for source_id in sorted(self._by_source)
            for k in sorted(self._by_source[source_id])
            if self._effective[k][0] != source_id
        ]
        return {"revision": self._revision, "objects": objects, "rejected": rejected, "shadowed": shadowed}

    def _previous_note(self, source_id: str, key: Key) -> dict[str, object]:
        err = self._previous.get(source_id, {}).get(key)
        return {} if err is None else {"serving_previous_version": True, "rejected_update": str(err)}

    def _rejection(self, source_id: str, err: DocumentError) -> dict[str, object]:
        entry: dict[str, object] = {"source": source_id, **err.to_dict()}
        key = err.key
        kept = key is not None and self._previous.get(source_id, {}).get(key) == err
        entry["serving_previous_version"] = kept
        if kept:
            entry["message"] = f"{err.message}; {SERVING_PREVIOUS}"
        return entry
