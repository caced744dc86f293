"""Free heap goes back to the OS once the ADS server has stopped writing, not while it writes.

Over real gRPC: one stream takes a snapshot every 50 ms for a while (a long fan-out, seen from one
stream); the release must not come while responses are still being written, and must come once
after the last one.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry

from pilot.model.proxy import identity_from_node
from pilot.quiet import WhenQuiet
from pilot.testing.ads_client import AdsClient, make_node
from pilot.xds.cache import SnapshotCache
from pilot.xds.server import AdsServer
from pilot.xds.status import StatusRegistry, XdsMetrics
from pilot.xds.typeurls import CLUSTER
from tests.conformance.builders import snapshot


async def test_memory_is_released_once_the_writes_have_stopped() -> None:
    # 0.5 s: a loaded CI machine can stall the loop for a few hundred ms between two pushes.
    quiet = WhenQuiet(delay=0.5)
    released: list[float] = []
    quiet.on_quiet(lambda: released.append(time.monotonic()))
    cache = SnapshotCache()
    server = AdsServer(cache, StatusRegistry(XdsMetrics(CollectorRegistry())), quiet=quiet)
    port = await server.start("127.0.0.1", 0)
    node = make_node("sidecar~127.0.0.2~app.default~default.svc.cluster.local", labels={"app": "a"})
    key = identity_from_node(node).proxy_class
    try:
        cache.set(key, snapshot({"c1": 1}))
        async with AdsClient(f"127.0.0.1:{port}", node) as client:
            client.send(CLUSTER)
            client.ack(await client.recv())
            # 1.2 s of pushes, 50 ms apart: over two release delays' worth of writing.
            last_write = 0.0
            for version in range(2, 26):
                cache.set(key, snapshot({"c1": 1}, timeouts={"c1": version}))
                client.ack(await client.recv())
                last_write = time.monotonic()
                await asyncio.sleep(0.05)
            assert released == []  # never while responses were being written
            await asyncio.sleep(1.5)
            assert len(released) == 1, released  # once, after the last write
            assert released[0] >= last_write + 0.5
    finally:
        await server.stop(0)
