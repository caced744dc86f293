"""Traces of config changes: one trace per change id through ingest, build, generate and push,
collected in memory from a real pilot (real files, real gRPC proxy)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pilot.app import Pilot
from pilot.settings import PilotSettings
from pilot.testing.ads_client import AdsClient, make_node
from pilot.tracing import ChangeTracker
from pilot.xds.typeurls import CLUSTER

SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{name}.default.svc.cluster.local]
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: {name}}}}}
"""


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[tuple[Pilot, InMemorySpanExporter]]:
    (tmp_path / "ratings.yaml").write_text(SERVICE.format(name="ratings"))
    exporter = InMemorySpanExporter()
    settings = PilotSettings(ads_port=0, debug_port=0, config_dir=tmp_path, file_poll_ms=20, debounce_ms=20,
                             file_settle_ms=50)
    async with Pilot(settings, span_processor=SimpleSpanProcessor(exporter)) as pilot:
        pilot.changes.settle = 0.2
        yield pilot, exporter


async def _trace_of(exporter: InMemorySpanExporter, change_id: str) -> list[Any]:
    """The spans of the change's trace, once its root span ended."""
    for _ in range(100):
        spans = exporter.get_finished_spans()
        roots = [s for s in spans
                 if s.name == "config change" and (s.attributes or {}).get("meshctl.change_id") == change_id]
        if roots:
            return [s for s in spans if s.context.trace_id == roots[0].context.trace_id]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no finished trace for change {change_id}: {[s.name for s in spans]}")


async def test_a_file_change_is_one_trace_through_ingest_build_generate_and_push(
    traced: tuple[Pilot, InMemorySpanExporter], tmp_path: Path,
) -> None:
    pilot, exporter = traced
    node = make_node("sidecar~127.0.3.9~client.default~default.svc.cluster.local", labels={"app": "client"})
    async with AdsClient(pilot.ads_address, node) as client:
        client.send(CLUSTER)
        client.ack(await client.recv())
        await asyncio.sleep(0.1)
        (tmp_path / "reviews.yaml").write_text(SERVICE.format(name="reviews"))
        client.ack(await client.recv())
        for _ in range(100):
            status = pilot.changes.push_status()
            if "ServiceEntry" in status.get("kinds", ()) and status["complete"]:
                break
            await asyncio.sleep(0.05)
        spans = await _trace_of(exporter, status["change_id"])
    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == ["build", "config change", "generate", "ingest", "push"], [s.name for s in spans]
    root = by_name["config change"]
    assert root.parent is None
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in spans if s is not root)
    assert list(root.attributes["meshctl.kinds"]) == ["ServiceEntry"]
    assert list(root.attributes["meshctl.trigger"]) == ["service"]
    assert root.attributes["meshctl.classes"] == 1 and root.attributes["meshctl.proxies"] == 1
    ingest = by_name["ingest"]
    assert ingest.attributes["meshctl.writes"] >= 1 and any(
        src.startswith("file:") for src in ingest.attributes["meshctl.sources"])
    assert by_name["generate"].attributes["meshctl.classes"] == 1
    assert by_name["generate"].attributes["meshctl.errors"] == 0
    push = by_name["push"]
    assert push.attributes["meshctl.proxies"] == 1
    assert [e.name for e in push.events] == ["first_write", "last_write"]
    # Stages in order: ingest ends before generation starts; the push ends at the proxy's write.
    assert ingest.end_time <= by_name["generate"].start_time <= by_name["generate"].end_time
    assert push.end_time >= by_name["generate"].start_time and root.end_time >= push.end_time


async def test_each_change_has_its_own_trace_and_id(traced: tuple[Pilot, InMemorySpanExporter],
                                                    tmp_path: Path) -> None:
    pilot, exporter = traced
    ids = []
    for name in ("a", "b"):
        before = pilot.changes.push_status()["change_id"]
        (tmp_path / f"{name}.yaml").write_text(SERVICE.format(name=name))
        for _ in range(100):
            status = pilot.changes.push_status()
            if status["change_id"] != before and status["complete"]:
                break
            await asyncio.sleep(0.05)
        ids.append(status["change_id"])
    traces = [await _trace_of(exporter, cid) for cid in ids]
    assert ids[0] != ids[1] and traces[0][0].context.trace_id != traces[1][0].context.trace_id


def test_without_an_exporter_tracing_is_off_and_spans_cost_nothing() -> None:
    tracker = ChangeTracker()
    assert tracker.tracer is None
    tracker.ingested("file:/x", "ServiceEntry", "add")
    change = tracker.begin(frozenset({"ServiceEntry"}), ["service"])
    with tracker.span("build") as span:
        assert span is None
    tracker.published(change, {"classes": 0})
    assert change.root is None and tracker.push_status()["kinds"] == ["ServiceEntry"]
    assert tracker.push_status()["complete"]
