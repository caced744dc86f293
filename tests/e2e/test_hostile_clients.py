"""Streams that never read: closed after the send timeout, pilot's memory bounded and given back.

A real `meshctl up` process (its RSS measured with psutil) serves a 400-service mesh, so each
CDS response is a few hundred KB; this test opens 300 real gRPC ADS streams that send their
requests and never read, with a client that keeps its HTTP/2 windows small (as a proxy that
stopped reading would), so the responses stay stuck in pilot. No Envoy is needed: the
client is the hostile party.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import psutil
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from benchmarks import meshgen
from meshctl.localmesh import free_port
from pilot.testing.ads_client import AdsClient, make_node, resource_names
from pilot.xds.typeurls import CLUSTER, LISTENER

pytestmark = pytest.mark.e2e
STREAMS = 300
SERVICES = 400
METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


@dataclass
class PilotProcess:
    ads: str
    debug: str
    process: psutil.Process

    def rss_mb(self) -> float:
        return float(self.process.memory_info().rss) / 2**20


@pytest.fixture
async def pilot(tmp_path: Path) -> AsyncIterator[PilotProcess]:
    """`meshctl up` with a 1 s send timeout and a 3 s connection age (so the test need not wait 30 min)."""
    meshgen.generate(tmp_path, services=SERVICES)
    ads, debug = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {**os.environ, "MESHCTL_PILOT_SEND_TIMEOUT_MS": "1000", "MESHCTL_PILOT_MAX_CONNECTION_AGE_MS": "3000"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshctl.cli", "up", "--config-dir", str(tmp_path), "--ads", ads, "--debug", debug,
        "--log-level", "error", "--plaintext-only", env=env)
    try:
        for _ in range(300):
            if (await get(debug, "/ready"))[0] == 200:
                break
            await asyncio.sleep(0.1)
        yield PilotProcess(ads, debug, psutil.Process(proc.pid))
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)


async def get(debug: str, path: str) -> tuple[int, str]:
    """GET from pilot's debug API; a generous 10 s timeout, never a timing assertion."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, \
                s.get(f"http://{debug}{path}") as r:
            return r.status, await r.text()
    except aiohttp.ClientConnectionError:
        return 0, ""


def node(i: int) -> Any:
    return make_node(f"sidecar~127.0.9.{i % 250 + 1}~hostile-{i}.{meshgen.NAMESPACE}~bench.svc.cluster.local",
                     namespace=meshgen.NAMESPACE, labels={"app": "svc-000", "version": "v1"})


async def legit_cds(ads: str) -> bytes:
    """A well-behaved proxy's CDS response (read and returned whole)."""
    async with AdsClient(ads, node(10_000)) as client:
        client.send(CLUSTER)
        response = await asyncio.wait_for(client.recv(), 20)
    assert "outbound|8080||svc-000.bench.svc.cluster.local" in resource_names(response)
    return bytes(response.SerializeToString())


async def open_stuck_streams(ads: str, count: int) -> tuple[list[grpc.aio.Channel], list[Any]]:
    """`count` streams that ask for clusters and listeners and never read a byte of the answers."""
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384),
               ("grpc.max_receive_message_length", 64 << 20), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(ads, options=options) for _ in range(10)]
    calls = []
    for i in range(count):
        call = channels[i % len(channels)].stream_stream(METHOD, request_serializer=bytes,
                                                           response_deserializer=bytes)()
        for type_url in (CLUSTER, LISTENER):
            await call.write(discovery_pb2.DiscoveryRequest(node=node(i), type_url=type_url).SerializeToString())
        calls.append(call)
    return channels, calls


def hostile_rows(syncz: str) -> int:
    return syncz.count('"hostile-')


async def test_streams_that_never_read_are_closed_and_pilot_gives_their_memory_back(pilot: PilotProcess) -> None:
    response_bytes = len(await legit_cds(pilot.ads))
    assert response_bytes > 200_000  # a few hundred KB each, so stuck copies are visible in RSS
    await asyncio.sleep(1.5)  # the legit stream's end and its memory release settle
    base = pilot.rss_mb()
    channels, calls = await open_stuck_streams(pilot.ads, STREAMS)
    try:
        peak, seen_open, closed = base, 0, False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, syncz = await get(pilot.debug, "/debug/syncz")
            assert status == 200  # the debug API answers throughout the flood
            assert (await get(pilot.debug, "/ready"))[0] == 200
            peak = max(peak, pilot.rss_mb())
            seen_open = max(seen_open, hostile_rows(syncz))
            if seen_open and hostile_rows(syncz) == 0:
                closed = True
                break
            await asyncio.sleep(0.2)
        assert seen_open > 0 and closed, "the stuck streams were not closed after the send timeout"
        _, metrics = await get(pilot.debug, "/metrics")
        timeouts = re.search(r'pilot_xds_stream_errors_total\{reason="send_timeout"\} (\d+)', metrics)
        assert timeouts is not None and int(timeouts.group(1)) == STREAMS
        # Bounded: at most about one stuck response per stream (gRPC's copy), nothing piling up.
        assert peak - base <= STREAMS * response_bytes * 1.5 / 2**20 + 64, (base, peak)
        # Well-behaved proxies are still served while the stuck streams wait for their connections to end.
        assert len(await legit_cds(pilot.ads)) == response_bytes
        # Given back: once the connections reach their maximum age (3 s + 10 s of grace), gRPC frees
        # the stuck responses and pilot hands the pages back to the OS.
        stuck_mb = STREAMS * response_bytes / 2**20
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and pilot.rss_mb() > base + stuck_mb / 4:
            assert (await get(pilot.debug, "/ready"))[0] == 200
            await asyncio.sleep(0.5)
        assert pilot.rss_mb() <= base + stuck_mb / 4, (base, peak, pilot.rss_mb(), stuck_mb)
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*(c.close() for c in channels))
