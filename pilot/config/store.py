"""The ConfigStore: every valid API object from every source, keyed by (kind, namespace, name).

Concurrency: one event loop. Sources call the synchronous writers (`apply`, `delete`,
`replace_source`) on the loop thread; consumers `await wait_for_change(rev)`, which wakes on
an `asyncio.Event` swapped at every revision, so nothing polls. A write that changes no
object does not bump the revision, so re-reading unchanged files causes no push.

Two sources may define the same key; the source with the smallest id wins, deterministically,
and the loser is listed under ``shadowed`` on the debug page instead of vanishing.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pilot.api import ApiObject
from pilot.config.documents import DocumentError

Key = tuple[str, str, str]  # (kind, namespace, name)
DEFAULT_SOURCE = "api"


class ConfigStore:
    """Typed objects with a monotonically increasing revision and change notification."""

    def __init__(self) -> None:
        self._by_source: dict[str, dict[Key, ApiObject]] = {}
        self._errors: dict[str, tuple[DocumentError, ...]] = {}
        self._effective: dict[Key, tuple[str, ApiObject]] = {}
        self._revision = 0
        self._changed = asyncio.Event()
        # (revision, kinds it changed), newest last; lets the pusher take the endpoint fast path.
        self._kind_log: collections.deque[tuple[int, frozenset[str]]] = collections.deque(maxlen=256)
        self._sorted: tuple[int, list[tuple[str, ApiObject]]] | None = None  # (revision, (kind, object) by key)

    @property
    def revision(self) -> int:
        """Bumped once per write that changed the effective set of objects."""
        return self._revision

    def get(self, kind: str, namespace: str, name: str) -> ApiObject | None:
        found = self._effective.get((kind, namespace, name))
        return found[1] if found else None

    def objects(self, kind: str | None = None) -> list[ApiObject]:
        """Effective objects sorted by key (optionally of one kind).

        The sorted list is kept per revision: every push asks for all of it, and sorting ~9,000
        objects (1,000 services) costs ~15 ms.
        """
        if self._sorted is None or self._sorted[0] != self._revision:
            self._sorted = (self._revision, [(key[0], obj) for key, (_, obj) in sorted(self._effective.items())])
        return [obj for k, obj in self._sorted[1] if kind is None or k == kind]

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
        errors: Sequence[DocumentError] = (),
    ) -> bool:
        """Make ``objects`` the whole content of a source (and ``errors`` its rejections).

        ``objects`` may come keyed already (key -> object). Objects the source no longer has
        are deleted; True if the effective config changed.
        """
        new = dict(objects) if isinstance(objects, Mapping) else {obj.key: obj for obj in objects}
        old = self._by_source.get(source_id, {})
        self._by_source[source_id] = new
        self._errors[source_id] = tuple(errors)
        # Only keys whose object is not the very same instance can change a winner: a reload of
        # 1,000 files with one edited settles a few keys, not all ~9,000 (this runs on the loop).
        changed = [key for key, obj in new.items() if old.get(key) is not obj]
        changed += [key for key in old if key not in new]
        return self._settle(changed)

    async def wait_for_change(self, after_revision: int) -> int:
        """Wait until the revision exceeds ``after_revision``; return the new revision."""
        while self._revision <= after_revision:
            await self._changed.wait()
        return self._revision

    def _settle(self, keys: Iterable[Key]) -> bool:
        kinds: set[str] = set()
        for key in keys:
            winner = self._winner(key)
            if winner != self._effective.get(key):
                kinds.add(key[0])
                if winner is None:
                    del self._effective[key]
                else:
                    self._effective[key] = winner
        if kinds:
            self._bump(frozenset(kinds))
        return bool(kinds)

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
                "object": obj.to_dict(),
            }
            for key, (source_id, obj) in sorted(self._effective.items())
        ]
        rejected = [
            {"source": source_id, **err.to_dict()}
            for source_id in sorted(self._errors)
            for err in self._errors[source_id]
        ]
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
