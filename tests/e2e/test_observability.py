"""Pilot watching itself, as a user runs it: `meshctl up --otlp-endpoint ... --log-format json` with a
real Envoy sidecar; a route edit arrives as one OpenTelemetry trace at a real OTLP/HTTP receiver
(decoded with opentelemetry-proto), its change id on pilot's JSON log lines, and Istio's metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from meshctl.democonfig import DemoMesh
from meshctl.localmesh import free_port
from pilot.app import Pilot
from pilot.settings import PilotSettings
from tests.e2e.conftest import random_block
from tests.e2e.test_cli_mesh import MESHCTL, run, spawn, stop, wait_synced
from tests.k8s.cluster import KubeCluster
from tests.k8s.pilots import install_crds

pytestmark = pytest.mark.e2e


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: every span of every export request, decoded."""

    def __init__(self) -> None:
        self.spans: list[Any] = []  # opentelemetry.proto.trace.v1.Span
        self.content_types: set[str] = set()

    async def export(self, request: web.Request) -> web.Response:
        self.content_types.add(request.content_type)
        message = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def trace_of(self, change_id: str) -> list[Any]:
        roots = [s for s in self.spans if s.name == "config change" and _attrs(s).get("meshctl.change_id") == change_id]
        return [s for s in self.spans if roots and s.trace_id == roots[0].trace_id]


def _attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = [getattr(x, x.WhichOneof("value")) for x in v.array_value.values] if kind == "array_value" \
            else getattr(v, kind)
    return out


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[tuple[OtlpReceiver, str]]:
    sink = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", sink.export)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield sink, f"http://127.0.0.1:{port}/v1/traces"
    finally:
        await runner.cleanup()


async def _get(debug: str, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"http://{debug}{path}") as r:
        return await r.json() if r.content_type == "application/json" else await r.text()


async def _drain(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode())


