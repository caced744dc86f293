"""Pilot's /metrics under Istio's names (so Istio's control-plane dashboard works), and the
/debug/adsz and /debug/push_status endpoints, over real HTTP and real gRPC."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry

from pilot.api.parse import parse_object
from pilot.app import Pilot
from pilot.debounce import ENDPOINT_KINDS
from pilot.metrics import IstioPushMetrics, exposition, trigger_types
from pilot.settings import PilotSettings
from pilot.testing.ads_client import AdsClient, make_node, resource_names
from pilot.tracing import ChangeTracker, ObservedStore
from pilot.xds.typeurls import CLUSTER

DASHBOARD = Path(__file__).parent / "istio_dashboard" / "pilot-dashboard.promql"

# Names the dashboard queries that pilot's /metrics does not carry, and who exports them.
NOT_PILOT = {
    "container_memory_working_set_bytes": "the kubelet (cAdvisor), per container",
    "container_cpu_usage_seconds_total": "the kubelet (cAdvisor), per container",
    "envoy_cluster_upstream_cx_active": "each Envoy's own stats (port 15090)",
    "go_goroutines": "Go's runtime; pilot is Python (process_* instead)",
    "go_memstats_heap_alloc_bytes": "Go's runtime; pilot is Python (process_* instead)",
    "go_memstats_heap_inuse_bytes": "Go's runtime; pilot is Python (process_* instead)",
    "go_memstats_stack_inuse_bytes": "Go's runtime; pilot is Python (process_* instead)",
    "go_memstats_alloc_bytes_total": "Go's runtime; pilot is Python (process_* instead)",
    "go_memstats_mallocs_total": "Go's runtime; pilot is Python (process_* instead)",
    "galley_validation_passed": "the validation webhook (injector/), not pilot's /metrics",
    "galley_validation_failed": "the validation webhook (injector/), not pilot's /metrics",
    "sidecar_injection_success_total": "the injection webhook (injector/), not pilot's /metrics",
    "sidecar_injection_failure_total": "the injection webhook (injector/), not pilot's /metrics",
}
# Series that exist only with a Kubernetes source (their families are declared regardless).
KUBE_ONLY = {"pilot_k8s_cfg_events", "pilot_k8s_reg_events"}
# Error sums have no series until the first error, as in Istio (its dashboard says so); other tests make them.
ERRORS_ONLY = {"pilot_total_xds_internal_errors", "pilot_total_xds_rejects"}
# Istio's types (istio/istio pilot/pkg/xds/monitoring.go, pkg/xds/monitoring.go, push_context.go).
ISTIO_TYPES = {
    "pilot_xds": "gauge", "pilot_xds_pushes": "counter", "pilot_xds_push_time": "histogram",
    "pilot_proxy_convergence_time": "histogram", "pilot_total_xds_rejects": "counter",
    "pilot_xds_cds_reject": "gauge", "pilot_xds_eds_reject": "gauge", "pilot_xds_lds_reject": "gauge",
    "pilot_xds_rds_reject": "gauge", "pilot_debounce_time": "histogram", "pilot_xds_config_size_bytes": "histogram",
    "pilot_push_triggers": "counter", "pilot_services": "gauge", "pilot_virt_services": "gauge",
    "pilot_k8s_reg_events": "counter", "pilot_k8s_cfg_events": "counter", "pilot_xds_send_time": "histogram",
    "pilot_proxy_queue_time": "histogram", "pilot_conflict_inbound_listener": "gauge",
    "pilot_conflict_outbound_listener_tcp_over_current_tcp": "gauge", "pilot_duplicate_envoy_clusters": "gauge",
    "pilot_total_xds_internal_errors": "counter", "pilot_xds_expired_nonce": "counter",
    "pilot_xds_write_timeout": "counter", "pilot_pushcontext_init_seconds": "histogram",
    "pilot_inbound_updates": "counter", "istio_build": "gauge",
}

SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: {name}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}-1, namespace: default}}
spec: {{address: 127.0.3.4, labels: {{app: {name}}}, serviceAccount: {name}}}
"""
ROUTE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings.default.svc.cluster.local]
  http:
  - route:
    - destination: {host: ratings.default.svc.cluster.local}
