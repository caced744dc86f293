"""Free heap goes back to the OS once the ADS server has stopped writing, not while it writes.

Over real gRPC: one stream takes a snapshot every 50 ms for a while (a long fan-out, seen from one
stream); the release must not come while responses are still being written, and must come once
after the last one.
"""

from __future__ import annotations

import asyncio
import gc
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from pilot.model.proxy import identity_from_node
from pilot.quiet import WhenQuiet
from pilot.testing.ads_client import AdsClient, make_node
from pilot.xds.cache import SnapshotCache
from pilot.xds.server import AdsServer
from pilot.xds.status import StatusRegistry, XdsMetrics
from pilot.xds.typeurls import CLUSTER
from tests.conformance.builders import snapshot


class CountingQuiet(WhenQuiet):
    """A `WhenQuiet` that also keeps what each `touch` reported."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.reported: list[int] = []

    def touch(self, events: int = 1) -> None:
        self.reported.append(events)
        super().touch(events)


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


async def test_a_stream_that_ended_leaves_no_reference_cycle_of_pilots_making() -> None:
    """An ended stream's call state goes with reference counting, not a later full collection.

    grpc.aio keeps an `add_done_callback` callback on the call's state, bound to the context that
    holds that state: a cycle per call, freed only by a full collection, which pilot runs rarely
    (`pilot.gcpolicy`; a fleet of 2,000 reconnecting grew pilot's heap by 2-3 MB each time). The server
    learns of a stream's end from its handler instead, and still tells `quiet` of it. Here the
    collector is off while streams open and end, so whatever they left in cycles is still there to
    count: none of it may be a call's state or context (gRPC's own method lookup leaves a small
    cycle per call, which pilot cannot avoid)."""
    quiet = CountingQuiet(delay=60)
    reported = quiet.reported
    cache = SnapshotCache()
    server = AdsServer(cache, StatusRegistry(XdsMetrics(CollectorRegistry())), quiet=quiet)
    port = await server.start("127.0.0.1", 0)
    node = make_node("sidecar~127.0.0.2~app.default~default.svc.cluster.local", labels={"app": "a"})
    cache.set(identity_from_node(node).proxy_class, snapshot({"c1": 1}))
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            async with AdsClient(f"127.0.0.1:{port}", node) as client:
                client.send(CLUSTER)
                client.ack(await client.recv())
        for _ in range(50):  # the handlers see the streams end
            if not server.status.streams():
                break
            await asyncio.sleep(0.05)
        assert not server.status.streams()
        # Each stream: its one response written, then its end.
        assert sum(reported) == 10, reported
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = {type(o).__name__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
        await server.stop(0)
    assert "RPCState" not in left and "_ServicerContext" not in left, sorted(left)


async def test_a_refused_stream_and_one_ended_before_its_first_request_are_reported_to_quiet() -> None:
    """A stream refused at its first request (a Node without an id) and one that ends
    before sending any request get no response, but gRPC frees their calls' state when their
    handlers return, as for any stream: the release waits for that too (each is a touch)."""
    quiet = CountingQuiet(delay=60)
    reported = quiet.reported
    registry = CollectorRegistry()
    server = AdsServer(SnapshotCache(), StatusRegistry(XdsMetrics(registry)), quiet=quiet)
    port = await server.start("127.0.0.1", 0)
    try:
        async with AdsClient(f"127.0.0.1:{port}", make_node("")) as refused:
            refused.send(CLUSTER)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await refused.recv()
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for _ in range(50):
            if reported:
                break
            await asyncio.sleep(0.05)
        assert reported == [1]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources")()
            await call.done_writing()  # ends the stream without a request
            assert await call.read() is grpc.aio.EOF
        for _ in range(50):
            if len(reported) == 2:
                break
            await asyncio.sleep(0.05)
        assert reported == [1, 1]
        assert registry.get_sample_value("pilot_xds_stream_errors_total", {"reason": "bad_node"}) == 1
    finally:
        await server.stop(0)
