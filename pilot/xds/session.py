"""What SotW and delta sessions share: nonces, ACK/NACK bookkeeping, the view of a type.

A session is a pure state machine: `handle(request)` (or `handle_wire(bytes)`) updates it and
`responses(snapshot)` returns the encoded responses to send now, in push order, removals last.
The ADS server owns all I/O; sessions never await anything, so they are tested without gRPC.

Cost: what streams have in common lives in `Subscriptions` (interned name sets, the wire form of
name lists, the nonce source of shared responses) and on the shared views themselves (responses
encoded once for every stream taking the same step), so a stream's own state stays a few small
objects and references whatever the size of the mesh.
"""

from __future__ import annotations

import itertools
import secrets
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from pilot.xds import typeurls
from pilot.xds.resources import EMPTY_SET, Resource, SharedResponse, View, version_of
from pilot.xds.snapshot import Snapshot
from pilot.xds.status import StatusRegistry, StreamStatus


class _Held(Protocol):
    """What every per-type state has: the resources the proxy was sent, and their version."""

    held: Mapping[str, Resource]
    held_version: str
    seen: str  # the view version last reconciled ("": reconcile again, e.g. after a new request)
    seen_whole: View | None  # the snapshot's whole view of the type, as last reconciled
    seen_view: View  # the subscription's view of it


StateT = TypeVar("StateT", bound=_Held)
# Bytes of remembered request name lists; past it the table starts over (sharing lost, not correctness).
WIRE_BYTES_LIMIT = 64 * 1024 * 1024
# Answers kept by `Subscriptions.covers`; each holds two shared sets alive (up to ~0.1 MB each at
# mission scale), so few: a mesh version has one pair per namespace's view and subscription.
COVERED_LIMIT = 64
# Shared responses kept per view (distinct steps to it: held versions, types).
SHARED_RESPONSES = 32


# Types whose resources name clusters: sent only once the proxy holds those clusters warm.
_WAIT_FOR_CLUSTERS = frozenset({typeurls.LISTENER, typeurls.ROUTE, typeurls.VIRTUAL_HOST})


def held_version_of(held: Mapping[str, Resource]) -> str:
    """Version of what a proxy holds: known for a shared view, summed (O(n)) for anything else."""
    return held.version if isinstance(held, View) else version_of(held)


def ordered_types(type_urls: Iterable[str]) -> list[str]:
    """Types in push order (CDS, EDS, LDS, RDS, SDS), unknown ones last, by name."""
    present = set(type_urls)
    known: list[str] = [t for t in typeurls.PUSH_ORDER if t in present]
    return known + sorted(present.difference(typeurls.PUSH_ORDER)) if len(known) < len(present) else known


