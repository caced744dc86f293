"""Serialized, versioned, consistency-checked xDS snapshots for one proxy class.

A snapshot is immutable once built. Each resource is serialized exactly once (deterministic
bytes), its version is a hash of those bytes, and a type's version is a hash of its resources'
names and versions, so identical config always yields identical versions (no spurious pushes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pilot.xds import typeurls
from pilot.xds.references import cluster_eds_name, listener_route_names
from pilot.xds.wire import len_field, str_field

# type_url -> resource name -> protobuf message; what generators return.
ProxyResources = Mapping[str, Mapping[str, Any]]

# DiscoveryResponse.resources and DeltaDiscoveryResponse.resources are both field 2.
_RESOURCES_FIELD = 2


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass(frozen=True, eq=False)
class Resource:
    """One serialized resource: its name, content version and `Any` encoding."""

    type_url: str
    name: str
    version: str
    value: bytes  # the message's own deterministic serialization

    @cached_property
    def any_bytes(self) -> bytes:
        """The resource as a serialized google.protobuf.Any."""
        return str_field(1, self.type_url) + len_field(2, self.value)

    @cached_property
    def sotw_entry(self) -> bytes:
        """This resource as one element of DiscoveryResponse.resources."""
        return len_field(_RESOURCES_FIELD, self.any_bytes)

    @cached_property
    def delta_entry(self) -> bytes:
        """This resource as one element of DeltaDiscoveryResponse.resources (a Resource message)."""
        body = str_field(1, self.version) + len_field(2, self.any_bytes) + str_field(3, self.name)
        return len_field(_RESOURCES_FIELD, body)

    @classmethod
    def from_message(cls, type_url: str, name: str, message: Any) -> Resource:
        value: bytes = message.SerializeToString(deterministic=True)
        return cls(type_url=type_url, name=name, version=_digest(value), value=value)


@dataclass(frozen=True)
class TypeSnapshot:
    """All resources of one type for one class, with the type's version."""

    type_url: str
    resources: Mapping[str, Resource]
    version: str

    @classmethod
    def build(cls, type_url: str, resources: Iterable[Resource]) -> TypeSnapshot:
        by_name = {r.name: r for r in sorted(resources, key=lambda r: r.name)}
        h = hashlib.blake2b(digest_size=8)
        for name, res in by_name.items():
            h.update(name.encode() + b"\0" + res.version.encode() + b"\n")
        return cls(type_url=type_url, resources=by_name, version=h.hexdigest())


EMPTY_VERSION = TypeSnapshot.build("", []).version


@dataclass(frozen=True)
class View:
    """The resources of one type that a subscription sees, and their combined version."""

    resources: Mapping[str, Resource]
    version: str


