"""Pilot's Prometheus metrics under Istio's names, labels and buckets, defined in one place.

Why: operators already chart istiod (Istio's "Istio Control Plane Dashboard", alerts on
`pilot_total_xds_rejects`, SLOs on `pilot_proxy_convergence_time`); the same names here make
those work unchanged. Facts (names, types, labels, buckets) follow istio/istio
`pilot/pkg/xds/monitoring.go`, `pkg/xds/monitoring.go`, `pilot/pkg/model/push_context.go`,
`pkg/version/stats.go`; meshctl's own older metrics (`pilot_xds_pushes_total{type="CDS"}`,
`pilot_push_seconds`, ...) stay beside them.

Istio exports its counters ("sums") without the `_total` suffix (OpenTelemetry's Prometheus
exporter, `WithoutCounterSuffixes`), e.g. `pilot_xds_pushes{type="cds"}`. prometheus_client always
adds `_total` to a Counter, so sums are an `IstioSum` collector whose families are written as
untyped by prometheus_client and given back their `counter` TYPE line by `exposition`.

Concurrency: everything is updated on pilot's event loop (the pusher, the ADS streams, the
sources) or, for prometheus_client's histograms, from any thread (they lock). What every ADS
write or ACK updates is a lock-free `LoopHistogram` / `LoopCounter`, only ever touched on the
loop. Cost: a dictionary update per increment; label children are looked up once and kept by
the callers that are hot.
"""

from __future__ import annotations

import bisect
import importlib.metadata
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, GCCollector, Histogram, ProcessCollector, Summary
from prometheus_client import exposition as _exposition
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_go_float = cast(Callable[[float], str], floatToGoString)  # a bucket's `le`, as prometheus_client writes it

# Istio's histogram buckets (seconds; bytes for the config size).
PUSH_TIME_BUCKETS = (.01, .1, .5, 1, 3, 5, 10, 20, 30)
SEND_TIME_BUCKETS = (.01, .1, 1, 3, 5, 10, 20, 30)
CONVERGENCE_BUCKETS = (.1, .5, 1, 3, 5, 10, 20, 30)
INIT_BUCKETS = (.01, .1, .5, 1, 3, 5)
CONFIG_SIZE_BUCKETS = (1, 10_000, 1_000_000, 4_000_000, 10_000_000, 40_000_000)

# Istio's `type` label of xDS metrics (`model.GetMetricType`): the lowercase short name.
XDS_TYPES = {"CDS": "cds", "EDS": "eds", "LDS": "lds", "RDS": "rds", "SDS": "sds"}
# Envoy reports rejected config with gRPC status INTERNAL; Istio labels rejects with the code's name.
ENVOY_REJECT_CODE = "Internal"


class ScrapeTime(Collector):
    """Families made when scraped from what some object counts anyway (`families()`; empty while
    there is no such object), so nothing is updated per event: the ADS server's write budget
    and write wave (`pilot.xds.status.XdsMetrics`)."""

    def __init__(self, families: Callable[[], Iterable[Metric]], registry: CollectorRegistry) -> None:
        self.families = families
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        return self.families()


class IstioSum(Collector):
    """A monotonically increasing sum with labels, exposed as Istio does (no `_total` suffix)."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labels = name, documentation, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}
        if name not in SUM_NAMES:
            raise ValueError(f"{name} is not one of Istio's sums (SUM_NAMES)")
        registry.register(self)

    def inc(self, *values: str, amount: float = 1.0) -> None:
        """Add `amount` to the series with these label values (in `labels` order)."""
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name}: label values {values} do not match labels {self.labels}")
        self.values[values] = self.values.get(values, 0.0) + amount

    def value(self, *values: str) -> float:
        return self.values.get(values, 0.0)

    def collect(self) -> Iterable[Metric]:
        family = Metric(self.name, self.documentation, "unknown")
        # A sum without labels is one series, shown from the start (0), as a prometheus_client Counter.
        for values, total in sorted(self.values.items() if self.labels or self.values else [((), 0.0)]):
            family.add_sample(self.name, dict(zip(self.labels, values, strict=True)), total)
        yield family


class _LoopSeries(Collector):
    """What `LoopHistogram` and `LoopCounter` share: one series object per label values, made on
    first use by `_new` and kept, so hot callers look a child up once and update it directly."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str], registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.label_names = name, documentation, tuple(labels)
        self._series: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def _new(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name}: label values {values} do not match labels {self.label_names}")
        found = self._series.get(values)
        if found is None:
            found = self._series[values] = self._new()
        return found


