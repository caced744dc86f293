"""Incremental (delta) ADS session: per-resource versions, subscribe/unsubscribe, removals.

The proxy tells what it holds (`initial_resource_versions` on reconnect); only resources
whose version differs are sent. Resources that vanish are named in `removed_resources`
once every pending response is acknowledged (make before break). Subscribed names that do
not exist are reported as removed once, so the proxy does not wait for them. Nonces only
pair ACK/NACK with responses; subscription changes apply whatever the nonce.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pilot.xds import typeurls
from pilot.xds.session import SessionBase, Subscriptions, version_of
from pilot.xds.snapshot import Resource, Snapshot
from pilot.xds.wire import len_field, str_field


@dataclass
class _DeltaType:
    wildcard: bool
    names: set[str] = field(default_factory=set)
    held: dict[str, str] = field(default_factory=dict)  # name -> version the proxy holds
    reported_missing: set[str] = field(default_factory=set)
    seen: str = ""  # the view version this state was last reconciled with
    held_version: str = ""  # the version of exactly what `held` holds, when known ("" otherwise)
    acked: dict[str, str] = field(default_factory=dict)  # what the proxy had at its last ACK
    acked_version: str = ""

    frozen: frozenset[str] | None = None  # `names` as a frozenset, cached while it is unchanged

    def subscription(self, subscriptions: Subscriptions) -> frozenset[str] | None:
        if self.wildcard:
            return None
        if self.frozen is None:
            self.frozen = subscriptions.intern(frozenset(self.names))
        return self.frozen


class DeltaSession(SessionBase[_DeltaType]):
    protocol = "delta"

    def handle(self, request: Any) -> bool:
        """Apply a request; True if it may call for a response (False for a plain ACK)."""
        type_url: str = request.type_url
        subscribe = list(request.resource_names_subscribe)
        state = self.types.get(type_url)
        if state is None:
            wildcard = type_url in typeurls.WILDCARD_TYPES and (not subscribe or "*" in subscribe)
            state = self.types[type_url] = _DeltaType(wildcard=wildcard)
            state.held.update(request.initial_resource_versions)
            state.acked = dict(state.held)
        settled = False
        if request.response_nonce:
            if request.response_nonce == self.pending.get(type_url):
                error = self._error_text(request)
                self._acknowledge(type_url, request.response_nonce, error)
                settled = True
                if error is None:
                    state.acked, state.acked_version = dict(state.held), state.held_version
                else:  # the proxy kept its last ACKed resources; `seen` stays, so no resend loop
                    state.held, state.held_version = dict(state.acked), state.acked_version
            else:
                self.registry.record_stale(type_url)
        for name in subscribe:
            if name == "*":
                state.wildcard = True
            else:
                state.names.add(name)
                state.reported_missing.discard(name)
        for name in request.resource_names_unsubscribe:
            if name == "*":
                state.wildcard = False
            else:
                state.names.discard(name)
                state.held.pop(name, None)
        changed = bool(subscribe or request.resource_names_unsubscribe or request.initial_resource_versions)
        if changed:
            state.seen = state.held_version = ""
            state.frozen = None
        if request.resource_names_unsubscribe:
            self._holding(type_url, version_of(state.held))  # an unsubscribe needs no response
        return changed or state.seen == "" or (settled and not self.pending)

    def _updates(self, type_url: str, snapshot: Snapshot) -> bytes | None:
        state = self.types[type_url]
        snap_view = snapshot.view(type_url, state.subscription(self.subscriptions))
        self._set_current(type_url, snap_view.version)
        if snap_view.version == state.seen:
            return None
        state.seen = snap_view.version
        view = snap_view.resources
        # Streams of a class holding the same thing share one computed change set.
        subscription = state.subscription(self.subscriptions)
        changes = snapshot.changes(type_url, subscription, state.held_version, lambda: state.held)
        changed = list(changes.values())
        missing: list[str] = []
        if len(view) < len(state.names):  # some subscribed names do not exist
            missing = sorted(n for n in state.names - set(view) - set(state.held) - state.reported_missing)
        if not changed and not missing:
            return None
        if type_url == typeurls.CLUSTER:
            self._rewarm(snapshot, state.held, changed)
        state.held.update((r.name, r.version) for r in changed)
        state.held_version = snap_view.version if len(state.held) == len(view) else ""
        state.reported_missing |= set(missing)
        return self._send(type_url, snapshot, state, changed, missing)

    def _rewarm(self, snapshot: Snapshot, held: dict[str, str], changed: list[Resource]) -> None:
        """Envoy warms a changed cluster until its endpoints arrive again: forget that the proxy
        has them, so EDS (next in push order) resends them."""
        eds = self.types.get(typeurls.ENDPOINT)
        if eds is None:
            return
        for cluster in changed:
            name = snapshot.cluster_eds.get(cluster.name)
            if cluster.name in held and name is not None and eds.held.pop(name, None) is not None:
                eds.seen = eds.held_version = ""

    def _removals(self, type_url: str, snapshot: Snapshot) -> bytes | None:
        state = self.types[type_url]
        view = snapshot.view(type_url, state.subscription(self.subscriptions)).resources
        if len(state.held) == len(view):
            return None  # everything held is in view (held never has names outside it but these)
        gone = sorted(set(state.held) - set(view))
        if not gone:
            return None
        for name in gone:
            del state.held[name]
        current = snapshot.view(type_url, state.subscription(self.subscriptions)).version
        state.held_version = current if len(state.held) == len(view) else ""
        return self._send(type_url, snapshot, state, [], gone)

    def _send(
        self, type_url: str, snapshot: Snapshot, state: _DeltaType, changed: list[Resource], removed: list[str]
    ) -> bytes:
        # Usually known (the proxy holds exactly its view); hashing every held version per stream is not free.
        nonce = self._sent(type_url, state.held_version or version_of(state.held))
        entries = b"".join(r.delta_entry for r in sorted(changed, key=lambda r: r.name))
        removals = b"".join(len_field(6, name.encode()) for name in removed)
        return (
            str_field(1, snapshot.version(type_url)) + entries + str_field(4, type_url)
            + str_field(5, nonce) + removals
        )