@dataclass(frozen=True)
class Snapshot:
    """The complete config of one proxy class: one TypeSnapshot per type in PUSH_ORDER."""

    types: Mapping[str, TypeSnapshot]
    # Names referenced across types, kept for the consistency check and for debugging.
    eds_refs: frozenset[str] = field(default=frozenset())
    rds_refs: frozenset[str] = field(default=frozenset())
    # EDS cluster name -> the ClusterLoadAssignment it waits for (a changed cluster warms on it).
    cluster_eds: Mapping[str, str] = field(default_factory=dict)
    # Subscription views computed so far; every stream of a class shares them (event loop only).
    _views: dict[tuple[str, frozenset[str] | None], View] = field(
        default_factory=dict, compare=False, repr=False)
    # (type, subscription, version held before) -> resources that changed; shared by a class's streams.
    _changes: dict[tuple[str, frozenset[str] | None, str], Mapping[str, Resource]] = field(
        default_factory=dict, compare=False, repr=False)

    def changes(self, type_url: str, names: frozenset[str] | None, held_version: str,
                held: Callable[[], Mapping[str, str]]) -> Mapping[str, Resource]:
        """Subscribed resources whose version differs from what a proxy holds, memoized.

        `held_version` names exactly what the proxy holds (`held()` gives name -> version, only
        called on a miss); streams of one class usually hold the same, so this runs once a push.
        """
        key = (type_url, names, held_version)
        found = self._changes.get(key)
        if found is None:
            versions = held()
            view = self.view(type_url, names).resources
            found = {n: r for n, r in view.items() if versions.get(n) != r.version}
            if held_version:
                self._changes[key] = found
        return found

    def view(self, type_url: str, names: frozenset[str] | None) -> View:
        """What a subscription to `names` (None: wildcard) sees of a type; memoized per snapshot."""
        key = (type_url, names)
        found = self._views.get(key)
        if found is None:
            ts = self.of(type_url)
            if names is None:
                found = View(ts.resources, ts.version)
            else:
                picked = {n: ts.resources[n] for n in sorted(names) if n in ts.resources}
                found = View(picked, TypeSnapshot.build(type_url, picked.values()).version)
            self._views[key] = found
        return found

    def of(self, type_url: str) -> TypeSnapshot:
        found = self.types.get(type_url)
        return found if found is not None else TypeSnapshot(type_url, {}, EMPTY_VERSION)

    def version(self, type_url: str) -> str:
        return self.of(type_url).version

    def versions(self) -> dict[str, str]:
        """type_url -> version; equal for snapshots with identical content."""
        return {t: ts.version for t, ts in self.types.items()}

    def consistency_errors(self) -> list[str]:
        """What would make Envoy wait forever or reject: references to names that do not exist.

        Every EDS name a cluster refers to needs a ClusterLoadAssignment, every RDS name a
        listener refers to needs a RouteConfiguration, and there is nothing unreferenced.
        """
        errors: list[str] = []
        for kind, refs, type_url in (("EDS", self.eds_refs, typeurls.ENDPOINT), ("RDS", self.rds_refs, typeurls.ROUTE)):
            have = set(self.of(type_url).resources)
            errors += [f"{kind} name {n!r} is referenced but not in the snapshot" for n in sorted(refs - have)]
            errors += [
                f"{kind} resource {n!r} is in the snapshot but nothing references it" for n in sorted(have - refs)
            ]
        return errors

    def with_type(self, type_url: str, messages: Mapping[str, Any], memo: SerializeMemo | None = None) -> Snapshot:
        """This snapshot with one type's resources replaced (the EDS fast path).

        Only for types no other type refers *from* (endpoints): references stay as they were.
        """
        memo = {} if memo is None else memo
        replaced = TypeSnapshot.build(type_url, (_resource(memo, type_url, n, m) for n, m in messages.items()))
        return Snapshot({**self.types, type_url: replaced}, self.eds_refs, self.rds_refs, self.cluster_eds)

    @classmethod
    def from_resources(cls, resources: ProxyResources, memo: SerializeMemo | None = None) -> Snapshot:
        """Serialize generated messages once and collect cross-type references.

        With a `memo`, a message object already serialized for another class (generators share
        the messages that do not depend on the proxy) is not serialized again.
        """
        memo = {} if memo is None else memo
        types: dict[str, TypeSnapshot] = {}
        for type_url in typeurls.PUSH_ORDER:
            msgs = resources.get(type_url, {})
            types[type_url] = TypeSnapshot.build(type_url, (_resource(memo, type_url, n, m) for n, m in msgs.items()))
        clusters = resources.get(typeurls.CLUSTER, {})
        listeners = resources.get(typeurls.LISTENER, {}).values()
        eds_of = {name: eds for name, c in clusters.items() if (eds := cluster_eds_name(c))}
        rds = frozenset(n for lis in listeners for n in listener_route_names(lis))
        return cls(types=types, eds_refs=frozenset(eds_of.values()), rds_refs=rds, cluster_eds=eds_of)


# id(message) -> (the message, kept alive so the id stays its own; its serialized resource)
SerializeMemo = dict[int, tuple[Any, Resource]]


def _resource(memo: SerializeMemo, type_url: str, name: str, message: Any) -> Resource:
    found = memo.get(id(message))
    if found is not None and found[0] is message and found[1].name == name and found[1].type_url == type_url:
        return found[1]
    res = Resource.from_message(type_url, name, message)
    memo[id(message)] = (message, res)
    return res


class InconsistentSnapshotError(ValueError):
    """A snapshot failed its consistency check and was not published."""

    def __init__(self, key: object, errors: list[str]) -> None:
        super().__init__(f"snapshot for {key} is inconsistent: " + "; ".join(errors))
        self.key = key
        self.errors = errors