@pytest.mark.timeout(300)
async def test_a_route_edit_is_traced_logged_and_measured(tmp_path: Path) -> None:
    demo = DemoMesh(random_block(), {"v1": free_port(), "v2": free_port()})
    (tmp_path / "mesh.yaml").write_text(demo.mesh_yaml())
    (tmp_path / "route.yaml").write_text(demo.route_yaml([50, 50]))
    ads, debug = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    logs: list[str] = []
    async with receiver() as (sink, endpoint):
        # Log lines go to stderr (stdout has the banner for people).
        up = await asyncio.create_subprocess_exec(
            *MESHCTL, "up", "--config-dir", str(tmp_path), "--ads", ads, "--debug", debug, "--plaintext-only",
            "--otlp-endpoint", endpoint, "--log-format", "json",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert up.stderr is not None
        drain = asyncio.create_task(_drain(up.stderr, logs))
        procs = [up]
        try:
            deadline = asyncio.get_running_loop().time() + 120
            while True:  # pilot answers once its debug port is up
                try:
                    await run("proxy-status", "--debug", debug, "--json")
                    break
                except AssertionError:
                    assert up.returncode is None, f"meshctl up exited {up.returncode}:\n{''.join(logs)[-3000:]}"
                    assert asyncio.get_running_loop().time() < deadline, "".join(logs)[-3000:]
                    await asyncio.sleep(0.2)
            procs.append(await spawn("proxy", "run", "--plaintext", "--workload", "default/frontend", "--pilot", ads,
                                     "--debug", debug, "--log-level", "warning"))
            await wait_synced(debug, 1)
            before = (await _get(debug, "/debug/push_status"))["change_id"]
            (tmp_path / "route.yaml").write_text(demo.route_yaml([100, 0]))
            status: dict[str, Any] = {}
            for _ in range(200):
                status = await _get(debug, "/debug/push_status")
                if status["change_id"] != before and status["complete"] and sink.trace_of(status["change_id"]):
                    break
                await asyncio.sleep(0.1)
            change = status["change_id"]
            spans = sink.trace_of(change)
            adsz = await _get(debug, "/debug/adsz")
            metrics = await _get(debug, "/metrics")
        finally:
            codes = [await stop(p) for p in reversed(procs)]
            await drain
    assert codes == [0, 0], codes
    # The trace: one per change, its stages under one root, what changed and who got it.
    assert sink.content_types == {"application/x-protobuf"}
    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == ["build", "config change", "generate", "ingest", "push"], sorted(by_name)
    root = by_name["config change"]
    assert all(s.parent_span_id == root.span_id for s in spans if s is not root)
    assert _attrs(root)["meshctl.kinds"] == ["VirtualService"] and _attrs(root)["meshctl.trigger"] == ["config"]
    assert _attrs(by_name["push"])["meshctl.proxies"] == 1
    assert [e.name for e in by_name["push"].events] == ["first_write", "last_write"]
    # A delta Envoy 1.40 takes the edit as the virtual host it changed (VHDS), not as RDS.
    assert status["proxies"] == 1 and status["responses"] == {"VHDS": 1}, status
    # The JSON log lines: every one an object, the push's lines carrying the change id.
    assert all(line.startswith("{") for line in logs if line.strip()), [x for x in logs if not x.startswith("{")]
    entries = [json.loads(line) for line in logs if line.strip()]
    assert entries and all(set(e) >= {"time", "level", "logger", "message", "change_id"} for e in entries)
    assert any(e["change_id"] == change and e["logger"] == "pilot.push" for e in entries)
    # Istio's metrics, as the control-plane dashboard reads them.
    assert adsz["totalClients"] == 1 and adsz["clients"][0]["node"].startswith("sidecar~")
    assert re.search(r"^pilot_xds\{version=\"[^\"]*\"\} 1\.0$", metrics, re.MULTILINE), metrics
    count = re.search(r"^pilot_proxy_convergence_time_count (\S+)$", metrics, re.MULTILINE)
    assert count and float(count[1]) >= 1
    assert re.search(r'^pilot_xds_pushes\{type="rds"\} [1-9]', metrics, re.MULTILINE)  # at connect
    assert re.search(r'^pilot_xds_pushes\{type="vhds"\} [1-9]', metrics, re.MULTILINE)


@pytest.mark.timeout(300)
async def test_kubernetes_events_count_in_istios_metrics_and_push_status(kube_cluster: KubeCluster) -> None:
    """A pilot watching a real API server: Istio's `pilot_k8s_cfg_events` / `pilot_k8s_reg_events`
    count the watch events, and a VirtualService applied with kubectl is the last push's change."""
    cluster, token = kube_cluster, secrets.token_hex(3)
    mesh_ns, ns = f"istio-obs-{token}", f"obs-{token}"

    def kubectl(*args: str, stdin: str | None = None) -> Any:
        return asyncio.to_thread(cluster.kubectl, *args, stdin=stdin)

    await asyncio.to_thread(install_crds, cluster)
    try:
        for name, labels in ((mesh_ns, {}), (ns, {"meshctl-obs": token})):
            await kubectl("create", "-f", "-", stdin=json.dumps(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}))
        mesh = yaml.safe_dump({"discoverySelectors": [{"matchLabels": {"meshctl-obs": token}}]})
        await kubectl("-n", mesh_ns, "create", "configmap", "istio", f"--from-literal=mesh={mesh}")
        await kubectl("-n", ns, "create", "-f", "-", stdin=json.dumps(
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews"},
             "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]}}))
        settings = PilotSettings(ads_port=0, debug_port=0, debounce_ms=20, kubeconfig=cluster.kubeconfig,
                                 kube_mesh_namespace=mesh_ns, leader_election=False, kube_status=False)
        async with Pilot(settings) as pilot:
            debug = pilot.debug_address
            before = (await _get(debug, "/debug/push_status"))["change_id"]
            await kubectl("-n", ns, "create", "-f", "-", stdin=json.dumps(
                {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews"},
                 "spec": {"hosts": [f"reviews.{ns}.svc.cluster.local"],
                          "http": [{"route": [{"destination": {"host": f"reviews.{ns}.svc.cluster.local"}}]}]}}))
            status: dict[str, Any] = {}
            for _ in range(150):
                status = await _get(debug, "/debug/push_status")
                if status["change_id"] != before and "VirtualService" in status["kinds"]:
                    break
                await asyncio.sleep(0.2)
            metrics = await _get(debug, "/metrics")
    finally:
        for name in (ns, mesh_ns):
            await kubectl("delete", "namespace", name, "--wait=false")
    assert status["kinds"] == ["VirtualService"] and status["sources"] == ["kubernetes"], status
    assert status["trigger"] == ["config"]

    def sample(name: str, **labels: str) -> float:
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        series = f"{name}{{{want}}}" if want else name
        found = re.search(rf"^{re.escape(series)} (\S+)$", metrics, re.MULTILINE)
        return float(found[1]) if found else 0.0

    assert "# TYPE pilot_k8s_cfg_events counter" in metrics
    assert sample("pilot_k8s_cfg_events", event="add", type="VirtualService") == 1
    assert sample("pilot_k8s_reg_events", event="add", type="Service") >= 1
    assert sample("pilot_inbound_updates", type="config") >= 1
    assert sample("pilot_virt_services") == 1
