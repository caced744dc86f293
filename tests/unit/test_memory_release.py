"""Free heap goes back to the OS once the ADS server has stopped writing, not while it writes.

Over real gRPC: one stream takes a snapshot every 50 ms for a while (a long fan-out, seen from one
stream); the release must not come while responses are still being written, and must come once
after the last one.
"""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
from prometheus_client import CollectorRegistry

from pilot.model.proxy import identity_from_node
from pilot.testing.ads_client import AdsClient, make_node
from pilot.xds import server as ads_server
from pilot.xds.cache import SnapshotCache
from pilot.xds.server import AdsServer
from pilot.xds.status import StatusRegistry, XdsMetrics
from pilot.xds.typeurls import CLUSTER
from tests.conformance.builders import snapshot


async def test_memory_is_released_once_the_writes_have_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ads_server, "RELEASE_DELAY", 0.2)
    released: list[float] = []
    cache = SnapshotCache()
    server = AdsServer(cache, StatusRegistry(XdsMetrics(CollectorRegistry())),
                       release_memory=lambda: released.append(time.monotonic()))
    port = await server.start("127.0.0.1", 0)
    node = make_node("sidecar~127.0.0.2~app.default~default.svc.cluster.local", labels={"app": "a"})
    key = identity_from_node(node).proxy_class
    try:
        cache.set(key, snapshot({"c1": 1}))
        async with AdsClient(f"127.0.0.1:{port}", node) as client:
            client.send(CLUSTER)
            client.ack(await client.recv())
            # 1.2 s of pushes, 50 ms apart: six release delays' worth of writing.
            last_write = 0.0
            for version in range(2, 26):
                cache.set(key, snapshot({"c1": 1}, timeouts={"c1": version}))
                client.ack(await client.recv())
                last_write = time.monotonic()
                await asyncio.sleep(0.05)
            assert released == []  # never while responses were being written
            await asyncio.sleep(0.7)
            assert len(released) == 1, released  # once, after the last write
            assert released[0] >= last_write + 0.2
    finally:
        await server.stop(0)


async def test_a_wave_of_ended_streams_gets_one_full_collection_at_the_next_quiet_moment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ended streams leave reference cycles only a full collection finds; pilot makes Python's own
    full collections rare (`pilot.gcpolicy`), so the server runs one once `CHURN_COLLECT` calls ended."""
    monkeypatch.setattr(ads_server, "RELEASE_DELAY", 0.1)
    monkeypatch.setattr(ads_server, "CHURN_COLLECT", 6)
    full: list[int] = []

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 2:
            full.append(info["collected"])

    released: list[float] = []
    cache = SnapshotCache()
    server = AdsServer(cache, StatusRegistry(XdsMetrics(CollectorRegistry())),
                       release_memory=lambda: released.append(time.monotonic()))
    port = await server.start("127.0.0.1", 0)
    nodes = [make_node(f"sidecar~127.0.0.2~app{i}.default~default.svc.cluster.local", labels={"app": f"a{i}"})
             for i in range(6)]
    for node in nodes:
        cache.set(identity_from_node(node).proxy_class, snapshot({"c1": 1}))

    async def stream(node: object) -> None:
        async with AdsClient(f"127.0.0.1:{port}", node) as client:
            client.send(CLUSTER)
            client.ack(await client.recv())

    gc.disable()  # only the server's collection may run
    gc.callbacks.append(watch)
    try:
        for node in nodes[:5]:
            await stream(node)
        await asyncio.sleep(0.5)
        assert released and full == []  # quiet, memory released, but too few calls ended
        await stream(nodes[5])
        await asyncio.sleep(0.5)
        assert len(full) == 1  # the sixth ended call: one full collection at the quiet moment
    finally:
        gc.callbacks.remove(watch)
        gc.enable()
        await server.stop(0)
