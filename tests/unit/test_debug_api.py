"""Pilot's debug API over real HTTP: configz rejections and recovery, workloads, config_dump, metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pilot.app import Pilot
from pilot.settings import PilotSettings
from pilot.testing.ads_client import AdsClient, make_node, resource_names
from pilot.xds.typeurls import CLUSTER

GOOD = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  workloadSelector: {labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-1, namespace: default}
spec: {address: 127.0.3.4, labels: {app: ratings}, serviceAccount: ratings}
"""

BAD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: broken, namespace: default}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings}
      weight: -150
"""


@pytest.fixture
async def pilot(tmp_path: Path) -> AsyncIterator[Pilot]:
    (tmp_path / "good.yaml").write_text(GOOD)
    (tmp_path / "bad.yaml").write_text(BAD)
    async with Pilot(PilotSettings(ads_port=0, debug_port=0, config_dir=tmp_path, file_poll_ms=20)) as p:
        yield p


async def get(pilot: Pilot, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://{pilot.debug_address}{path}") as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


async def test_configz_names_the_rejected_document_and_a_fix_is_picked_up(pilot: Pilot, tmp_path: Path) -> None:
    status, body = await get(pilot, "/debug/configz")
    assert status == 200
    text = str(body["rejected"])
    assert "VirtualService default/broken" in text and "weight" in text and "bad.yaml" in text
    assert any("ratings" in str(o) for o in body["objects"])  # the valid documents stay live
    (tmp_path / "bad.yaml").write_text(BAD.replace("weight: -150", "weight: 100"))
    for _ in range(50):
        _, body = await get(pilot, "/debug/configz")
        if not body["rejected"] and "broken" in str(body["objects"]):  # not a half-written file's state
            break
        await asyncio.sleep(0.05)
    assert body["rejected"] in ([], {}) and "broken" in str(body["objects"])


async def test_workload_lookup_and_unknown_workload(pilot: Pilot) -> None:
    status, body = await get(pilot, "/debug/workload/default/ratings-1")
    assert status == 200 and body["address"] == "127.0.3.4" and body["labels"] == {"app": "ratings"}
    status, text = await get(pilot, "/debug/workload/default/nobody")
    assert status == 404 and "default/nobody" in text


async def test_config_dump_syncz_and_metrics_for_a_connected_proxy(pilot: Pilot) -> None:
    node = make_node("sidecar~127.0.3.9~client.default~default.svc.cluster.local", labels={"app": "client"})
    async with AdsClient(pilot.ads_address, node) as client:
        client.send(CLUSTER)
        response = await client.recv()
        client.ack(response)
        assert "outbound|9080||ratings.default.svc.cluster.local" in resource_names(response)
        await asyncio.sleep(0.1)
        status, dump = await get(pilot, f"/debug/config_dump?proxy={node.id}")
        assert status == 200 and dump["CDS"]["version"] == response.version_info
        names = [r.get("name") for r in dump["CDS"]["resources"]]
        assert "outbound|9080||ratings.default.svc.cluster.local" in names
        _, rows = await get(pilot, "/debug/syncz")
        assert rows[0]["proxy"] == node.id and rows[0]["types"]["CDS"]["state"] == "SYNCED"
        _, metrics = await get(pilot, "/metrics")
        assert "pilot_xds_connected_proxies 1.0" in metrics
        assert 'pilot_xds_acks_total{type="CDS"} 1.0' in metrics and 'pilot_xds_pushes_total{type="CDS"} 1.0' in metrics
    assert (await get(pilot, "/ready"))[0] == 200


async def test_memz_says_where_memory_is_and_can_hand_free_memory_back(pilot: Pilot) -> None:
    status, body = await get(pilot, "/debug/memz?top=5")
    assert status == 200 and "by type" in body
    assert body.splitlines()[0] == "allocator: pymalloc"  # this test process's; `meshctl up` picks its own
    rows = [line for line in body.splitlines()[2:] if line.strip()]
    assert len(rows) == 5 and all("MiB" in r for r in rows)
    status, body = await get(pilot, "/debug/memz?top=1&trim=1")
    assert status == 200 and body.splitlines()[1].startswith("malloc_trim: RSS")


async def test_debug_index_lists_every_endpoint_with_one_line_each(pilot: Pilot) -> None:
    for path in ("/debug/", "/debug"):
        status, text = await get(pilot, path)
        lines = text.splitlines()
        assert status == 200
        for endpoint in ("/debug/syncz", "/debug/configz", "/debug/config_dump?proxy=ID",
                         "/debug/workload/NAMESPACE/NAME", "/debug/memz", "/metrics", "/ready"):
            assert sum(line.startswith(endpoint) for line in lines) == 1, (endpoint, text)
        assert all(len(line.split()) > 2 for line in lines)  # each says what it shows
    status, text = await get(pilot, "/debug/nothing-here")
    assert status == 404 and "/debug/nothing-here" in text and "/debug/syncz" in text


async def test_config_dump_without_proxy_is_a_400_naming_the_parameter_and_the_connected_proxies(
    pilot: Pilot,
) -> None:
    status, text = await get(pilot, "/debug/config_dump")
    assert status == 400 and "missing query parameter 'proxy'" in text and "no proxy is connected" in text
    node = make_node("sidecar~127.0.3.9~client.default~default.svc.cluster.local", labels={"app": "client"})
    async with AdsClient(pilot.ads_address, node) as client:
        client.send(CLUSTER)
        await client.recv()
        for query in ("", "?proxy="):
            status, text = await get(pilot, f"/debug/config_dump{query}")
            assert status == 400 and "'proxy'" in text and node.id in text
        status, text = await get(pilot, "/debug/config_dump?proxy=nobody")
        assert status == 404 and "'nobody' is not connected" in text and node.id in text


async def test_memz_with_a_bad_top_is_a_400_naming_it(pilot: Pilot) -> None:
    status, text = await get(pilot, "/debug/memz?top=many")
    assert status == 400 and "'top'" in text and "'many'" in text
