"""Config changes followed from ingest to the proxies: change ids, OpenTelemetry traces, push status.

A change begins with the first store write after the previous push (a file event, a watch
event) and gets an id; the pusher's debounce gathers more writes into it. It is then built,
generated and published, and streams write it to their proxies. `ChangeTracker` keeps that
story: the id (the pusher sets it as `pilot.logs.change_id` while it handles the change), the last
push's summary (`/debug/push_status`), per-proxy convergence (`pilot_proxy_convergence_time`),
and, when tracing is on, one trace per change:

    config change (root: meshctl.change_id, kinds, trigger, classes, proxies)
    ├── ingest    first write -> debounce end (writes, sources, kinds)
    ├── build     build_mesh (in a worker thread)
    ├── generate  every watched class generated and published (classes, errors, eds_only): one
    │             summary span, not one per class (2,000 spans per change would cost more than the push)
    └── push      publishing start -> the last stream's write (events first_write, last_write; proxies)

A change's writes are collected for `settle` seconds after it is published (or until the next
change is published), then its trace ends. Spans go to an OTLP/HTTP collector
(`PilotSettings.otlp_endpoint`) through the SDK's batch processor, off the event loop.

Concurrency: everything runs on the event loop except `span("build")`, which the mesh build
opens in its worker thread (the SDK's spans are thread-safe). Cost when tracing is off: per
store write a set insertion; per push a few dictionary updates; per stream write a set lookup.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from pilot.config.store import ConfigStore
from pilot.metrics import IstioPushMetrics, IstioXdsMetrics

SERVICE_NAME = "pilot"
SETTLE = 1.0  # seconds a published change keeps collecting stream writes before its trace ends
KUBE_CONFIG_SOURCE = "kubernetes"
KUBE_REGISTRY_SOURCE = "kubernetes-registry"


def tracer_provider(otlp_endpoint: str | None, processor: SpanProcessor | None = None) -> TracerProvider | None:
    """A provider exporting to `otlp_endpoint` (OTLP/HTTP protobuf, e.g. http://host:4318/v1/traces)
    and/or `processor` (tests: an in-memory exporter); None when neither: tracing off."""
    if not otlp_endpoint and processor is None:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    if otlp_endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:  # xds-protos ships an older copy of the same opentelemetry/proto files
            raise RuntimeError(
                f"the OTLP exporter cannot load ({exc}): xds-protos installed its own older "
                "opentelemetry/proto modules over opentelemetry-proto's; fix with "
                "`pip install --force-reinstall --no-deps opentelemetry-proto`") from None

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint),
                                                       schedule_delay_millis=500))
    if processor is not None:
        provider.add_span_processor(processor)
    return provider


@dataclass
class Change:
    """One config change, from its first store write to its last stream write."""

    id: str
    started: float  # perf_counter of the first write
    started_wall: float  # time.time() of the first write
    kinds: set[str] = field(default_factory=set)  # kinds whose effective config changed (the store's)
    written_kinds: set[str] = field(default_factory=set)  # kinds the sources wrote (maybe unchanged)
    sources: set[str] = field(default_factory=set)
    writes: int = 0
    root: Any = None  # the trace's root span (None: tracing off)
    ingest: Any = None
    push: Any = None
    summary: dict[str, Any] = field(default_factory=dict)  # what /debug/push_status shows
    streams: set[int] = field(default_factory=set)  # streams that wrote this change
    types: dict[str, int] = field(default_factory=dict)  # responses written per type (CDS, ...)
    first_write: int = 0  # time_ns
    last_write: int = 0
    finished: bool = False


class ChangeTracker:
    """Change ids, the last push's status, convergence times and (optionally) traces; see the module docstring."""

    def __init__(self, provider: TracerProvider | None = None, *, settle: float = SETTLE,
                 xds_metrics: IstioXdsMetrics | None = None) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("meshctl.pilot") if provider is not None else None
        self.settle = settle
        self.xds_metrics = xds_metrics
        self.open: Change | None = None  # gathering writes, not pushed yet
        self.current: Change | None = None  # the change being pushed or last pushed
        self._finish: asyncio.TimerHandle | None = None

    # -- ingest ---------------------------------------------------------------------------------
    def ingested(self, source: str, kind: str, event: str) -> None:
        """A store write changed `kind` (event add/update/delete) from `source`: opens a change if none is."""
        change = self.open
        if change is None:
            change = self.open = self._new_change()
        change.written_kinds.add(kind)
        change.sources.add(source)
        change.writes += 1

    def _new_change(self) -> Change:
        change = Change(secrets.token_hex(8), time.perf_counter(), time.time())
        if self.tracer is not None:
            change.root = self.tracer.start_span("config change", attributes={"meshctl.change_id": change.id})
            change.ingest = self._child(change, "ingest")
        return change

    def _child(self, change: Change, name: str, **kwargs: Any) -> Any:
        if self.tracer is None:
            return None
        return self.tracer.start_span(name, context=trace.set_span_in_context(change.root), **kwargs)

    @property
    def active(self) -> Change | None:
        """The change a mesh build belongs to: the one gathering writes, else the one being pushed."""
        return self.open or self.current

    # -- push -----------------------------------------------------------------------------------
    def begin(self, kinds: frozenset[str] | None, triggers: Iterable[str]) -> Change:
        """The debounce ended: the open change (a new one for a rebuild without writes) is pushed now."""
        change = self.open or self._new_change()
        self.open = None
        if self.current is not None and not self.current.finished:
            self.finish(self.current)
        self.current = change
        change.kinds = set(kinds) if kinds is not None else set(change.written_kinds)
        change.summary = {"change_id": change.id, "trigger": list(triggers), "kinds": sorted(change.kinds),
                          "sources": sorted(change.sources), "writes": change.writes}
        if change.ingest is not None:
            change.ingest.set_attributes({"meshctl.writes": change.writes, "meshctl.kinds": sorted(change.kinds),
                                          "meshctl.sources": sorted(change.sources)})
            change.ingest.end()
        if change.root is not None:
            change.root.set_attributes({"meshctl.kinds": sorted(change.kinds),
                                        "meshctl.trigger": change.summary["trigger"]})
        return change

    @contextlib.contextmanager
    def span(self, name: str, change: Change | None = None, attributes: Mapping[str, Any] | None = None,
             ) -> Iterator[Any]:
        """A child span of `change` (default: the active one); yields None when tracing is off."""
        change = change or self.active
        if self.tracer is None or change is None or change.root is None:
            yield None
            return
        span = self._child(change, name, attributes=dict(attributes or {}))
        try:
            yield span
        finally:
            span.end()

    def publishing(self, change: Change) -> None:
        """Publishing starts: the push span opens (it ends with the last write)."""
        if change.root is not None:
            change.push = self._child(change, "push")

    def published(self, change: Change, summary: Mapping[str, Any]) -> None:
        """Every class is published; writes are collected for `settle` seconds, then the trace ends."""
        change.summary.update(summary)
        if change.root is not None:
            change.root.set_attributes({f"meshctl.{k}": v for k, v in summary.items()
                                        if isinstance(v, int | float | str | bool)})
        if self._finish is not None:
            self._finish.cancel()
        try:
            self._finish = asyncio.get_running_loop().call_later(self.settle, self.finish, change)
        except RuntimeError:  # no loop (a synchronous rebuild): nothing will write it
            self.finish(change)

    def written(self, stream_id: int, connected_at: float, types: Iterable[str]) -> None:
        """A stream wrote responses for a new snapshot (`types`: short names). Counts the change's
        proxies and writes, and records convergence once per proxy connected before the change."""
        change = self.current
        if change is None:
            return
        now = time.time_ns()
        for short in types:
            change.types[short] = change.types.get(short, 0) + 1
        if stream_id in change.streams or connected_at >= change.started_wall:
            return
        change.streams.add(stream_id)
        change.first_write = change.first_write or now
        change.last_write = now
        if self.xds_metrics is not None:
            self.xds_metrics.convergence.observe(time.perf_counter() - change.started)
        if change.push is not None and len(change.streams) == 1:
            change.push.add_event("first_write", timestamp=now)

    def finish(self, change: Change) -> None:
        """End the change's trace (its push span at the last write) and freeze its summary."""
        if change.finished:
            return
        change.finished = True
        change.summary.update({"proxies": len(change.streams), "responses": dict(sorted(change.types.items()))})
        if change.root is None:
            return
        end = max(change.last_write, time.time_ns())
        if change.push is not None:
            if change.last_write:
                change.push.add_event("last_write", timestamp=change.last_write)
            change.push.set_attribute("meshctl.proxies", len(change.streams))
            change.push.end(end_time=change.last_write or None)
        change.root.set_attribute("meshctl.proxies", len(change.streams))
        change.root.end(end_time=end)

    def push_status(self) -> dict[str, Any]:
        """The last (or current) push, for /debug/push_status; empty before the first."""
        change = self.current
        if change is None:
            return {}
        return {**change.summary, "proxies": len(change.streams), "responses": dict(sorted(change.types.items())),
                "complete": change.finished}

    def close(self) -> TracerProvider | None:
        """Pilot stops: finish the current change and stop tracing. Returns the provider, for the caller
        to `shutdown()` (it flushes to the collector: blocking I/O, so off the event loop)."""
        if self._finish is not None:
            self._finish.cancel()
            self._finish = None
        if self.current is not None:
            self.finish(self.current)
        provider, self.provider, self.tracer = self.provider, None, None
        return provider


class ObservedStore(ConfigStore):
    """A ConfigStore that reports each write to a `ChangeTracker` and counts Istio's ingest metrics:
    `pilot_k8s_cfg_events{type,event}` (the Kubernetes config source), `pilot_k8s_reg_events{type,event}`
    (the Kubernetes service registry) and `pilot_inbound_updates{type}` (every source).

    Cost: a counter increment per object written; `replace_source` reports the objects the store's
    own comparison found (`ConfigStore._written`)."""

    def __init__(self, changes: ChangeTracker, metrics: IstioPushMetrics, endpoint_kinds: frozenset[str]) -> None:
        super().__init__()
        self.changes = changes
        self.istio = metrics
        self.endpoint_kinds = endpoint_kinds

    def apply(self, obj: Any, source_id: str = "api") -> bool:
        event = "update" if obj.key in self._by_source.get(source_id, {}) else "add"
        changed = super().apply(obj, source_id)
        self._observe(source_id, [(obj.key[0], event)], changed)
        return changed

    def delete(self, kind: str, namespace: str, name: str, source_id: str = "api") -> bool:
        held = (kind, namespace, name) in self._by_source.get(source_id, {})
        changed = super().delete(kind, namespace, name, source_id)
        if held:
            self._observe(source_id, [(kind, "delete")], changed)
        return changed

    def _written(self, source_id: str, events: list[tuple[str, str]], changed: bool) -> None:
        self._observe(source_id, events, changed)  # `replace_source`: the store's own comparison

    def _observe(self, source: str, events: list[tuple[str, str]], changed: bool) -> None:
        counter = {KUBE_CONFIG_SOURCE: self.istio.cfg_events, KUBE_REGISTRY_SOURCE: self.istio.reg_events}.get(source)
        for kind, event in events:
            if counter is not None:
                counter.inc(kind, event)
            self.istio.inbound.inc(_inbound_type(kind, event, self.endpoint_kinds))
            if changed:
                self.changes.ingested(source, kind, event)


def _inbound_type(kind: str, event: str, endpoint_kinds: frozenset[str]) -> str:
    """Istio's `pilot_inbound_updates` type: eds, svc, svcdelete or config."""
    if kind in endpoint_kinds:
        return "eds"
    if kind in ("ServiceEntry", "Service"):
        return "svcdelete" if event == "delete" else "svc"
    return "config"

