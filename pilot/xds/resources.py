"""Serialized resources and the immutable, shared sets and views that hold them.

Why: at mission scale (1,000 services, a config class per workload) most of a class's config
is the same as its neighbours': the outbound clusters, endpoints and routes of its namespace.
A `ResourceSet` holds such a group once per mesh version, serialized, indexed and versioned;
every class that has it refers to the same object. A class's type is a `View`: a few disjoint
parts (shared sets plus its own small ones), never a copy.

Versions compose. A resource's `tag` is a 128-bit hash of its name and content version; a
set's version is the sum of its tags (mod 2**128), so a view of several parts costs one
addition per part, and what a proxy holds after a change is versioned in O(changes). Equal
content gives equal versions whatever the grouping, so no spurious pushes.

Cost: a set is hashed and indexed once when built (O(resources)); lookups, views of a
subscription and the changes between two versions are memoized on the set, so streams and
classes that share a set share that work too. Everything here is read-only after
construction and used from the event loop only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pilot.xds.references import references_of
from pilot.xds.wire import len_header, str_field

_MASK = (1 << 128) - 1
# DiscoveryResponse.resources and DeltaDiscoveryResponse.resources are both field 2, and so are
# Any.value and the delta Resource's `resource` (the Any).
_RESOURCES_FIELD = _ANY_VALUE_FIELD = _RESOURCE_ANY_FIELD = 2
# Memo entries kept per set (subscription views, change sets): a set lives for one mesh version,
# and streams of a class hold one of very few earlier versions.
_MEMO_LIMIT = 16
# Sets of at least this many resources keep their response pieces joined (see `ResourceSet.sotw_pieces`).
_JOINED_FROM = 8


def _remember(memo: dict[Any, Any], key: Any, value: Any) -> Any:
    """Store `value` in a small memo and return it; a full memo starts over (bounded memory)."""
    if len(memo) >= _MEMO_LIMIT:
        memo.clear()
    memo[key] = value
    return value


def _digest(data: bytes) -> str:
    """A resource's content version: 64 bits of SHA-256. SHA-256 because CPUs with the SHA
    extensions (and OpenSSL) hash it at ~1 GB/s, twice BLAKE2b's speed here: a route change at
    mission scale hashes a 0.57 MB route configuration per namespace."""
    return hashlib.sha256(data).hexdigest()[:16]


def tag_of(name: str, version: str) -> int:
    """What one resource adds to the version of a set holding it."""
    data = name.encode() + b"\0" + version.encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "big")


def version_of_total(total: int) -> str:
    return f"{total & _MASK:032x}"


def version_of(resources: Mapping[str, Resource]) -> str:
    """Version of any name -> resource mapping, as a set of exactly those resources would have."""
    return version_of_total(sum(r.tag for r in resources.values()))



@dataclass(frozen=True, eq=False)
class Resource:
    """One serialized resource: its name, content version and `Any` encoding.

    `refs` are the names it makes a proxy ask for in the dependent type (a cluster's EDS name,
    a listener's route configurations), read once from the message when it is serialized.
    """

    type_url: str
    name: str
    version: str
    value: bytes  # the message's own deterministic serialization
    refs: tuple[str, ...] = ()
    tag: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tag", tag_of(self.name, self.version))

    @property
    def any_bytes(self) -> bytes:
        """The resource as a serialized google.protobuf.Any (made on each call: not kept)."""
        return self._any_head() + self.value

    def _any_head(self) -> bytes:
        """The `Any` up to its value: the type URL field and the value field's tag and length."""
        return str_field(1, self.type_url) + len_header(_ANY_VALUE_FIELD, len(self.value))

    def sotw_pieces(self) -> tuple[bytes, bytes]:
        """This resource as one element of DiscoveryResponse.resources, in two pieces to be joined
        into a response: a small header (field tag, lengths, type URL) and `value` itself.

        Nothing is kept: a joined copy per resource would double the bytes held (at mission scale
        with 20 namespaces, 0.57 MB per route configuration), and a response is one join anyway."""
        head = self._any_head()
        return len_header(_RESOURCES_FIELD, len(head) + len(self.value)) + head, self.value

    @property
    def sotw_entry(self) -> bytes:
        return b"".join(self.sotw_pieces())

    def delta_pieces(self) -> tuple[bytes, bytes, bytes]:
        """This resource as one element of DeltaDiscoveryResponse.resources (a Resource message):
        header, `value`, and the name field after it; nothing kept (see `sotw_pieces`)."""
        head = self._any_head()
        version, name = str_field(1, self.version), str_field(3, self.name)
        wrapped = len_header(_RESOURCE_ANY_FIELD, len(head) + len(self.value)) + head
        size = len(version) + len(wrapped) + len(self.value) + len(name)
        return len_header(_RESOURCES_FIELD, size) + version + wrapped, self.value, name

    @property
    def delta_entry(self) -> bytes:
        return b"".join(self.delta_pieces())

    @classmethod
    def from_message(cls, type_url: str, name: str, message: Any) -> Resource:
        value: bytes = message.SerializeToString(deterministic=True)
        return cls(type_url, name, _digest(value), value, references_of(type_url, message))

    @classmethod
    def held(cls, type_url: str, name: str, version: str) -> Resource:
        """What a proxy says it holds (delta `initial_resource_versions`): a version, no bytes."""
        return cls(type_url, name, version, b"")


@dataclass(eq=False)
class SharedResponse:
    """One encoded response and its nonce, sent as the same bytes object to many streams.

    `streams` are the ids of the streams it went to: a stream never gets one nonce twice.
    """

    data: bytes
    nonce: str
    streams: set[int] = field(default_factory=set)


class View(Mapping[str, Resource]):
    """The resources of one type that a class or subscription sees: disjoint shared parts.

    Parts keep their position (a class's shared part first, its own after), so the changes
    between two views are the changes between their parts, each computed once per pair of
    versions and shared by everyone holding them.
    """

    __slots__ = ("__weakref__", "_exact", "_refs", "_size", "_subviews", "parts", "responses", "total", "version")
    parts: tuple[ResourceSet, ...]
    total: int
    version: str
    # Identity, not content: views are shared objects, compared by version where it matters.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self, parts: tuple[ResourceSet, ...]) -> None:
        self.parts = parts
        self._size = sum(len(p.by_name) for p in parts)  # immutable: `len` and truth tests read this
        self.total = sum(p.total for p in parts) & _MASK
        self.version = version_of_total(self.total)
        # names id -> (names, the view, or None for this view itself: no reference cycle, so a
        # view is freed as soon as nothing uses it, not at the next full garbage collection)
        self._subviews: dict[int, tuple[frozenset[str], View | None]] = {}
        self._exact: dict[int, tuple[frozenset[str], bool]] = {}
        # Encoded responses bringing a proxy to this view, shared by every stream making the
        # same step (see `pilot.xds.session.SessionBase._respond`).
        self.responses: dict[Hashable, SharedResponse] = {}
        self._refs: frozenset[str] | None = None

    # -- Mapping ---------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Resource:
        for part in self.parts:
            found = part.by_name.get(name)
            if found is not None:
                return found
        raise KeyError(name)

    def get(self, name: str, default: Any = None) -> Any:
        for part in self.parts:
            found = part.by_name.get(name)
            if found is not None:
                return found
        return default

    def __contains__(self, name: object) -> bool:
        return any(name in part.by_name for part in self.parts)

    def __iter__(self) -> Iterator[str]:
        for part in self.parts:
            yield from part.by_name

    def __len__(self) -> int:
        return self._size

    @property
    def resources(self) -> Mapping[str, Resource]:
        """The view as a name -> resource mapping (it is one; no copy is made)."""
        return self

    # -- what streams ask ------------------------------------------------------------------
    def view(self, names: frozenset[str] | None) -> View:
        """What a subscription to `names` (None: wildcard) sees; memoized per subscription object.

        Subscriptions are interned (`pilot.xds.session.Subscriptions`), so streams asking for the
        same names share one view, and a view equal to the whole is the whole itself.
        """
        if names is None:
            return self
        found = self._subviews.get(id(names))
        if found is None or found[0] is not names:  # the entry keeps `names` alive: ids stay theirs
            found = _remember(self._subviews, id(names), (names, self._narrowed(names)))
        return self if found[1] is None else found[1]

    def _narrowed(self, names: frozenset[str]) -> View | None:
        """This view restricted to `names`; None when that is all of it."""
        picked = tuple(p.view(names) for p in self.parts)
        return None if all(a is b for a, b in zip(picked, self.parts, strict=True)) else View(picked)

    def changes_from(self, held: Mapping[str, Resource], held_version: str) -> Mapping[str, Resource]:
        """Resources of this view whose version differs from what a proxy holds.

        O(changes) when `held` is an earlier view of the same shape (the usual case); otherwise
        one pass over this view.
        """
        if held_version == self.version:
            return {}
        if isinstance(held, View) and len(held.parts) == len(self.parts):
            out: dict[str, Resource] = {}
            for new, old in zip(self.parts, held.parts, strict=True):
                if new is not old and new.total != old.total:
                    out.update(new.changed_since(old))
            if len(self.parts) > 1:  # a resource may have moved between parts unchanged
                out = {n: r for n, r in out.items() if (h := held.get(n)) is None or h.version != r.version}
            return out
        return {n: r for n, r in self.items() if (h := held.get(n)) is None or h.version != r.version}

    def gone_from(self, held: Mapping[str, Resource]) -> list[str]:
        """Names a proxy holds that this view no longer has, sorted."""
        if held is self:  # the usual case after a push: the proxy holds exactly this view
            return []
        if isinstance(held, View) and len(held.parts) == len(self.parts):
            gone = [n for new, old in zip(self.parts, held.parts, strict=True) if new is not old
                    for n in new.removed_since(old)]
            if len(self.parts) > 1:
                gone = [n for n in gone if n not in self]
            return sorted(gone)
        return sorted(n for n in held if n not in self)

    def holds_exactly(self, names: frozenset[str]) -> bool:
        """Whether this view's names are exactly `names`; memoized per names object (shared refs)."""
        found = self._exact.get(id(names))
        if found is None or found[0] is not names:
            exact = len(self) == len(names) and all(n in self for n in names)
            found = _remember(self._exact, id(names), (names, exact))
        return bool(found[1])

    def sotw_pieces(self) -> list[bytes]:
        """Every resource as DiscoveryResponse.resources entries, sorted by name within each part,
        as pieces to join into a response (see `ResourceSet.sotw_pieces`)."""
        return [piece for p in self.parts for piece in p.sotw_pieces()]

    def delta_pieces(self) -> list[bytes]:
        """Every resource as DeltaDiscoveryResponse.resources entries, as `sotw_pieces`."""
        return [piece for p in self.parts for piece in p.delta_pieces()]

    def refs(self) -> frozenset[str]:
        """Names this view's resources refer to in the dependent type; computed once (views are
        immutable), as every fast-path publish checks them for each of 2,000 classes."""
        if self._refs is None:
            parts = [r for p in self.parts if (r := p.refs())]
            self._refs = parts[0] if len(parts) == 1 else frozenset().union(*parts)
        return self._refs


class ResourceSet(View):
    """One group of resources of one type, serialized, indexed and versioned once, shared."""

    __slots__ = ("_body", "_delta_body", "_diffs", "_removed", "by_name", "type_url")

    def __init__(self, type_url: str, resources: Iterable[Resource]) -> None:
        by_name = {r.name: r for r in resources}
        self._init(type_url, by_name, sum(r.tag for r in by_name.values()) & _MASK)

    @classmethod
    def _indexed(cls, type_url: str, by_name: dict[str, Resource], total: int) -> ResourceSet:
        """A set from its index and tag total, already known (`replaced`): nothing is walked."""
        made = cls.__new__(cls)
        made._init(type_url, by_name, total)
        return made

    def _init(self, type_url: str, by_name: dict[str, Resource], total: int) -> None:
        self.type_url = type_url
        self.by_name = by_name
        self.total = total
        self.version = version_of_total(self.total)
        self._subviews = {}
        self._exact = {}
        self.responses = {}
        self._diffs: dict[str, Mapping[str, Resource]] = {}
        self._removed: dict[str, list[str]] = {}
        self._body: bytes | None = None
        self._delta_body: bytes | None = None
        self._refs: frozenset[str] | None = None

    @property
    def parts(self) -> tuple[ResourceSet, ...]:  # type: ignore[override]
        """A set is the one part of itself (computed: an attribute would be a reference cycle)."""
        return (self,)

    def __getitem__(self, name: str) -> Resource:
        return self.by_name[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.by_name.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_name)

    def __len__(self) -> int:
        return len(self.by_name)

    if TYPE_CHECKING:  # a set narrows to sets (`_narrowed`); no wrapper at run time (a call per push)
        def view(self, names: frozenset[str] | None) -> ResourceSet: ...

    def _narrowed(self, names: frozenset[str]) -> ResourceSet | None:
        by_name = self.by_name
        if len(names) >= len(by_name) and names.issuperset(by_name):
            return None
        return ResourceSet(self.type_url, [by_name[n] for n in sorted(names) if n in by_name])

    def changes_from(self, held: Mapping[str, Resource], held_version: str) -> Mapping[str, Resource]:
        """`View.changes_from`; from an earlier set, the memoized change set itself (read-only, shared)."""
        if type(held) is ResourceSet:
            return {} if held_version == self.version else self.changed_since(held)
        return super().changes_from(held, held_version)

    def gone_from(self, held: Mapping[str, Resource]) -> list[str]:
        """`View.gone_from`; from an earlier set, the memoized list itself (read-only, shared)."""
        if type(held) is ResourceSet:
            return [] if held is self else self.removed_since(held)
        return super().gone_from(held)

    def replaced(self, changed: Mapping[str, Resource]) -> ResourceSet:
        """This set with the named resources replaced (every name must be in it): names and their
        order stay, and the version follows from the replaced resources' tags alone.

        Why: one endpoint move changes a few of ~3,000 ClusterLoadAssignments; indexing and
        summing all of them again costs ~5 ms at mission scale, this O(changed)."""
        by_name = dict(self.by_name)
        total = self.total
        for name, resource in changed.items():
            total += resource.tag - by_name[name].tag  # KeyError: not a replacement
            by_name[name] = resource
        return ResourceSet._indexed(self.type_url, by_name, total & _MASK)

    def changed_since(self, old: ResourceSet) -> Mapping[str, Resource]:
        """Resources new or changed since `old` (by content version); memoized per old version."""
        found = self._diffs.get(old.version)
        if found is None:
            before = old.by_name
            found = _remember(self._diffs, old.version, {
                n: r for n, r in self.by_name.items()
                if (o := before.get(n)) is not r and (o is None or o.version != r.version)})
        return found

    def removed_since(self, old: ResourceSet) -> list[str]:
        """Names `old` had and this set has not; memoized per old version."""
        found = self._removed.get(old.version)
        if found is None:
            found = _remember(self._removed, old.version, sorted(old.by_name.keys() - self.by_name.keys()))
        return found

    def sotw_pieces(self) -> list[bytes]:
        """The set as DiscoveryResponse.resources elements, in name order, as pieces to join into a
        response. A set of more than `_JOINED_FROM` resources keeps them joined (one join, not one
        per response); a smaller one hands over its resources' pieces, keeping no copy of them."""
        pieces, self._body = self._pieces(self._body, Resource.sotw_pieces)
        return pieces

    def delta_pieces(self) -> list[bytes]:
        """As `sotw_pieces`, for DeltaDiscoveryResponse.resources."""
        pieces, self._delta_body = self._pieces(self._delta_body, Resource.delta_pieces)
        return pieces

    def _pieces(
        self, joined: bytes | None, pieces_of: Callable[[Resource], tuple[bytes, ...]]
    ) -> tuple[list[bytes], bytes | None]:
        """(the pieces, what to keep joined) given what was kept joined before."""
        if joined is not None:
            return [joined], joined
        by_name = self.by_name
        pieces = [piece for n in sorted(by_name) for piece in pieces_of(by_name[n])]
        if len(by_name) < _JOINED_FROM:
            return pieces, None
        joined = b"".join(pieces)
        return [joined], joined

    def refs(self) -> frozenset[str]:
        if self._refs is None:
            self._refs = frozenset(n for r in self.by_name.values() for n in r.refs)
        return self._refs


EMPTY_SET = ResourceSet("", ())