class LoopHistogram(_LoopSeries):
    """A histogram updated from pilot's event loop only: no lock, one bisect and two additions per
    observation, exposed exactly as a prometheus_client `Histogram` (buckets, `_count`, `_sum`).

    Why: every ADS write observes three histograms (~2,000 writes per change at mission scale).
    prometheus_client's `Histogram` takes a lock for its sum and another for the bucket, after a
    Python loop over the bounds: with the counters beside them, 4-8% of pilot's samples in a change.
    Never observe from another thread (nothing serializes the additions).
    """

    def __init__(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        super().__init__(name, documentation, labels, registry)
        # Without labels: the one series, made now (it shows from the start, as prometheus_client's).
        self._only: LoopHistogram.Series | None = None if self.label_names else self.labels()

    class Series:
        """One label set's counts per bucket (not cumulative; the last is +Inf) and sum."""

        __slots__ = ("bounds", "counts", "sum")

        def __init__(self, bounds: tuple[float, ...]) -> None:
            self.bounds = bounds
            self.counts = [0] * (len(bounds) + 1)
            self.sum = 0.0

        def observe(self, amount: float) -> None:
            self.counts[bisect.bisect_left(self.bounds, amount)] += 1  # `le`: a bound holds what equals it
            self.sum += amount

    def _new(self) -> LoopHistogram.Series:
        return self.Series(self.bounds)

    def observe(self, amount: float) -> None:
        """For a histogram without labels."""
        if self._only is None:
            raise ValueError(f"{self.name} has labels {self.label_names}: observe through labels()")
        self._only.observe(amount)

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)
        for values, one in sorted(self._series.items()):
            running, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), one.counts, strict=True):
                running += count
                buckets.append((_go_float(bound), float(running)))
            family.add_metric(list(values), buckets, one.sum)
        yield family


class LoopCounter(_LoopSeries):
    """A labelled counter updated from pilot's event loop only (see `LoopHistogram`), exposed as a
    prometheus_client `Counter` (`<name>_total`)."""

    class Series:
        __slots__ = ("value",)

        def __init__(self) -> None:
            self.value = 0.0

        def inc(self, amount: float = 1.0) -> None:
            self.value += amount

    def _new(self) -> LoopCounter.Series:
        return self.Series()

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.label_names)
        for values, one in sorted(self._series.items()):
            family.add_metric(list(values), one.value)
        yield family


# Istio's sums that pilot exports: the metrics `exposition` types `counter` without `_total`.
SUM_NAMES = frozenset({
    "pilot_xds_pushes", "pilot_total_xds_rejects", "pilot_total_xds_internal_errors", "pilot_xds_expired_nonce",
    "pilot_xds_write_timeout", "pilot_push_triggers", "pilot_inbound_updates", "pilot_k8s_cfg_events",
    "pilot_k8s_reg_events",
    # The admission webhooks' (`injector.metrics`).
    "sidecar_injection_requests_total", "sidecar_injection_success_total", "sidecar_injection_failure_total",
    "sidecar_injection_skip_total", "galley_validation_passed", "galley_validation_failed",
    "galley_validation_http_error",
})


def exposition(registry: CollectorRegistry) -> bytes:
    """Prometheus text format of `registry`, Istio's sums typed `counter` (see the module docstring)."""
    text = _exposition.generate_latest(registry).decode()
    return _UNTYPED.sub(lambda m: f"# TYPE {m[1]} counter" if m[1] in SUM_NAMES else m[0], text).encode()


_UNTYPED = re.compile(r"^# TYPE (\S+) untyped$", re.MULTILINE)


