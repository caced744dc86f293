"""One proxy class's config: a `View` per type, made of shared `ResourceSet` parts.

A snapshot is immutable once built. Generators hand over each type as a few parts (name ->
message mappings); a part that several classes share (the outbound clusters, endpoints and
routes of a namespace) is the same mapping object for all of them, so the `Serializer` turns
it into one ResourceSet per mesh version and every class refers to that. A class's snapshot
is then its few own resources plus references: building one costs O(its own resources), not
O(mesh), and it holds no copy of the shared parts.

Serialization follows change too: a message object the generators carried over from the last
mesh version (unchanged inputs, see `pilot.translate.memo.carried`) keeps its serialized
Resource, bytes and version, so a rebuild serializes what changed.

The consistency check (every EDS name a cluster refers to has endpoints, every route name a
listener refers to exists, nothing unreferenced) is memoized on the shared parts, so classes
sharing them pay one dictionary lookup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pilot.model.conversions import Conversions
from pilot.xds import typeurls
from pilot.xds.resources import EMPTY_SET, Resource, ResourceSet, View

# type_url -> resource name -> protobuf message; what `generate` returns.
ProxyResources = Mapping[str, Mapping[str, Any]]
# type_url -> parts, each a name -> message (or its encoding, `pilot.translate.encoded.Encoded`) mapping
# (disjoint); what `generate_parts` returns.
ProxyParts = Mapping[str, Sequence[Mapping[str, Any]]]

_REFERENCES = (("EDS", typeurls.CLUSTER, typeurls.ENDPOINT), ("RDS", typeurls.LISTENER, typeurls.ROUTE))


@dataclass(frozen=True, eq=False)
class Snapshot:
    """The complete config of one proxy class: one View per type."""

    types: Mapping[str, View]

    def of(self, type_url: str) -> View:
        found = self.types.get(type_url)
        return found if found is not None else EMPTY_SET

    def view(self, type_url: str, names: frozenset[str] | None) -> View:
        """What a subscription to `names` (None: wildcard) sees of a type; memoized on the parts."""
        return self.of(type_url).view(names)

    def version(self, type_url: str) -> str:
        return self.of(type_url).version

    def versions(self) -> dict[str, str]:
        """type_url -> version; equal for snapshots with identical content."""
        return {t: v.version for t, v in self.types.items()}

    def same_content(self, other: Snapshot) -> bool:
        """Whether both hold the same resources (`versions()` equal), comparing versions only of
        types whose views are not the same object."""
        mine, theirs = self.types, other.types
        if mine.keys() != theirs.keys():
            return False
        for t, view in mine.items():  # a loop, not all() over a generator: called per class and push
            other_view = theirs[t]
            if view is not other_view and view.version != other_view.version:
                return False
        return True

    def eds_name(self, cluster: str) -> str | None:
        """The ClusterLoadAssignment an EDS cluster of this snapshot waits for (a changed cluster warms on it)."""
        found: Resource | None = self.of(typeurls.CLUSTER).get(cluster)
        return found.refs[0] if found is not None and found.refs else None

    def consistency_errors(self, checked: Snapshot | None = None) -> list[str]:
        """What would make Envoy wait forever or reject: references to names that do not exist.

        Every EDS name a cluster refers to needs a ClusterLoadAssignment, every RDS name a
        listener refers to needs a RouteConfiguration, and there is nothing unreferenced.
        `checked`: a snapshot that passed this check; a pair of types whose views are the very
        ones it has is consistent again (a fast path replaces one type of 2,000 snapshots).
        """
        errors: list[str] = []
        mine, before = self.types, (checked.types if checked is not None else None)
        for kind, source, target in _REFERENCES:
            uses, have = mine.get(source, EMPTY_SET), mine.get(target, EMPTY_SET)
            if before is not None and before.get(source, EMPTY_SET) is uses and before.get(target, EMPTY_SET) is have:
                continue
            refs = uses.refs()
            if have.holds_exactly(refs):
                continue
            names = set(have)
            errors += [f"{kind} name {n!r} is referenced but not in the snapshot" for n in sorted(refs - names)]
            errors += [f"{kind} resource {n!r} is in the snapshot but nothing references it"
                       for n in sorted(names - refs)]
        return errors

    def with_type(self, type_url: str, view: View) -> Snapshot:
        """This snapshot with one type replaced (the EDS fast path)."""
        return Snapshot({**self.types, type_url: view})

    @classmethod
    def from_resources(cls, resources: ProxyResources, serializer: Serializer | None = None) -> Snapshot:
        """A snapshot of one part per type (tests and tools; pilot builds from parts)."""
        return cls.from_parts({t: (r,) for t, r in resources.items()}, serializer)

    @classmethod
    def from_parts(cls, parts: ProxyParts, serializer: Serializer | None = None) -> Snapshot:
        """Serialize each part once (shared parts: once per mesh version) and compose the views."""
        serializer = serializer or Serializer()
        types: dict[str, View] = {}
        for type_url in typeurls.PUSH_ORDER:
            found = parts.get(type_url)
            if not found:
                types[type_url] = EMPTY_SET
                continue
            sets = tuple(serializer.set_of(type_url, p) for p in found)
            types[type_url] = sets[0] if len(sets) == 1 else serializer.view_of(sets)
        return cls(types)


def _serialize(message: Any, type_url: str, name: str) -> Resource:
    return Resource.from_message(type_url, name, message)


class Serializer:
    """Messages to Resources and parts to ResourceSets, reusing the last mesh version's work.

    A message object is serialized once while it lives (generators share objects across
    classes and carry unchanged ones across mesh versions); a part mapping becomes one
    ResourceSet per mesh version. Only what the current and the previous mesh version used
    is kept (see `Conversions`), so memory does not grow with history.
    """

    def __init__(self) -> None:
        # type_url -> its serialized messages: one memo per type, so that a fast-path push's
        # clean-up (`advance(replaced=...)`) walks only the replaced type's entries.
        self._resources: dict[str, Conversions] = {}
        self._sets: dict[int, tuple[Mapping[str, Any], ResourceSet]] = {}
        self._last_sets: dict[int, tuple[Mapping[str, Any], ResourceSet]] = {}  # the last mesh's, during a push
        self._views: dict[tuple[int, ...], View] = {}

    def next_mesh(self) -> None:
        """A new mesh version: parts are new objects now; serialized messages stay reusable, and so
        do the last version's sets until the push ends (a patched part is serialized from its base's)."""
        self._last_sets, self._sets = self._sets, {}
        self._views = {}

    def advance(self, complete: bool, replaced: tuple[str, ...] = ()) -> None:
        """A push is done: see `Conversions.advance` (a complete push lets go of what it did not use).

        `replaced`: the type(s) a fast-path push gave every published class anew (routes, with
        VHDS classes their virtual hosts too, or endpoints). Their serialized resources that no
        set made in this push holds are dropped now:
        a partial push keeps every other conversion, and without this each route change would keep
        its old route configurations (0.57 MB each, one per namespace at 1,000 services) until the
        next full push. Costs one pass over that type's serialized resources (a few thousand
        route configurations at mission scale), not over every type's.
        """
        for type_url in () if complete else replaced:
            memo = self._resources.get(type_url)
            if memo is not None:
                kept = {id(r) for _, made in self._sets.values() if made.type_url == type_url
                        for r in made.by_name.values()}
                memo.forget(lambda _key, value: id(value) not in kept)  # noqa: B023 (called at once)
        for memo in self._resources.values():
            memo.advance(complete)
        self._last_sets = {}

    def held(self, type_url: str) -> int:
        """How many serialized resources of a type are kept for reuse (tests and debugging)."""
        memo = self._resources.get(type_url)
        return len(memo) if memo is not None else 0

    def view_of(self, sets: tuple[ResourceSet, ...]) -> View:
        """One composite view per combination of sets (per mesh version): classes whose parts are
        all shared share the view too, and with it its encoded responses."""
        key = tuple(map(id, sets))
        found = self._views.get(key)
        if found is None:  # the view holds its sets, and the sets stay in `_sets`: ids stay theirs
            found = self._views[key] = View(sets)
        return found

    def resource(self, type_url: str, name: str, message: Any) -> Resource:
        memo = self._resources.get(type_url)
        if memo is None:
            memo = self._resources[type_url] = Conversions()
        return memo.of(_serialize, message, type_url, name)

    def set_of(self, type_url: str, part: Mapping[str, Any]) -> ResourceSet:
        """The ResourceSet of a part, once per part object. A part patched from an earlier one (a
        `pilot.translate.memo.Patched`: its base with a few names replaced) whose base was
        serialized in this push or the last is made from the base's set in O(replaced names)."""
        found = self._sets.get(id(part))
        if found is not None and found[0] is part:
            return found[1]
        made = self._patched(type_url, part)
        if made is None:
            made = ResourceSet(type_url, [self.resource(type_url, n, m) for n, m in part.items()])
        self._sets[id(part)] = (part, made)  # keeps `part` alive, so its id stays its own
        return made

    def _patched(self, type_url: str, part: Mapping[str, Any]) -> ResourceSet | None:
        base = getattr(part, "patched_from", None)
        if base is None:
            return None
        found = self._sets.get(id(base)) or self._last_sets.get(id(base))
        if found is None or found[0] is not base:
            return None
        names: tuple[str, ...] = part.replaced_names  # type: ignore[attr-defined]
        return found[1].replaced({n: self.resource(type_url, n, part[n]) for n in names})


class InconsistentSnapshotError(ValueError):
    """A snapshot failed its consistency check and was not published."""

    def __init__(self, key: object, errors: list[str]) -> None:
        super().__init__(f"snapshot for {key} is inconsistent: " + "; ".join(errors))
        self.key = key
        self.errors = errors