class Subscriptions:
    """What the streams of one server share: one object per distinct subscription (set of resource
    names), the wire form of name lists, and the nonces of shared responses.

    Why: views and change sets are memoized per (type, subscription); with one object per
    distinct set, those lookups and a session's "did my subscription change" check are
    identity comparisons instead of comparing a hundred names per stream and push. Bounded:
    past `limit` distinct sets the table starts over (sharing is lost, never correctness).
    """

    def __init__(self, limit: int = 4096, sharing: weakref.WeakSet[View] | None = None) -> None:
        self.limit = limit
        # Views holding encoded responses shared by streams (`SessionBase._respond`): what
        # `SnapshotCache.forget_responses` clears, without walking every class's snapshot. Weak:
        # a view no snapshot uses any more leaves by itself, with its responses.
        self.sharing: weakref.WeakSet[View] = weakref.WeakSet() if sharing is None else sharing
        self._known: dict[frozenset[str], frozenset[str]] = {}
        # The wire bytes of a SotW request's names (and type) -> (those bytes, the subscription):
        # a stream recognises an unchanged subscription by comparing bytes, and keeps a reference
        # to the shared bytes object instead of its own copy of a few thousand names.
        self._wire: dict[bytes, tuple[bytes, frozenset[str] | None]] = {}
        self._wire_bytes = 0
        # The wire bytes of a delta request's subscribe-only tail (see `pilot.xds.wire.subscribe_tail`)
        # by a cheap fingerprint (length, first and last bytes) -> (those bytes, the subscription):
        # a stream's first subscription of a type is recognised with one memcmp, without hashing
        # or decoding a few thousand names.
        self._tails: dict[tuple[int, bytes, bytes], list[tuple[bytes, frozenset[str]]]] = {}
        self._covered: dict[tuple[int, int], tuple[frozenset[str], frozenset[str], bool]] = {}  # see `covers`
        self.nonces = Nonces()  # nonces of responses shared by streams: unique server-wide

    def intern(self, names: frozenset[str]) -> frozenset[str]:
        found = self._known.get(names)
        if found is not None:
            return found
        if len(self._known) >= self.limit:
            self._known.clear()
        self._known[names] = names
        return names

    def covers(self, subscribed: frozenset[str], needed: frozenset[str]) -> bool:
        """Whether `needed <= subscribed`, answered once per pair of (shared) set objects.

        Why: on connect every stream asks whether its clusters' EDS names are subscribed (~3,000
        of each at mission scale, ~0.1 ms), and streams of one namespace ask about the same two
        objects: the views' memoized references and the interned subscription. The memo is keyed
        by identity (each entry keeps its two sets alive, so their ids stay theirs): keyed by value,
        a set equal to a remembered one but not the same object (a fleet reconnecting to classes
        generated again) was compared element by element on every lookup, ~3,000 names per
        stream. A repeated question costs one dictionary lookup and two identity checks.
        """
        key = (id(subscribed), id(needed))
        found = self._covered.get(key)
        if found is None or found[0] is not subscribed or found[1] is not needed:
            if len(self._covered) >= COVERED_LIMIT:
                self._covered.clear()
            found = self._covered[key] = (subscribed, needed, needed <= subscribed)
        return found[2]

    def by_wire(self, key: bytes) -> tuple[bytes, frozenset[str] | None] | None:
        """The shared key bytes and subscription seen before for these request bytes, if any."""
        return self._wire.get(key)

    @staticmethod
    def _fingerprint(raw: bytes, start: int) -> tuple[int, bytes, bytes]:
        return len(raw) - start, raw[start:start + 64], raw[-64:]

    def by_tail(self, raw: bytes, start: int) -> frozenset[str] | None:
        """The subscription remembered for `raw[start:]`, compared in place (no copy, no hash of it)."""
        size = len(raw) - start
        for key, names in self._tails.get(self._fingerprint(raw, start), ()):
            if len(key) == size and raw.startswith(key, start):
                return names
        return None

    def remember_tail(self, raw: bytes, start: int, names: frozenset[str]) -> None:
        """Remember that a delta request ending in `raw[start:]` subscribes to exactly `names`."""
        self._make_room()
        self._wire_bytes += len(raw) - start
        self._tails.setdefault(self._fingerprint(raw, start), []).append((raw[start:], names))

    def _make_room(self) -> None:
        if len(self._wire) + len(self._tails) >= self.limit or self._wire_bytes > WIRE_BYTES_LIMIT:
            self._wire.clear()
            self._tails.clear()
            self._wire_bytes = 0

    def remember_wire(self, key: bytes, names: frozenset[str] | None) -> tuple[bytes, frozenset[str] | None]:
        self._make_room()
        self._wire_bytes += len(key)
        found = self._wire[key] = (key, names)
        return found