"""
NODE_ID = "sidecar~127.0.3.9~client.default~default.svc.cluster.local"


@pytest.fixture
async def pilot(tmp_path: Path) -> AsyncIterator[Pilot]:
    (tmp_path / "ratings.yaml").write_text(SERVICE.format(name="ratings") + "---\n" + ROUTE)
    settings = PilotSettings(ads_port=0, debug_port=0, config_dir=tmp_path, file_poll_ms=20, debounce_ms=20,
                             file_settle_ms=50)
    async with Pilot(settings) as p:
        p.changes.settle = 0.2  # end each change's bookkeeping quickly
        yield p


async def get(pilot: Pilot, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://{pilot.debug_address}{path}") as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


def families(text: str) -> dict[str, str]:
    """Family name -> type, from the `# TYPE` lines."""
    return {m[1]: m[2] for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE)}


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[2] or ""))
            out.append((m[1], labels, float(m[3])))
    return out


def value(text: str, name: str, **labels: str) -> float:
    return sum(v for n, ls, v in samples(text) if n == name and all(ls.get(k) == x for k, x in labels.items()))


def dashboard_queries() -> list[tuple[str, set[str], dict[str, str]]]:
    """(metric name, labels the query groups by, label matchers) for each metric the dashboard queries."""
    out = []
    for expr in DASHBOARD.read_text().splitlines():
        if not expr.strip() or expr.startswith("#"):
            continue
        by = set()
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            by |= {g.strip() for g in group.split(",") if g.strip() and g.strip() != "le"}
        for name, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{([^}]*)\})?(?=\s*[\[)\s]|$)",
                                         re.sub(r"\bby\s*\([^)]*\)|\[[^\]]*\]", "", expr)):
            if name in ("sum", "rate", "irate", "by"):
                continue
            out.append((name, by, dict(re.findall(r'(\w+)="([^"]*)"', matchers))))
    return out


def test_the_dashboard_fixture_parses_into_every_metric_it_queries() -> None:
    names = {name for name, _, _ in dashboard_queries()}
    assert {"pilot_xds", "pilot_xds_pushes", "pilot_total_xds_rejects", "pilot_xds_push_time_bucket",
            "pilot_xds_config_size_bytes_bucket", "istio_build", "go_goroutines"} <= names
    assert not names & {"sum", "rate", "type", "pod", "le", "tag"}


async def test_every_pilot_metric_of_istios_dashboard_is_exported_after_a_push(pilot: Pilot, tmp_path: Path) -> None:
    node = make_node(NODE_ID, labels={"app": "client"})
    async with AdsClient(pilot.ads_address, node) as client:
        client.send(CLUSTER)
        client.ack(await client.recv())
        await asyncio.sleep(0.1)
        (tmp_path / "reviews.yaml").write_text(SERVICE.format(name="reviews"))  # a change pushes new clusters
        response = await client.recv()
        assert "outbound|9080||reviews.default.svc.cluster.local" in resource_names(response)
        client.ack(response)
        await asyncio.sleep(0.1)
        status, text = await get(pilot, "/metrics")
    assert status == 200
    declared = families(text)
    for name, by, matchers in dashboard_queries():
        if name in NOT_PILOT:
            assert name not in declared  # the list of exceptions stays true
            continue
        family = name.removesuffix("_bucket")
        assert family in declared, f"{name} (Istio's dashboard) is not exported"
        assert declared[family] == ISTIO_TYPES[family], (family, declared[family])
        if family in KUBE_ONLY | ERRORS_ONLY:
            continue
        rows = [ls for n, ls, _ in samples(text) if n == name and all(ls.get(k) == v for k, v in matchers.items())]
        assert rows, f"no series of {name} {matchers}"
        assert all(by <= set(ls) for ls in rows), (name, by, rows)
    for family, kind in ISTIO_TYPES.items():
        assert declared.get(family) == kind, family
    # What the push did, in Istio's label values.
    assert value(text, "pilot_xds", version="") == 1
    assert value(text, "pilot_xds_pushes", type="cds") == 2
    assert value(text, "pilot_push_triggers", type="service") >= 1
    assert value(text, "pilot_proxy_convergence_time_count") >= 1
    assert value(text, "pilot_debounce_time_count") >= 1
    assert value(text, "pilot_xds_push_time_count", type="cds") == 2
    # Push time is making and writing a response, send time the write alone (Istio's split).
    pushed = sum(value(text, "pilot_xds_push_time_sum", type=t) for t in ("cds", "eds", "lds", "rds"))
    sent = value(text, "pilot_xds_send_time_sum")
    assert sent > 0 and pushed - sent > 1e-6  # the steps' making time (not float rounding of the same sums)
    assert value(text, "pilot_xds_config_size_bytes_count", type="cds") == 2
    assert value(text, "pilot_services") == 2 and value(text, "pilot_virt_services") == 1
    assert value(text, "pilot_xds_pushes_total", type="CDS") == 2  # meshctl's older name stays
    assert value(text, "process_resident_memory_bytes") > 0
    assert value(text, "python_gc_collections_total", generation="0") > 0  # garbage collections, per generation
    for _ in range(100):  # the server notices the closed stream
        _, text = await get(pilot, "/metrics")
        if not value(text, "pilot_xds", version=""):
            break
        await asyncio.sleep(0.05)
    assert value(text, "pilot_xds", version="") == 0  # the proxy left


async def test_a_nack_counts_in_istios_reject_metrics(pilot: Pilot) -> None:
    node = make_node(NODE_ID, labels={"app": "client"})
    async with AdsClient(pilot.ads_address, node) as client:
        client.send(CLUSTER)
        response = await client.recv()
        client.send(CLUSTER, nonce=response.nonce, version="", error="cluster rejected: bad thing")
        for _ in range(50):
            _, text = await get(pilot, "/metrics")
            if value(text, "pilot_total_xds_rejects", type="cds"):
                break
            await asyncio.sleep(0.05)
    assert value(text, "pilot_total_xds_rejects", type="cds") == 1
    assert value(text, "pilot_xds_cds_reject", node=NODE_ID, err="Internal") == 1
    assert value(text, "pilot_total_xds_rejects", type="lds") == 0


async def test_adsz_lists_connected_proxies_with_subscriptions_and_versions(pilot: Pilot) -> None:
    node = make_node(NODE_ID, labels={"app": "client"})
    async with AdsClient(pilot.ads_address, node) as client:
        client.send(CLUSTER)
        response = await client.recv()
        client.ack(response)
        await asyncio.sleep(0.1)
        status, body = await get(pilot, "/debug/adsz")
    assert status == 200 and body["totalClients"] == 1
    (proxy,) = body["clients"]
    assert proxy["node"] == NODE_ID and proxy["protocol"] == "sotw"
    watch = proxy["watches"][CLUSTER]
    assert watch["type"] == "CDS" and watch["resourceNames"] == "*" and watch["state"] == "SYNCED"
    assert watch["versionSent"] == watch["versionAcked"] == response.version_info
    for _ in range(100):  # the server notices the closed stream
        _, body = await get(pilot, "/debug/adsz")
        if not body["clients"]:
            break
        await asyncio.sleep(0.05)
    assert body == {"totalClients": 0, "clients": []}


async def test_push_status_describes_the_last_push(pilot: Pilot, tmp_path: Path) -> None:
    status, first = await get(pilot, "/debug/push_status")
    assert status == 200 and first["trigger"] == ["global"] and first["change_id"]
    node = make_node(NODE_ID, labels={"app": "client"})
    async with AdsClient(pilot.ads_address, node) as client:
        client.send(CLUSTER)
        client.ack(await client.recv())
        await asyncio.sleep(0.1)
        moved = SERVICE.format(name="ratings").replace("9080", "9081")  # new clusters
        (tmp_path / "ratings.yaml").write_text(moved + "---\n" + ROUTE)
        client.ack(await client.recv())
        for _ in range(50):
            _, body = await get(pilot, "/debug/push_status")
            if body["change_id"] != first["change_id"] and body["complete"]:
                break
            await asyncio.sleep(0.05)
    assert body["kinds"] == ["ServiceEntry"] and body["trigger"] == ["service"]
    assert body["classes"] == 1 and body["proxies"] == 1 and body["responses"]["CDS"] >= 1
    assert body["duration_ms"] >= body["build_ms"] >= 0 and body["eds_only"] is False
    status, index = await get(pilot, "/debug/")
    assert "/debug/adsz" in index and "/debug/push_status" in index and "/debug/configz" in index


def test_kubernetes_writes_count_in_istios_event_metrics() -> None:
    registry = CollectorRegistry()
    istio = IstioPushMetrics(registry, version="1.2.3")
    store = ObservedStore(ChangeTracker(), istio, ENDPOINT_KINDS)
    service = parse_object(yaml.safe_load(SERVICE.format(name="ratings").split("---")[0]))
    store.apply(service, "kubernetes")
    store.apply(service, "kubernetes")
    store.delete(*service.key, source_id="kubernetes")
    store.replace_source("kubernetes-registry", [service])
    text = exposition(registry).decode()
    assert "# TYPE pilot_k8s_cfg_events counter" in text
    assert value(text, "pilot_k8s_cfg_events", type="ServiceEntry", event="add") == 1
    assert value(text, "pilot_k8s_cfg_events", type="ServiceEntry", event="update") == 1
    assert value(text, "pilot_k8s_cfg_events", type="ServiceEntry", event="delete") == 1
    assert value(text, "pilot_k8s_reg_events", type="ServiceEntry", event="add") == 1
    assert value(text, "pilot_inbound_updates", type="svc") == 3
    assert value(text, "istio_build", tag="1.2.3", component="pilot") == 1


def test_push_trigger_types_follow_istio() -> None:
    assert trigger_types(None, ENDPOINT_KINDS) == ["global"]
    assert trigger_types(frozenset({"WorkloadEntry"}), ENDPOINT_KINDS) == ["endpoint"]
    assert trigger_types(frozenset({"VirtualService", "ServiceEntry"}), ENDPOINT_KINDS) == ["config", "service"]


def test_loop_histogram_and_counter_expose_what_prometheus_client_would() -> None:
    """The lock-free collectors that ADS writes update print the same samples as prometheus_client's
    own Histogram and Counter given the same observations (bucket edges included: `le` holds equality)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from pilot.metrics import CONFIG_SIZE_BUCKETS, SEND_TIME_BUCKETS, LoopCounter, LoopHistogram

    theirs, ours = CollectorRegistry(), CollectorRegistry()
    th = Histogram("size", "doc", ["type"], buckets=CONFIG_SIZE_BUCKETS, registry=theirs)
    oh = LoopHistogram("size", "doc", ["type"], CONFIG_SIZE_BUCKETS, ours)
    tu = Histogram("took", "doc", buckets=SEND_TIME_BUCKETS, registry=theirs)
    ou = LoopHistogram("took", "doc", [], SEND_TIME_BUCKETS, ours)
    tc = Counter("sent", "doc", ["type"], registry=theirs)
    oc = LoopCounter("sent", "doc", ["type"], ours)
    for kind, size in [("cds", 1), ("cds", 10_000), ("cds", 10_001), ("eds", 0), ("eds", 50_000_000), ("rds", 999)]:
        th.labels(kind).observe(size)
        oh.labels(kind).observe(size)
        tc.labels(kind).inc()
        oc.labels(kind).inc()
    for took in (0.01, 0.5, 31.0):
        tu.observe(took)
        ou.observe(took)

    def samples(registry: CollectorRegistry) -> list[str]:
        return sorted(line for line in generate_latest(registry).decode().splitlines()
                      if line and not line.startswith("#") and "_created" not in line)

    assert samples(ours) == samples(theirs)
    assert 'size_bucket{le="10000.0",type="cds"} 2.0' in samples(ours)
    empty = CollectorRegistry()
    LoopHistogram("took", "doc", [], SEND_TIME_BUCKETS, empty)
    assert 'took_count 0.0' in samples(empty)  # a histogram without labels shows from the start
