"""Was a config change applied? One object's version against what each proxy has ACKed.

Istio answers this with `/debug/config_distribution` and `istioctl x wait`; pilot answers it
from state it keeps anyway, with no table of proxies by objects:

- the store knows the revision at which each object's current content arrived (`ConfigStore.arrival`);
- the pusher knows, per proxy class, the revision of the mesh that last changed the class's
  snapshot and when (`Pusher.class_changes`), and the newest revision it built (`built_revision`);
- each stream's status knows, per type, whether the proxy ACKed what it was last sent
  (`TypeStatus.state`), and when the stream last took its class's snapshot into account
  (`TypeStatus.current_at`).

An object that arrived at revision r is applied to proxy P iff pilot built a mesh from revision
r or later, P's stream has taken in its class's latest snapshot, and P ACKed every type it
subscribes to. P is *affected* iff its class's snapshot changed in a build from revision r or
later; a proxy whose config did not change holds the change trivially and is only counted. The
check is strict: under a stream of further changes, a proxy counts once it holds the newest one.
A proxy whose class pilot could not generate config for keeps its last good config: that is a
failure, reported with the generator's error. Recently ended streams (`StatusRegistry.departed`)
that were affected and had not ACKed are reported as disconnected.

Cost: one pass over the connected streams and their few types per question, nothing per push.
All functions here are pure: `pilot.debug` gathers the inputs on the event loop.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pilot.api import ApiObject
from pilot.model.proxy import ProxyClass
from pilot.xds import typeurls
from pilot.xds.status import StreamStatus, SyncState


class Distribution(StrEnum):
    ACKED = "ACKED"  # the proxy ACKed config that includes the change
    PENDING = "PENDING"  # not built, not sent, or sent and not yet ACKed
    NACKED = "NACKED"  # the proxy rejected config that includes the change (Envoy's message in reason)
    NOT_GENERATED = "NOT_GENERATED"  # pilot's generator failed for the proxy's class: it keeps older config
    DISCONNECTED = "DISCONNECTED"  # the stream ended before the proxy ACKed the change


FAILED = frozenset({Distribution.NACKED, Distribution.NOT_GENERATED})


def content_hash(obj: ApiObject) -> str:
    """A hash of what an object says (spec, labels, annotations), not of its bookkeeping
    (`ApiObject.content`: no status, no resourceVersion, generation, ...).

    meshctl hashes the file it reads the same way, so "pilot holds exactly this content" is a
    string compare. Cost: one JSON dump of the object.
    """
    text = json.dumps(obj.content().to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ProxyDistribution:
    proxy: str
    namespace: str
    workload: str
    state: Distribution
    reason: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"proxy": self.proxy, "namespace": self.namespace, "workload": self.workload,
                "state": self.state.value, "reason": self.reason}


def proxy_distribution(stream: StreamStatus, revision: int, built_revision: int,
                       change: tuple[int, int] | None, generate_error: str | None) -> ProxyDistribution | None:
    """Where the change that arrived at `revision` stands for one connected proxy; None if unaffected.

    `change` is the class's (mesh revision, monotonic ns) of its last snapshot change, `generate_error`
    the pusher's standing error for the class.
    """
    ident = stream.identity

    def row(state: Distribution, reason: str = "") -> ProxyDistribution:
        return ProxyDistribution(ident.node_id, ident.namespace, ident.workload, state, reason)

    if generate_error is not None:
        return row(Distribution.NOT_GENERATED, f"pilot could not generate its config: {generate_error}")
    if built_revision < revision:
        return row(Distribution.PENDING, f"pilot has not built config revision {revision} yet (built {built_revision})")
    if change is None:
        return row(Distribution.PENDING, "no config generated for it yet")
    changed_at, changed_ns = change
    if changed_at < revision:
        return None  # its config did not change: it holds the change trivially
    return row(*_stream_state(stream, changed_ns))


def _stream_state(stream: StreamStatus, changed_ns: int) -> tuple[Distribution, str]:
    if not stream.types:
        return Distribution.PENDING, "it has not asked for config yet"
    pending = ""
    for type_url in sorted(stream.types, key=_order):
        ts = stream.types[type_url]
        short = typeurls.short_name(type_url)
        state = ts.state()
        if state is SyncState.NACKED:
            return Distribution.NACKED, f"{short} rejected: {ts.nack_message}"
        if pending:
            continue
        if ts.current_at < changed_ns:
            pending = "the new config is not sent yet"
        elif state is not SyncState.SYNCED:
            pending = f"{short} sent, waiting for its ACK" if ts.sent_nonce else f"{short} not sent yet"
    return (Distribution.PENDING, pending) if pending else (Distribution.ACKED, "")


def distribution(revision: int, arrived_at: float, built_revision: int, streams: Iterable[StreamStatus],
                 departed: Iterable[StreamStatus], class_changes: Mapping[ProxyClass, tuple[int, int]],
                 errors: Mapping[ProxyClass, str]) -> dict[str, Any]:
    """Every affected proxy's state for the change that arrived at `revision` (wall time `arrived_at`).

    Rows are sorted by proxy id; `unaffected` counts connected proxies whose config did not change.
    A departed stream is listed only if it is its proxy's last one, ended after the change arrived,
    was affected, had not ACKed it, and its proxy has not reconnected.
    """
    rows: list[ProxyDistribution] = []
    connected: set[str] = set()
    unaffected = 0
    for stream in streams:
        connected.add(stream.identity.node_id)
        key = stream.identity.proxy_class
        found = proxy_distribution(stream, revision, built_revision, class_changes.get(key), errors.get(key))
        if found is None:
            unaffected += 1
        else:
            rows.append(found)
    gone: dict[str, ProxyDistribution] = {}
    seen = set(connected)
    for stream in reversed(list(departed)):  # newest first: a proxy's last stream speaks for it
        ident = stream.identity
        if ident.node_id in seen or stream.closed_at < arrived_at:
            continue
        seen.add(ident.node_id)
        change = class_changes.get(ident.proxy_class)
        if change is None:
            continue  # its class is gone from pilot's cache: whether the change touched it is unknown
        was = proxy_distribution(stream, revision, built_revision, change, None)
        if was is not None and was.state is not Distribution.ACKED:
            gone[ident.node_id] = ProxyDistribution(ident.node_id, ident.namespace, ident.workload,
                                                    Distribution.DISCONNECTED, f"disconnected: {was.reason}")
    rows += gone.values()
    rows.sort(key=lambda r: r.proxy)
    counts = {state.value: sum(1 for r in rows if r.state is state) for state in Distribution}
    return {"built_revision": built_revision, "affected": len(rows), "unaffected": unaffected,
            "counts": counts, "proxies": [r.to_dict() for r in rows]}


def _order(type_url: str) -> int:
    order = typeurls.PUSH_ORDER
    return order.index(type_url) if type_url in order else len(order)
