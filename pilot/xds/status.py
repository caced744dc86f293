"""What each connected proxy has been sent and what it acknowledged, per resource type.

Streams write their own `StreamStatus` (one writer each, on the event loop); the debug API
reads them all. A NACK is never dropped: it is logged, counted in metrics, and kept here
with Envoy's message until a later response for the same type is ACKed, or until pilot's
config for the proxy returns to the version the proxy holds (the rejected change was undone:
nothing is sent, since the proxy already has it, and the proxy is in sync again). Either
way `nacks` and `last_nack` keep the history.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric

from pilot.metrics import IstioXdsMetrics, LoopCounter, ScrapeTime, xds_type
from pilot.model.proxy import ProxyIdentity
from pilot.xds import typeurls
from pilot.xds.writebudget import WriteBudget
from pilot.xds.writewave import WriteWave

log = logging.getLogger(__name__)


class SyncState(StrEnum):
    SYNCED = "SYNCED"  # the proxy ACKed the latest version of this type
    STALE = "STALE"  # a newer version exists, or the last response is not acknowledged yet
    NACKED = "NACKED"  # the proxy rejected the last response; it keeps serving the previous config
    NOT_SENT = "NOT_SENT"  # the proxy has not asked for this type


@dataclass
class TypeStatus:
    sent_version: str = ""
    sent_nonce: str = ""
    sent_at: float = 0.0
    acked_version: str = ""
    acked_at: float = 0.0
    nack_message: str = ""  # Envoy's message for the last response, while that NACK stands
    nack_version: str = ""
    nacks: int = 0
    last_nack: str = ""  # Envoy's message of the latest NACK, kept after the NACK is cleared
    # What this proxy should have of the type now (its subscription of the latest snapshot);
    # read and written as `current_version`.
    _current: str = ""
    # time.monotonic_ns() when the session last set `current_version` from its class's snapshot:
    # later than the snapshot's publication means the stream has taken that snapshot into account.
    current_at: int = 0

    @property
    def current_version(self) -> str:
        return self._current

    @current_version.setter
    def current_version(self, version: str) -> None:
        """Pilot's version for the proxy changed (sessions set it on every push).

        A standing NACK clears when that version is again the one the proxy ACKed and still
        holds, and the rejected response is the last one sent: the rejected change was undone.
        Pilot sends nothing then (the proxy already has that config), so without this the NACK
        would show forever although acked equals current. Cost: two string compares per push.
        """
        self._current = version
        self.current_at = time.monotonic_ns()
        if (
            self.nack_message
            and self.acked_version
            and version == self.acked_version
            and self.sent_version == self.nack_version
        ):
            # The proxy holds what it ACKed, which is current again: in sync, as after an ACK.
            self.nack_message = self.nack_version = ""
            self.sent_version = self.acked_version

    def state(self) -> SyncState:
        if self.nack_message:
            return SyncState.NACKED
        if not self.sent_nonce and not self.sent_version:  # (a version alone: held since it connected)
            return SyncState.NOT_SENT
        if self.acked_version == self.sent_version == self.current_version:
            return SyncState.SYNCED
        return SyncState.STALE


@dataclass
class StreamStatus:
    """The status of one ADS stream (one connected proxy)."""

    stream_id: int
    identity: ProxyIdentity
    protocol: str  # "sotw" or "delta"
    peer: str
    connected_at: float = field(default_factory=time.time)
    types: dict[str, TypeStatus] = field(default_factory=dict)
    closed_at: float = 0.0  # wall time the stream ended; 0 while connected

    # The types (short names: CDS, ...) of the responses recorded as sent since the server last took
    # them (`take_sent`): the server pairs them with the bytes it writes, for Istio's per-type metrics.
    sent_log: list[str] = field(default_factory=list)
    # The stream's session (set by the server): its per-type subscriptions, for `/debug/adsz`.
    session: Any = field(default=None, repr=False)

    def of(self, type_url: str) -> TypeStatus:
        found = self.types.get(type_url)  # not setdefault: that would build a TypeStatus every call
        if found is None:
            found = self.types[type_url] = TypeStatus()
        return found

    def take_sent(self) -> list[str]:
        taken, self.sent_log = self.sent_log, []
        return taken


class XdsMetrics:
    """Prometheus metrics of the ADS server, registered on the component's own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Updated per response and per ACK, on the event loop: lock-free (`pilot.metrics.LoopCounter`).
        self.pushes = LoopCounter("pilot_xds_pushes", "xDS responses sent", ["type"], registry)
        self.nacks = Counter("pilot_xds_nacks", "xDS responses rejected by proxies", ["type"], registry=registry)
        self.acks = LoopCounter("pilot_xds_acks", "xDS responses acknowledged by proxies", ["type"], registry)
        self.stale_requests = Counter(
            "pilot_xds_stale_nonce_requests", "requests ignored for carrying a stale nonce", ["type"], registry=registry
        )
        self.connected = Gauge("pilot_xds_connected_proxies", "connected ADS streams", registry=registry)
        self.stream_errors = Counter(
            "pilot_xds_stream_errors", "ADS streams ended by an error", ["reason"], registry=registry
        )
        self.istio = IstioXdsMetrics(registry)  # Istio's names (pilot.metrics)
        self.write_budget: WriteBudget | None = None  # the ADS server's, when it has one
        self.write_wave: WriteWave | None = None  # the ADS server's, when ACKs wait for its writes
        ScrapeTime(self._write_families, registry)
        # Labelled children by type URL: `labels()` takes a lock and builds a key, every stream every push.
        self._children: dict[tuple[int, str], Any] = {}
        self._by_type: dict[str, tuple[Any, Any]] = {}  # type name (CDS, ...) -> (push time, config size)
        self._send_time = self.istio.send_time.labels()  # its one series, observed directly per write

    def _write_families(self) -> Iterator[Metric]:
        """The write budget's and the write wave's metrics, when the server has them."""
        if self.write_budget is not None:
            yield from self.write_budget.metric_families()
        if self.write_wave is not None:
            yield from self.write_wave.metric_families()

    def written(self, type_name: str, took: float, made: float, size: int) -> None:
        """Istio's histograms for one response written in `took` seconds: its send time (the write
        alone) and, with its `type_name` (CDS, ...), its push time (`made`, the stream's step that
        made it, plus the write) and config size. Three observations, ~2 µs each on the shared
        2-core machine; the labelled children are looked up once per type."""
        self._send_time.observe(took)
        if not type_name:
            return
        by_type = self._by_type.get(type_name)
        if by_type is None:
            istio, label = self.istio, xds_type(type_name)
            by_type = self._by_type[type_name] = (istio.push_time.labels(label), istio.config_size.labels(label))
        by_type[0].observe(made + took)
        by_type[1].observe(size)

    def of_type(self, counter: Counter | LoopCounter, type_url: str) -> Any:
        """`counter` labelled with the short name of `type_url`, looked up once per type."""
        key = (id(counter), type_url)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(typeurls.short_name(type_url))
        return child