class Nonces:
    """Nonces unique to one stream, so a nonce from an earlier connection is never current."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"


class SessionBase(Generic[StateT]):
    """What both protocol variants share: per-type state, the order of a push, ACK bookkeeping."""

    protocol = ""

    def __init__(self, status: StreamStatus, registry: StatusRegistry,
                 subscriptions: Subscriptions | None = None) -> None:
        self.types: dict[str, StateT] = {}
        self.status = status
        self.registry = registry
        self.subscriptions = Subscriptions() if subscriptions is None else subscriptions
        self.nonces = Nonces()
        # type_url -> nonce of the last response that is not yet ACKed or NACKed
        self.pending: dict[str, str] = {}
        # type_url -> the version carried by the response with that nonce
        self._pending_version: dict[str, str] = {}
        self.removals_waiting = False  # the last push skipped removals because responses were pending
        self._order: list[str] | None = None  # the types in push order (types are only ever added)
        # (CDS version, EDS subscription) last found warm: the check then costs one comparison.
        self._warm_ok: tuple[str, frozenset[str] | None] | None = None

    @staticmethod
    def parse(raw: bytes) -> Any:
        """The request message of this protocol from its bytes."""
        raise NotImplementedError

    def handle_wire(self, raw: bytes) -> bool:
        """`handle` for a request as received (the bytes gRPC read)."""
        return self.handle(self.parse(raw), raw)

    def handle(self, request: Any, wire: bytes | None = None) -> bool:
        """Apply a request (`wire`: the bytes it was parsed from, if known); True if it may call for a response."""
        raise NotImplementedError

    def responses(self, snapshot: Snapshot) -> list[bytes]:
        """Encoded responses to send now: updates in push order, then removals once all settled.

        Listeners and routes wait while the proxy warms clusters (`_warming`): a route to a new
        cluster must not arrive before that cluster's endpoints, or Envoy answers 503 (no cluster)
        until they do. Push order alone does not give this: the endpoints of a new cluster can
        only be sent once the proxy has asked for them, after it took the CDS update.
        """
        order = self._order
        if order is None or len(order) != len(self.types):
            order = self._order = ordered_types(self.types)
        now = time.monotonic_ns()  # when this stream took the snapshot into account (what `meshctl wait` reads)
        out: list[bytes] = []
        held_back = False  # decided after clusters and endpoints, which come first in push order
        warming: bool | None = None  # asked once per call, when the first listener or route type comes up
        types, wholes, statuses = self.types, snapshot.types, self.status.types
        for t in order:
            if t in _WAIT_FOR_CLUSTERS:
                if warming is None:
                    warming = self._warming()
                if warming or held_back:
                    held_back = True
                    continue
            # The very view last reconciled, and nothing asked since (that clears `seen`): its
            # version stands; only the moment the stream confirmed it moves. Checked here, for both
            # protocols and without a call: a fast path replaces one type of a snapshot, so at
            # 2,000 streams per push most types of most streams end here.
            state = types[t]
            if state.seen and wholes.get(t, EMPTY_SET) is state.seen_whole:
                (statuses.get(t) or self.status.of(t)).current_at = now
                continue
            if r := self._updates(t, snapshot):
                out.append(r)
        if held_back:  # their removals wait too: a SotW removal resends the whole listener set
            order = [t for t in order if t not in _WAIT_FOR_CLUSTERS]
        if self.pending:
            # Removals wait while anything is unacknowledged: remember whether any are due, so the
            # ACK that settles the last response wakes the writer only then.
            self.removals_waiting = False
            for t in order:
                state = types[t]
                # The proxy holds exactly the view last reconciled from this very type (the usual
                # case): nothing of it can be due for removal, without asking the protocol.
                if state.held is state.seen_view and state.seen and wholes.get(t, EMPTY_SET) is state.seen_whole:
                    continue
                if self._removal_due(t, snapshot):
                    self.removals_waiting = True
                    break
        else:
            self.removals_waiting = False
            out += [r for t in order if (r := self._removals(t, snapshot))]
        return out

    def _warming(self) -> bool:
        """Whether the proxy was sent EDS clusters whose endpoints it has not asked for yet.

        Envoy subscribes to a new cluster's ClusterLoadAssignment after it takes the CDS update,
        and the EDS answer then goes out first (push order); until that request arrives, the new
        clusters are warming. Cost: one comparison while the CDS version and the EDS subscription
        are those last found warm; otherwise a subset test over the clusters' EDS names (shared
        sets keep theirs), answered once per pair of shared sets (`Subscriptions.covers`).
        """
        cds = self.types.get(typeurls.CLUSTER)
        if cds is None or not cds.held:
            return False
        subscribed = self._eds_subscription()
        ok = self._warm_ok
        version = cds.held_version
        if ok is not None and version and ok[0] == version and ok[1] is subscribed:
            return False
        if subscribed is not None:
            held = cds.held
            if isinstance(held, View):  # shared references: the answer is shared too
                if not self.subscriptions.covers(subscribed, held.refs()):
                    return True
            elif not frozenset(n for r in held.values() for n in r.refs) <= subscribed:
                return True
        self._warm_ok = (version, subscribed)
        return False

    def _eds_subscription(self) -> frozenset[str] | None:
        """The ClusterLoadAssignment names the proxy asked for; None when it asked for all of them
        or uses no EDS at all (a client that never asks is never held back: Envoy always asks)."""
        raise NotImplementedError

    def _removal_due(self, type_url: str, snapshot: Snapshot) -> bool:
        """Whether the proxy holds resources of the type that the snapshot no longer has."""
        raise NotImplementedError

    def _settled_with_removals(self, settled: bool) -> bool:
        """Whether a request that settled the last pending response should wake the writer: only
        if the removal phase was skipped for it (a plain ACK otherwise calls for nothing)."""
        return settled and not self.pending and self.removals_waiting

    def _updates(self, type_url: str, snapshot: Snapshot) -> bytes | None:
        """The type's update response, if one is due; called by `responses` only for a type that is
        not the view last reconciled (or that must be reconciled again)."""
        raise NotImplementedError

    def _removals(self, type_url: str, snapshot: Snapshot) -> bytes | None:
        raise NotImplementedError

    def _respond(self, shared_on: View | None, key: Hashable, build: Callable[[str], bytes]) -> tuple[bytes, str]:
        """The encoded response `build(nonce)` and its nonce, shared with other streams if possible.

        Why: at mission scale thousands of streams take the same step at once (the same view from
        the same held version); one bytes object for all of them, instead of a copy of up to a
        megabyte each, keeps a push's memory and copying independent of the number of proxies.
        `key` must determine the bytes given the view (`shared_on`). Shared nonces come from one
        server-wide counter, so they are unique across responses; a stream that already got this
        very response gets a private one with a fresh nonce of its own.
        """
        if shared_on is None:
            nonce = self.nonces.next()
            return build(nonce), nonce
        entry = shared_on.responses.get(key)
        if entry is None:
            nonce = self.subscriptions.nonces.next()
            entry = SharedResponse(build(nonce), nonce)
            if len(shared_on.responses) >= SHARED_RESPONSES:
                shared_on.responses.clear()
            self.subscriptions.sharing.add(shared_on)
            shared_on.responses[key] = entry
        stream = self.status.stream_id
        if stream in entry.streams:
            nonce = self.nonces.next()
            return build(nonce), nonce
        entry.streams.add(stream)
        return entry.data, entry.nonce

    def _sent(self, type_url: str, version: str, nonce: str) -> None:
        self.pending[type_url] = nonce
        self._pending_version[type_url] = version
        self.registry.record_sent(self.status, type_url, version, nonce)

    def _acknowledge(self, type_url: str, nonce: str, error: str | None) -> None:
        """Settle the pending response `nonce`: an ACK, or a NACK carrying Envoy's message."""
        version = self._pending_version.pop(type_url, "")
        self.pending.pop(type_url, None)
        if error is None:
            standing = self.status.types.get(type_url)  # a NACK to clear? (rare: asked only then)
            clears = standing is None or not standing.nack_message or self._clears_nack(type_url, version)
            self.registry.record_ack(self.status, type_url, version, clears)
        else:
            self.registry.record_nack(self.status, type_url, version, error)

    def _clears_nack(self, type_url: str, version: str) -> bool:
        """Whether an ACK of `version` ends a standing NACK of the type: always for full-state
        responses (SotW); the delta session says when."""
        return True

    def _holding(self, type_url: str, version: str) -> None:
        """After a request that left nothing pending for the type: the proxy holds `version`."""
        if type_url not in self.pending and version:
            self.registry.record_holding(self.status, type_url, version)

    def _set_current(self, type_url: str, version: str) -> None:
        self.status.of(type_url).current_version = version

    @staticmethod
    def _view(state: StateT, type_url: str, snapshot: Snapshot, names: frozenset[str] | None) -> View:
        """The view of `names` (None: wildcard) in the snapshot: the one `_updates` reconciled, if current."""
        whole = snapshot.of(type_url)
        return state.seen_view if whole is state.seen_whole and state.seen else whole.view(names)

    @staticmethod
    def _error_text(request: object) -> str | None:
        if not request.HasField("error_detail"):  # type: ignore[attr-defined]
            return None
        detail = request.error_detail  # type: ignore[attr-defined]
        return str(detail.message) or f"code {detail.code}"

