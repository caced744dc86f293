"""An applied request is not kept: over real gRPC, a stream holds no copy of the last request it read.

At mission scale a SotW EDS ACK names every cluster (148 KB); kept per idle stream until its next
request, 2,000 of them were pilot's whole peak (session 33, benchmarks/README).
"""

from __future__ import annotations

import asyncio
import tracemalloc

from prometheus_client import CollectorRegistry

from pilot.model.proxy import identity_from_node
from pilot.testing.ads_client import AdsClient, make_node
from pilot.xds.cache import SnapshotCache
from pilot.xds.server import AdsServer
from pilot.xds.status import StatusRegistry, XdsMetrics
from pilot.xds.typeurls import ENDPOINT
from tests.conformance.builders import snapshot

BIG = 1 << 20  # the request is about 2 MB; nothing else pilot allocates here comes near 1 MB


async def test_a_stream_keeps_no_copy_of_an_ack_it_has_applied() -> None:
    cache = SnapshotCache()
    registry = StatusRegistry(XdsMetrics(CollectorRegistry()))
    server = AdsServer(cache, registry)
    port = await server.start("127.0.0.1", 0)
    node = make_node("sidecar~127.0.0.2~app.default~default.svc.cluster.local", labels={"app": "a"})
    cache.set(identity_from_node(node).proxy_class, snapshot({"c1": 1}))
    # 20,000 names of ~100 bytes: a 2 MB request, like a large mesh's SotW EDS subscription.
    names = ["c1", *(f"outbound|8080|v{i % 3}|service-{i:05d}.team-{i % 40:02d}.svc.cluster.local"
                     f"{'-' * 40}" for i in range(20_000))]
    try:
        async with AdsClient(f"127.0.0.1:{port}", node) as client:
            client.send(ENDPOINT, names)
            first = await client.recv()
            assert [r.type_url for r in first.resources] == [ENDPOINT]
            tracemalloc.start(30)
            try:
                client.ack(first)
                for _ in range(500):  # the ACK is applied when the stream's ACKed version moves
                    streams = registry.streams()
                    if streams and streams[0].of(ENDPOINT).acked_version == first.version_info:
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("pilot did not apply the ACK")
                held = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
            read = [t for t in held.traces if t.size >= BIG]
            kept = [t for t in read if any("/pilot/xds/" in f.filename for f in t.traceback)]
            assert kept == [], [(t.size, t.traceback.format()[-4:]) for t in kept]
            client.ack(first)  # the stream still reads: a second ACK is applied as well
            await asyncio.sleep(0)
    finally:
        await server.stop(0)
