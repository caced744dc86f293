"""State-of-the-world ADS session: one proxy's subscriptions, what it holds, what to send.

Rules kept here (xDS protocol): every response carries a fresh nonce; a request whose nonce
is not the latest one sent for its type is stale and ignored; `error_detail` makes a request
a NACK and nothing is resent until the config changes; LDS/CDS responses carry the full set,
EDS/RDS responses only the subscribed resources that changed or were newly subscribed;
removals from LDS/CDS wait until every other response was acknowledged (make before break).

Cost: a plain ACK needs no answer; an ACK repeating the names it subscribed to is recognised
by comparing the bytes of its name list with the ones this stream sent last (memcmp, no name
is decoded), and a subscription is one interned object shared by every stream asking for the
same names. What a stream holds is a reference to the shared view it was sent, never a copy,
and the changes between two views are computed once per pair of versions (`View.changes_from`),
so a push costs each stream O(changes) plus the bytes it writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from pilot.xds import typeurls
from pilot.xds.resources import EMPTY_SET, Resource, View, version_of
from pilot.xds.session import SessionBase, held_version_of
from pilot.xds.snapshot import Snapshot
from pilot.xds.wire import SOTW_NONCE, ack_nonce, names_region, str_field


@dataclass(slots=True)
class _TypeState:
    names: frozenset[str] | None  # None: wildcard (every resource of the type); interned, shared
    # What the proxy was sent: the shared view itself whenever it holds exactly that (no copy).
    held: Mapping[str, Resource] = EMPTY_SET
    held_version: str = ""
    # What the proxy had when it last ACKed: a NACK means it kept exactly this.
    acked: Mapping[str, Resource] = EMPTY_SET
    acked_version: str = ""
    last_nonce: str = ""
    seen: str = ""  # the view version this state was last reconciled with
    # The snapshot's whole view of the type and the subscription's view of it, as last reconciled:
    # a push replacing another type (the fast paths) finds the same object here and skips the type.
    seen_whole: View | None = None
    seen_view: View = EMPTY_SET
    force_all: bool = True  # a new request: answer even if nothing changed
    # Newly subscribed names; the shared empty frozenset until there are some (a set per type and
    # stream would cost 216 bytes each: ~2 MB at 2,000 streams, for sets that are nearly always empty).
    force_names: AbstractSet[str] = frozenset()
    requested_key: bytes | None = None  # the wire bytes of the last request's names (interned)


# Each known type's URL as an encoded DiscoveryRequest.type_url field, EDS first (its requests
# are the long ones): what `names_region` looks for.
TYPE_FIELDS = {str_field(4, t): t for t in (typeurls.ENDPOINT, typeurls.ROUTE, typeurls.CLUSTER,
                                                typeurls.LISTENER, typeurls.SECRET)}


def _clean_key(raw: bytes) -> bytes | None:
    """The names region of a request (see `names_region`) if it holds every name the request has.

    Only such keys stand for a subscription: an encoder that put names after the type field
    would make the region an incomplete list, so its requests are read the ordinary way.
    """
    region = names_region(raw, TYPE_FIELDS)
    if region is None:
        return None
    start, end, _ = region
    if discovery_pb2.DiscoveryRequest.FromString(raw[:start] + raw[end:]).resource_names:
        return None
    return raw[start:end]


def _subscription(type_url: str, names: list[str]) -> frozenset[str] | None:
    if type_url in typeurls.WILDCARD_TYPES and (not names or "*" in names):
        return None
    return frozenset(names).difference(("*",))


class SotwSession(SessionBase[_TypeState]):
    protocol = "sotw"

    @staticmethod
    def parse(raw: bytes) -> Any:
        return discovery_pb2.DiscoveryRequest.FromString(raw)

    def handle_wire(self, raw: bytes) -> bool:
        """`handle` for a request as received. An ACK repeating this stream's names (the usual
        request, and at mission scale 100 KB of EDS names) is recognised by comparing those bytes
        with the ones the stream sent last (`bytes.startswith` at an offset: a memcmp without a copy;
        comparing through a memoryview goes byte by byte, 100x slower), and only the few other fields
        are decoded: when all that follows the names and type is the nonce (a plain ACK: no error),
        that field alone, without a protobuf message (~2 us of each of 2,000 ACKs per push)."""
        region = names_region(raw, TYPE_FIELDS)
        if region is not None:
            start, end, type_url = region
            state = self.types.get(type_url)
            key = state.requested_key if state is not None else None
            if key is not None and len(key) == end - start and raw.startswith(key, start):
                names = state.names  # type: ignore[union-attr]
                nonce = ack_nonce(raw, end, SOTW_NONCE)
                if nonce is not None:
                    return self._apply(type_url, nonce, None, key, names)
                rest = discovery_pb2.DiscoveryRequest.FromString(raw[:start] + raw[end:])
                if not rest.resource_names and not rest.type_url:  # nothing outside the region adds names
                    return self._apply(type_url, rest.response_nonce, self._error_text(rest), key, names)
        return self.handle(self.parse(raw), raw)

    def handle(self, request: Any, wire: bytes | None = None) -> bool:
        """Apply a request; True if it may call for a response (False: stale, or a plain ACK).

        `wire` is the request as received; with it, repeated name lists are compared as bytes.
        """
        type_url: str = request.type_url
        state = self.types.get(type_url)
        key = _clean_key(wire) if wire is not None else None
        if key is not None and state is not None and key == state.requested_key:
            names, key = state.names, state.requested_key  # an ACK repeating its names: O(1) in Python
        else:
            key, names = self._names(type_url, request, key)
        return self._apply(type_url, request.response_nonce, self._error_text(request), key, names)

    def _apply(self, type_url: str, nonce: str, error: str | None, key: bytes | None,
               names: frozenset[str] | None) -> bool:
        """A request of `type_url` whose subscription is known (`names`, and the wire `key` it was
        read from), acknowledging `nonce` ("": none), NACKing with `error` (None: no error)."""
        state = self.types.get(type_url)
        if state is None or not state.last_nonce:
            # First request of a type on this stream: never stale, whatever nonce it carries.
            self.types[type_url] = _TypeState(names=names, requested_key=key)
            return True
        if not nonce:
            state.force_all = True  # the proxy asks afresh: reconcile again, whatever was seen
            state.seen = ""
        elif nonce != state.last_nonce:
            self.registry.record_stale(type_url)
            return False
        settled = type_url in self.pending
        if settled:
            self._acknowledge(type_url, nonce, error)
            # `held` is never changed in place (a send or a resubscription replaces it), so the
            # two may share one object.
            if error is None:
                state.acked, state.acked_version = state.held, state.held_version
            else:
                # The proxy kept its last ACKed config; diff the next change against that.
                # `seen` stays, so nothing is resent until the config changes (no NACK loop).
                state.held, state.held_version = state.acked, state.acked_version
        state.requested_key = key
        changed = self._resubscribe(state, names)
        if changed:
            self._holding(type_url, state.held_version)  # an unsubscribe needs no response
        # Once every response is settled, deferred removals may be due.
        return state.force_all or changed or self._settled_with_removals(settled)

    def _names(self, type_url: str, request: Any, key: bytes | None) -> tuple[bytes | None, frozenset[str] | None]:
        """The subscription a request names, as the shared object for that set (and its wire key)."""
        if key is not None:
            found = self.subscriptions.by_wire(key)
            if found is not None:
                return found
        names = _subscription(type_url, list(request.resource_names))
        shared = None if names is None else self.subscriptions.intern(names)
        if key is None:
            return None, shared
        return self.subscriptions.remember_wire(key, shared)

    @staticmethod
    def _resubscribe(state: _TypeState, names: frozenset[str] | None) -> bool:
        if names is state.names:
            return False
        if names is None or state.names is None:
            state.force_all = True
        else:
            added = names - state.names
            if added or state.force_names:
                state.force_names = (state.force_names | added) & names
            held = state.held
            # A view restricted to the new names is memoized per subscription: shared, not copied.
            state.held = held.view(names) if isinstance(held, View) else {
                n: r for n, r in held.items() if n in names}
            state.held_version = held_version_of(state.held)  # it keys shared change sets
        state.names = names
        state.seen = ""
        return True

    def _updates(self, type_url: str, snapshot: Snapshot) -> bytes | None:
        state = self.types[type_url]
        whole = snapshot.of(type_url)  # not the view last reconciled: `responses` skipped those
        view = whole.view(state.names)
        state.seen_whole, state.seen_view = whole, view
        self._set_current(type_url, view.version)
        if not state.force_all and view.version == state.seen:
            return None
        state.seen = view.version
        if type_url in typeurls.FULL_STATE_TYPES:
            return self._full_state(type_url, state, snapshot, view)
        forced = bool(state.force_names)  # resources resent on purpose: this stream's own response
        if state.force_all:
            changed: Mapping[str, Resource] = view
        else:
            changed = view.changes_from(state.held, state.held_version)
            if forced:
                changed = {**changed, **{n: r for n in state.force_names if (r := view.get(n)) is not None}}
        state.force_all = False
        state.force_names = frozenset()
        if not changed:
            return None
        # Usually the proxy then holds exactly the view: share it. Otherwise it keeps resources
        # that left the snapshot (SotW EDS/RDS have no removals) until it unsubscribes.
        if not view.gone_from(state.held):
            return self._send(type_url, state, view, changed, view.version, shared_on=None if forced else view)
        return self._send(type_url, state, {**state.held, **changed}, changed)

    def _full_state(self, type_url: str, state: _TypeState, snapshot: Snapshot, view: View) -> bytes | None:
        """The whole subscribed set every time; resources going away stay until the removal phase."""
        if type_url == typeurls.CLUSTER:
            self._rewarm(snapshot, state, view)
        gone = view.gone_from(state.held)
        if not gone:
            if not state.force_all and state.held_version == view.version:
                return None
            return self._send(type_url, state, view, view, view.version, shared_on=view)
        target = {**{n: state.held[n] for n in gone}, **view}
        version = version_of(target)
        if not state.force_all and version == state.held_version:
            return None
        return self._send(type_url, state, target, target, version)

    def _rewarm(self, snapshot: Snapshot, state: _TypeState, clusters: View) -> None:
        """Envoy warms a changed cluster until its endpoints arrive again, changed or not: resend them.

        Called before the CDS response goes out; EDS follows in the same push (push order).
        """
        eds = self.types.get(typeurls.ENDPOINT)
        if eds is None or eds.names is None:
            return
        held = state.held
        changed = [n for n in clusters.changes_from(held, state.held_version) if n in held]
        again = {e for n in changed if (e := snapshot.eds_name(n)) is not None} & eds.names
        if again:
            eds.force_names = eds.force_names | again
            eds.seen = ""

    def _eds_subscription(self) -> frozenset[str] | None:
        eds = self.types.get(typeurls.ENDPOINT)
        return None if eds is None else eds.names

    def _removal_due(self, type_url: str, snapshot: Snapshot) -> bool:
        if type_url not in typeurls.FULL_STATE_TYPES:
            return False
        state = self.types[type_url]
        return bool(self._view(state, type_url, snapshot, state.names).gone_from(state.held))

    def _removals(self, type_url: str, snapshot: Snapshot) -> bytes | None:
        state = self.types[type_url]
        if type_url not in typeurls.FULL_STATE_TYPES:
            return None  # EDS/RDS: resources leave when the proxy unsubscribes
        current = self._view(state, type_url, snapshot, state.names)
        if state.held_version == current.version or not current.gone_from(state.held):
            return None
        return self._send(type_url, state, current, current, current.version, shared_on=current)

    def _send(
        self, type_url: str, state: _TypeState, held: Mapping[str, Resource], body: Mapping[str, Resource],
        version: str | None = None, shared_on: View | None = None,
    ) -> bytes:
        """Encode a response and record it. With `shared_on` (the view `held` becomes), streams
        taking the same step share the bytes: given the view, they depend only on the type, the
        version held before and whether the body is the whole view or its changes."""
        version = version or held_version_of(held)

        def build(nonce: str) -> bytes:
            # One join, one copy: `a + b + c` would copy a megabyte-sized body once per `+`.
            head = [str_field(1, version)]
            tail = [str_field(4, type_url), str_field(5, nonce)]
            if isinstance(body, View):
                return b"".join(head + body.sotw_pieces() + tail)
            return b"".join(head + [piece for n in sorted(body) for piece in body[n].sotw_pieces()] + tail)

        key = (type_url, "whole" if body is shared_on else state.held_version)
        data, nonce = self._respond(shared_on, key, build)
        self._sent(type_url, version, nonce)
        state.held, state.held_version, state.last_nonce = held, version, nonce
        state.force_all = False
        state.force_names = frozenset()
        return data