class IstioXdsMetrics:
    """What the ADS server records (istio `pilot/pkg/xds/monitoring.go`, `pkg/xds/monitoring.go`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.xds = Gauge("pilot_xds", "Number of endpoints connected to this pilot using XDS.", ["version"],
                         registry=registry)
        self.pushes = IstioSum("pilot_xds_pushes", "Pilot build and send errors for lds, rds, cds and eds.",
                               ["type"], registry)
        # Observed by every ADS write, on the event loop: lock-free (`LoopHistogram`).
        self.push_time = LoopHistogram("pilot_xds_push_time", "Total time in seconds Pilot takes to push lds, rds, "
                                       "cds and eds.", ["type"], PUSH_TIME_BUCKETS, registry)
        self.send_time = LoopHistogram("pilot_xds_send_time", "Total time in seconds Pilot takes to send generated "
                                       "configuration.", [], SEND_TIME_BUCKETS, registry)
        self.config_size = LoopHistogram("pilot_xds_config_size_bytes", "Distribution of configuration sizes "
                                         "pushed to clients", ["type"], CONFIG_SIZE_BUCKETS, registry)
        # Observed once per proxy and change by its stream's writer, on the event loop: lock-free too.
        self.convergence = LoopHistogram("pilot_proxy_convergence_time", "Delay in seconds between config change "
                                         "and a proxy receiving all required configuration.", [],
                                         CONVERGENCE_BUCKETS, registry)
        self.total_rejects = IstioSum("pilot_total_xds_rejects", "Total number of XDS responses from pilot "
                                      "rejected by proxy.", ["type"], registry)
        self.rejects = {kind: Gauge(f"pilot_xds_{kind}_reject", f"Pilot rejected {kind.upper()} configs.",
                                    ["node", "err"], registry=registry) for kind in ("cds", "eds", "lds", "rds")}
        self.expired_nonce = IstioSum("pilot_xds_expired_nonce", "Total number of XDS requests with an expired "
                                      "nonce.", ["type"], registry)
        self.write_timeout = IstioSum("pilot_xds_write_timeout", "Pilot XDS response write timeouts.", [], registry)

    def reject(self, short_name: str, node: str) -> None:
        """A proxy NACKed a response of type `short_name` (CDS, ...): Istio's total and per-type gauge."""
        kind = xds_type(short_name)
        self.total_rejects.inc(kind)
        gauge = self.rejects.get(kind)
        if gauge is not None:
            gauge.labels(node, ENVOY_REJECT_CODE).inc()


class IstioPushMetrics:
    """What the pusher and the config sources record (istio `pilot/pkg/xds/monitoring.go`,
    `pilot/pkg/model/push_context.go`, the Kubernetes controllers, `pkg/version/stats.go`)."""

    def __init__(self, registry: CollectorRegistry, version: str | None = None) -> None:
        self.debounce_time = Histogram(
            "pilot_debounce_time", "Delay in seconds between the first config enters debouncing and the merged "
            "push request is pushed into the push queue (includes pushcontext_init_seconds).",
            buckets=PUSH_TIME_BUCKETS, registry=registry)
        self.init_time = Histogram("pilot_pushcontext_init_seconds", "Total time in seconds Pilot takes to init "
                                   "pushContext.", buckets=INIT_BUCKETS, registry=registry)
        # Observed once per class and push by the pusher, on the event loop: lock-free (`LoopHistogram`).
        self.queue_time = LoopHistogram("pilot_proxy_queue_time", "Time in seconds, a proxy is in the push queue "
                                        "before being dequeued.", [], CONVERGENCE_BUCKETS, registry)
        # A class whose snapshot could not be generated (or was inconsistent): type "snapshot", since
        # meshctl generates a class's types together; it keeps its last good config.
        self.internal_errors = IstioSum("pilot_total_xds_internal_errors", "Total number of internal XDS errors "
                                        "in pilot.", ["type"], registry)
        self.triggers = IstioSum("pilot_push_triggers", "Total number of times a push was triggered, labeled by "
                                 "reason for the push.", ["type"], registry)
        self.inbound = IstioSum("pilot_inbound_updates", "Total number of updates received by pilot.", ["type"],
                                registry)
        self.services = Gauge("pilot_services", "Total services known to pilot.", registry=registry)
        self.virt_services = Gauge("pilot_virt_services", "Total virtual services known to pilot.",
                                   registry=registry)
        self.cfg_events = IstioSum("pilot_k8s_cfg_events", "Events from k8s config.", ["type", "event"], registry)
        self.reg_events = IstioSum("pilot_k8s_reg_events", "Events from k8s registry.", ["type", "event"], registry)
        # Istio counts these while building listeners and clusters; meshctl's model cannot produce them
        # (one listener per port and one cluster per host from the merged config), so they stay 0.
        for name, text in (
            ("pilot_conflict_inbound_listener", "Number of conflicting inbound listeners."),
            ("pilot_conflict_outbound_listener_tcp_over_current_tcp",
             "Number of conflicting tcp listeners with current tcp listener."),
            ("pilot_duplicate_envoy_clusters", "Duplicate envoy clusters caused by service entries with same "
             "hostname"),
        ):
            Gauge(name, text, registry=registry).set(0)
        Gauge("istio_build", "Istio component build info", ["tag", "component"],
              registry=registry).labels(version or _version(), "pilot").set(1)
        # The process's CPU, memory, open files and start time (process_*; Linux /proc): what the
        # dashboard's Go-runtime panels show for istiod, for a Python process.
        ProcessCollector(registry=registry)
        # Python's garbage collections by generation (python_gc_*): a full collection over a
        # mission-scale heap takes tens to hundreds of milliseconds, so a slow push is read here first.
        GCCollector(registry=registry)


