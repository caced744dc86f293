"""State-of-the-world ADS session: one proxy's subscriptions, what it holds, what to send.

Rules kept here (xDS protocol): every response carries a fresh nonce; a request whose nonce
is not the latest one sent for its type is stale and ignored; `error_detail` makes a request
a NACK and nothing is resent until the config changes; LDS/CDS responses carry the full set,
EDS/RDS responses only the subscribed resources that changed or were newly subscribed;
removals from LDS/CDS wait until every other response was acknowledged (make before break).

Cost: a plain ACK needs no answer, and a type whose view did not change since the session
last looked at it is skipped by comparing one version string, so a push costs O(changes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pilot.xds import typeurls
from pilot.xds.session import SessionBase, version_of, versions
from pilot.xds.snapshot import Resource, Snapshot
from pilot.xds.wire import str_field


@dataclass
class _TypeState:
    names: frozenset[str] | None  # None: wildcard (every resource of the type)
    held: dict[str, Resource] = field(default_factory=dict)  # what the proxy was sent
    held_version: str = ""
    # What the proxy had when it last ACKed: a NACK means it kept exactly this.
    acked: dict[str, Resource] = field(default_factory=dict)
    acked_version: str = ""
    last_nonce: str = ""
    seen: str = ""  # the view version this state was last reconciled with
    force_all: bool = True  # a new request: answer even if nothing changed
    force_names: set[str] = field(default_factory=set)  # newly subscribed names
    requested: list[str] = field(default_factory=list)  # the names of the last request, as sent


def _subscription(type_url: str, names: list[str]) -> frozenset[str] | None:
    if type_url in typeurls.WILDCARD_TYPES and (not names or "*" in names):
        return None
    return frozenset(names).difference(("*",))


class SotwSession(SessionBase[_TypeState]):
    protocol = "sotw"

    def handle(self, request: Any) -> bool:
        """Apply a request; True if it may call for a response (False: stale, or a plain ACK)."""
        type_url: str = request.type_url
        state = self.types.get(type_url)
        requested = request.resource_names
        same = state is not None and requested == state.requested
        # An ACK repeats the names in the same order: one list comparison, no set built or hashed.
        names = state.names if same and state is not None else self._names(type_url, requested)
        if state is None or not state.last_nonce:
            # First request of a type on this stream: never stale, whatever nonce it carries.
            self.types[type_url] = _TypeState(names=names, requested=list(requested))
            return True
        nonce: str = request.response_nonce
        if not nonce:
            state.force_all = True  # the proxy asks afresh
        elif nonce != state.last_nonce:
            self.registry.record_stale(type_url)
            return False
        settled = type_url in self.pending
        if settled:
            error = self._error_text(request)
            self._acknowledge(type_url, nonce, error)
            # `held` is never changed in place (a send or a resubscription replaces it), so the
            # two may share one dict.
            if error is None:
                state.acked, state.acked_version = state.held, state.held_version
            else:
                # The proxy kept its last ACKed config; diff the next change against that.
                # `seen` stays, so nothing is resent until the config changes (no NACK loop).
                state.held, state.held_version = state.acked, state.acked_version
        if not same:
            state.requested = list(requested)
        changed = self._resubscribe(state, names)
        if changed:
            self._holding(type_url, state.held_version)  # an unsubscribe needs no response
        # Once every response is settled, deferred removals may be due.
        return state.force_all or changed or (settled and not self.pending)

    def _names(self, type_url: str, requested: Any) -> frozenset[str] | None:
        """The subscription a request names, as the shared object for that set."""
        names = _subscription(type_url, list(requested))
        return None if names is None else self.subscriptions.intern(names)

    @staticmethod
    def _resubscribe(state: _TypeState, names: frozenset[str] | None) -> bool:
        if names is state.names:
            return False
        if names is None or state.names is None:
            state.force_all = True
        else:
            state.force_names |= names - state.names
            state.force_names &= names
            state.held = {n: r for n, r in state.held.items() if n in names}
            state.held_version = version_of(versions(state.held))  # it keys shared change sets
        state.names = names
        state.seen = ""
        return True

    def _updates(self, type_url: str, snapshot: Snapshot) -> bytes | None:
        state = self.types[type_url]
        view = snapshot.view(type_url, state.names)
        self._set_current(type_url, view.version)
        if not state.force_all and view.version == state.seen:
            return None
        state.seen = view.version
        if type_url in typeurls.FULL_STATE_TYPES:
            # The whole subscribed set every time; keep resources going away until the removal phase.
            if type_url == typeurls.CLUSTER:
                self._rewarm(snapshot, state.held, view.resources)
            gone = {n: r for n, r in state.held.items() if n not in view.resources}
            if not gone:
                if not state.force_all and state.held_version == view.version:
                    return None
                return self._send(type_url, state, dict(view.resources), view.resources, view.version)
            target = {**gone, **view.resources}
            if not state.force_all and versions(target) == versions(state.held):
                return None
            return self._send(type_url, state, target, target)
        if state.force_all:
            changed: Mapping[str, Resource] = view.resources
        else:
            changed = snapshot.changes(type_url, state.names, state.held_version, lambda: versions(state.held))
            if state.force_names:
                changed = {**changed, **{n: r for n, r in view.resources.items() if n in state.force_names}}
        state.force_all = False
        state.force_names.clear()
        if not changed:
            return None
        held = {**state.held, **changed}
        # Usually the proxy then holds exactly the view, whose version is already known.
        known = view.version if len(held) == len(view.resources) and held.keys() == view.resources.keys() else None
        return self._send(type_url, state, held, changed, known)

    def _rewarm(self, snapshot: Snapshot, held: Mapping[str, Resource], clusters: Mapping[str, Resource]) -> None:
        """Envoy warms a changed cluster until its endpoints arrive again, changed or not: resend them.

        Called before the CDS response goes out; EDS follows in the same push (push order).
        """
        eds = self.types.get(typeurls.ENDPOINT)
        if eds is None or eds.names is None:
            return
        changed = [n for n, r in clusters.items() if n in held and held[n].version != r.version]
        again = {snapshot.cluster_eds[n] for n in changed if n in snapshot.cluster_eds} & eds.names
        if again:
            eds.force_names |= again
            eds.seen = ""

    def _removals(self, type_url: str, snapshot: Snapshot) -> bytes | None:
        state = self.types[type_url]
        if type_url not in typeurls.FULL_STATE_TYPES:
            return None  # EDS/RDS: resources leave when the proxy unsubscribes
        current = snapshot.view(type_url, state.names)
        if state.held_version == current.version or not set(state.held) - set(current.resources):
            return None
        return self._send(type_url, state, dict(current.resources), current.resources, current.version)

    def _send(
        self, type_url: str, state: _TypeState, held: dict[str, Resource], body: Mapping[str, Resource],
        version: str | None = None,
    ) -> bytes:
        version = version or version_of(versions(held))
        nonce = self._sent(type_url, version)
        state.held, state.held_version, state.last_nonce = held, version, nonce
        state.force_all = False
        state.force_names.clear()
        entries = b"".join(body[n].sotw_entry for n in sorted(body))
        return str_field(1, version) + entries + str_field(4, type_url) + str_field(5, nonce)