class StatusRegistry:
    """All live streams, for the debug API and proxy-status."""

    def __init__(self, metrics: XdsMetrics, departed: int = 256) -> None:
        self.metrics = metrics
        self._streams: dict[int, StreamStatus] = {}
        self._ids = itertools.count(1)
        # The last `departed` streams that ended, newest last, so `/debug/config_distribution` can
        # say a proxy disconnected before it ACKed a change (bounded: a churn of proxies costs nothing).
        self.departed: collections.deque[StreamStatus] = collections.deque(maxlen=departed)
        # type URL -> (its `pilot_xds_pushes` child, its label in Istio's `pilot_xds_pushes`, short name)
        self._sent_counters: dict[str, tuple[Any, str, str]] = {}

    def open(self, identity: ProxyIdentity, protocol: str, peer: str) -> StreamStatus:
        status = StreamStatus(next(self._ids), identity, protocol, peer)
        self._streams[status.stream_id] = status
        self.metrics.connected.inc()
        self.metrics.istio.xds.labels(_proxy_version(identity)).inc()
        return status

    def close(self, status: StreamStatus) -> None:
        if self._streams.pop(status.stream_id, None) is not None:
            self.metrics.connected.dec()
            self.metrics.istio.xds.labels(_proxy_version(status.identity)).dec()
            status.session = None  # a departed stream keeps no session state
            status.closed_at = time.time()
            self.departed.append(status)

    def streams(self) -> list[StreamStatus]:
        return list(self._streams.values())

    def record_sent(self, status: StreamStatus, type_url: str, version: str, nonce: str) -> None:
        """Called for every response: its counters are looked up once per type (`_sent_counters`)."""
        ts = status.types.get(type_url) or status.of(type_url)
        ts.sent_version, ts.sent_nonce, ts.sent_at = version, nonce, time.time()
        counters = self._sent_counters.get(type_url)
        if counters is None:
            short = typeurls.short_name(type_url)
            counters = self._sent_counters[type_url] = (
                self.metrics.of_type(self.metrics.pushes, type_url), xds_type(short), short)
        counters[0].inc()
        self.metrics.istio.pushes.inc(counters[1])
        status.sent_log.append(counters[2])

    def record_ack(self, status: StreamStatus, type_url: str, version: str, clears_nack: bool = True) -> None:
        """`clears_nack` False: the ACK does not show the proxy took what it NACKed (a delta ACK of
        a later response that left the rejected resource out), so a standing NACK stays."""
        ts = status.types.get(type_url) or status.of(type_url)
        ts.acked_version, ts.acked_at = version, time.time()
        if clears_nack:
            ts.nack_message = ts.nack_version = ""
        self.metrics.of_type(self.metrics.acks, type_url).inc()

    def record_holding(self, status: StreamStatus, type_url: str, version: str) -> None:
        """The proxy, settled and not NACKing, now holds exactly `version` without a response.

        That happens when it unsubscribes from resources (a cluster went away, so its endpoints
        did): nothing needs sending, and what it holds is its last ACKed set minus those; and when
        a delta proxy comes back holding exactly the current resources (its initial versions).
        """
        ts = status.of(type_url)
        if not ts.nack_message and ts.acked_version == ts.sent_version:
            ts.sent_version = ts.acked_version = version

    def record_nack(self, status: StreamStatus, type_url: str, version: str, message: str) -> None:
        ts = status.of(type_url)
        ts.nack_message, ts.nack_version = message or "(no message)", version
        ts.last_nack = ts.nack_message
        ts.nacks += 1
        self.metrics.of_type(self.metrics.nacks, type_url).inc()
        self.metrics.istio.reject(typeurls.short_name(type_url), status.identity.node_id)
        log.warning(
            "NACK from %s for %s version %s: %s",
            status.identity.node_id, typeurls.short_name(type_url), version, message,
        )

    def record_stale(self, type_url: str) -> None:
        self.metrics.of_type(self.metrics.stale_requests, type_url).inc()
        self.metrics.istio.expired_nonce.inc(xds_type(typeurls.short_name(type_url)))

    def syncz(self) -> list[dict[str, Any]]:
        """JSON-ready status of every stream, sorted by proxy id."""
        rows = []
        for st in sorted(self._streams.values(), key=lambda s: (s.identity.node_id, s.stream_id)):
            types = {}
            for type_url, ts in sorted(st.types.items(), key=lambda kv: _order(kv[0])):
                types[typeurls.short_name(type_url)] = {
                    "state": ts.state().value,
                    "type_url": type_url,
                    "current_version": ts.current_version,
                    "sent_version": ts.sent_version,
                    "sent_nonce": ts.sent_nonce,
                    "sent_at": ts.sent_at,
                    "acked_version": ts.acked_version,
                    "acked_at": ts.acked_at,
                    "nack": ts.nack_message,
                    "nack_version": ts.nack_version,
                    "nacks": ts.nacks,
                    "last_nack": ts.last_nack,
                }
            ident = st.identity
            rows.append({
                "proxy": ident.node_id,
                "cluster": ident.cluster,
                "namespace": ident.namespace,
                "workload": ident.workload,
                "labels": dict(ident.proxy_class.labels),
                "service_account": ident.service_account,
                "proxy_class": ident.proxy_class.describe(),
                "protocol": st.protocol,
                "peer": st.peer,
                "connected_since": st.connected_at,
                "types": types,
            })
        return rows


def _proxy_version(identity: ProxyIdentity) -> str:
    """Istio's `version` label of `pilot_xds`: the proxy's ISTIO_VERSION metadata (empty when unset)."""
    return str(identity.metadata.get("ISTIO_VERSION", ""))


def _order(type_url: str) -> int:
    return typeurls.PUSH_ORDER.index(type_url) if type_url in typeurls.PUSH_ORDER else len(typeurls.PUSH_ORDER)