def _version() -> str:
    """meshctl's installed version (the `tag` of `istio_build`)."""
    try:
        return importlib.metadata.version("meshctl")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


def xds_type(short_name: str) -> str:
    """Istio's `type` label for a type's short name: CDS -> cds; unknown types lowercased (only
    then: this runs for every response written)."""
    found = XDS_TYPES.get(short_name)
    return found if found is not None else short_name.lower()


def trigger_types(kinds: frozenset[str] | None, endpoint_kinds: frozenset[str]) -> list[str]:
    """Istio's push trigger reasons for a push caused by changes to `kinds` (None: unknown, a full push).

    Endpoint-only kinds are `endpoint`; service definitions `service`; the rest `config`.
    """
    if kinds is None:
        return ["global"]
    found = set()
    for kind in kinds:
        if kind in endpoint_kinds:
            found.add("endpoint")
        elif kind in SERVICE_KINDS:
            found.add("service")
        else:
            found.add("config")
    return sorted(found)


SERVICE_KINDS = frozenset({"ServiceEntry", "Service"})


def parse_names(text: str) -> Iterator[str]:
    """Metric family names in a Prometheus text exposition (from its `# TYPE` lines)."""
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            yield line.split()[2]


class PushMetrics:
    """The pusher's own metrics (`pilot.push.Pusher`), Istio's push metrics under `istio`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.builds = Counter("pilot_mesh_builds", "mesh snapshots built", registry=registry)
        self.generate_errors = Counter(
            "pilot_generate_errors", "snapshots not published: generator failed or was inconsistent",
            registry=registry)
        self.eds_only_pushes = Counter(
            "pilot_eds_only_pushes", "classes updated by the EDS fast path (other types kept)", registry=registry)
        self.route_only_pushes = Counter(
            "pilot_route_only_pushes",
            "classes given the route configurations of a class generated in the same push (other types kept)",
            registry=registry)
        self.endpoint_fast_pushes = Counter(
            "pilot_endpoint_fast_pushes", "pushes of endpoint-only changes that skipped the full debounce",
            registry=registry)
        self.early_builds = Counter(
            "pilot_early_builds", "pushes whose mesh was built while the debounce let changes settle",
            registry=registry)
        self.push_seconds = Histogram(
            "pilot_push_seconds", "time to build the mesh and publish every watched class", registry=registry)
        self.class_cpu = Summary(
            "pilot_class_publish_cpu_seconds",
            "CPU time to generate, serialize and publish the first snapshot of a new class (no socket writes)",
            registry=registry)
        self.istio = IstioPushMetrics(registry)  # Istio's names (pilot.metrics)
