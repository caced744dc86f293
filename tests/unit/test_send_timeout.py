"""The send timeout over real gRPC, in-process: a proxy that stops reading loses its stream, learns why
when it reads again, and others are served meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from benchmarks import meshgen
from pilot.app import Pilot
from pilot.settings import PilotSettings
from pilot.testing.ads_client import SMALL_WINDOW, SOTW_METHOD, AdsClient, resource_names
from pilot.xds.typeurls import CLUSTER
from tests.unit.stuckproxies import metric, node


@pytest.fixture
async def pilot(tmp_path: Path) -> AsyncIterator[Pilot]:
    meshgen.generate(tmp_path, services=200)  # CDS responses of ~250 KB: far past the client's window
    settings = PilotSettings(ads_port=0, debug_port=0, config_dir=tmp_path, send_timeout_ms=1000)
    async with Pilot(settings) as p:
        yield p


def send_timeouts(pilot: Pilot) -> float:
    return metric(pilot, "pilot_xds_stream_errors_total", {"reason": "send_timeout"})


async def test_a_proxy_that_stops_reading_is_closed_and_told_why(pilot: Pilot) -> None:
    async with grpc.aio.insecure_channel(pilot.ads_address, options=SMALL_WINDOW) as channel:
        call = channel.stream_stream(SOTW_METHOD, request_serializer=bytes, response_deserializer=bytes)()
        await call.write(discovery_pb2.DiscoveryRequest(node=node("slow"), type_url=CLUSTER).SerializeToString())
        for _ in range(200):  # it reads nothing: after 1 s pilot closes the stream on its side
            if send_timeouts(pilot) == 1:
                break
            await asyncio.sleep(0.05)
        assert send_timeouts(pilot) == 1
        assert not [r for r in pilot.status.syncz() if "slow" in r["proxy"]]
        # Others are served meanwhile, promptly and in full.
        async with AdsClient(pilot.ads_address, node("fine")) as fine:
            fine.send(CLUSTER)
            response = await asyncio.wait_for(fine.recv(), 10)
            assert "outbound|8080||svc-199.bench.svc.cluster.local" in resource_names(response)
        # Reading again, the slow proxy gets the stuck response, then the reason its stream ended.
        first = await asyncio.wait_for(call.read(), 10)
        assert isinstance(first, bytes) and len(first) > 100_000
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(call.read(), 10)
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "send timeout" in str(ended.value.details())


async def test_a_proxy_that_reads_slowly_but_within_the_timeout_keeps_its_stream(pilot: Pilot) -> None:
    async with grpc.aio.insecure_channel(pilot.ads_address, options=SMALL_WINDOW) as channel:
        call = channel.stream_stream(SOTW_METHOD, request_serializer=bytes, response_deserializer=bytes)()
        await call.write(discovery_pb2.DiscoveryRequest(node=node("steady"), type_url=CLUSTER).SerializeToString())
        await asyncio.sleep(0.1)  # slower than pilot, yet well within its 1 s
        response = discovery_pb2.DiscoveryResponse.FromString(await asyncio.wait_for(call.read(), 10))
        assert response.type_url == CLUSTER and len(response.resources) >= 600
        assert send_timeouts(pilot) == 0
        assert [r for r in pilot.status.syncz() if "steady" in r["proxy"]]
        call.cancel()
