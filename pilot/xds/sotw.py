"""State-of-the-world ADS session: one proxy's subscriptions, what it holds, what to send.

Rules kept here (xDS protocol): every response carries a fresh nonce; a request whose nonce
is not the latest one sent for its type is stale and ignored; `error_detail` makes a request
a NACK and nothing is resent until the config changes; LDS/CDS responses carry the full set,
EDS/RDS responses only the subscribed resources that changed or were newly subscribed;
removals from LDS/CDS wait until every other response was acknowledged (make before break).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pilot.xds import typeurls
from pilot.xds.session import SessionBase, existing, ordered_types, version_of, versions
from pilot.xds.snapshot import Resource, Snapshot
from pilot.xds.wire import str_field


@dataclass
class _TypeState:
    names: set[str] | None  # None: wildcard (every resource of the type)
    held: dict[str, Resource] = field(default_factory=dict)  # what the proxy was sent
    held_version: str = ""
    last_nonce: str = ""
    force_all: bool = True  # a new request: answer even if nothing changed
    force_names: set[str] = field(default_factory=set)  # newly subscribed names


def _subscription(type_url: str, names: list[str]) -> set[str] | None:
    if type_url in typeurls.WILDCARD_TYPES and (not names or "*" in names):
        return None
    return set(names) - {"*"}


class SotwSession(SessionBase):
    protocol = "sotw"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.types: dict[str, _TypeState] = {}

    def handle(self, request: Any) -> None:
        type_url: str = request.type_url
        names = _subscription(type_url, list(request.resource_names))
        state = self.types.get(type_url)
        if state is None or not state.last_nonce:
            # First request of a type on this stream: never stale, whatever nonce it carries.
            self.types[type_url] = _TypeState(names=names)
            return
        nonce: str = request.response_nonce
        if not nonce:
            state.force_all = True  # the proxy asks afresh
        elif nonce != state.last_nonce:
            self.registry.record_stale(type_url)
            return
        elif type_url in self.pending:
            self._acknowledge(type_url, nonce, self._error_text(request))
        self._resubscribe(state, names)

    @staticmethod
    def _resubscribe(state: _TypeState, names: set[str] | None) -> None:
        if names is None or state.names is None:
            if names != state.names:
                state.force_all = True
            state.names = names
            return
        state.force_names |= names - state.names
        for gone in state.names - names:
            state.held.pop(gone, None)
            state.force_names.discard(gone)
        state.names = names

    def responses(self, snapshot: Snapshot) -> list[bytes]:
        """Encoded responses to send now: updates in push order, then removals if all settled."""
        order = ordered_types(self.types)
        out = [r for t in order for r in self._updates(t, snapshot)]
        if not self.pending:
            out += [r for t in order for r in self._removals(t, snapshot)]
        return out

    def _updates(self, type_url: str, snapshot: Snapshot) -> list[bytes]:
        state = self.types[type_url]
        if state.names is None:
            current = dict(snapshot.of(type_url).resources)
            self._set_current(type_url, version_of(versions(current)))
            # Keep resources that are going away until the removal phase.
            target = {**{n: r for n, r in state.held.items() if n not in current}, **current}
            if not state.force_all and versions(target) == versions(state.held):
                return []
            return [self._send(type_url, state, target, target)]
        view = existing(snapshot, type_url, state.names)
        self._set_current(type_url, version_of(versions(view)))
        changed = {
            n: r for n, r in view.items()
            if state.force_all or n in state.force_names or n not in state.held or state.held[n].version != r.version
        }
        if not changed:
            return []
        return [self._send(type_url, state, {**state.held, **changed}, changed)]

    def _removals(self, type_url: str, snapshot: Snapshot) -> list[bytes]:
        state = self.types[type_url]
        if state.names is not None:
            return []  # EDS/RDS: resources leave when the proxy unsubscribes
        current = dict(snapshot.of(type_url).resources)
        if not set(state.held) - set(current):
            return []
        return [self._send(type_url, state, current, current)]

    def _send(self, type_url: str, state: _TypeState, held: dict[str, Resource], body: dict[str, Resource]) -> bytes:
        version = version_of(versions(held))
        nonce = self._sent(type_url, version)
        state.held, state.held_version, state.last_nonce = held, version, nonce
        state.force_all = False
        state.force_names.clear()
        entries = b"".join(body[n].sotw_entry for n in sorted(body))
        return str_field(1, version) + entries + str_field(4, type_url) + str_field(5, nonce)
