"""ACKs wait for a push's writes: the wave of writes in flight, what it holds and for how long.
The last tests run it in pilot's ADS server over real gRPC, with a proxy that stops reading."""

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
from pilot.xds.typeurls import CLUSTER, LISTENER
from pilot.xds.writewave import WriteWave
from tests.unit.stuckproxies import metric, node


async def test_readers_are_held_while_writes_are_in_flight_and_read_on_when_the_last_ends() -> None:
    wave = WriteWave(patience=30)
    assert not wave.holding
    await asyncio.wait_for(wave.hold(), 1)  # nothing in flight: no wait
    wave.begin()
    wave.begin()
    assert wave.holding
    held = asyncio.create_task(wave.hold())
    await asyncio.sleep(0.01)
    wave.end()
    await asyncio.sleep(0.01)
    assert not held.done() and wave.holding  # one write still in flight
    wave.end()
    await asyncio.wait_for(held, 1)
    assert not wave.holding and wave.holds == 1 and wave.released == 0
    wave.begin()  # the next wave holds again
    assert wave.holding
    wave.end()
    wave.close()


async def test_a_wave_that_outlasts_its_patience_holds_no_one_until_its_writes_drain() -> None:
    wave = WriteWave(patience=0.05)
    wave.begin()  # a write that never ends (a proxy that does not read)
    held = asyncio.create_task(wave.hold())
    await asyncio.wait_for(held, 5)  # released by the patience, the write still in flight
    assert wave.in_flight == 1 and wave.released == 1
    assert not wave.holding
    wave.begin()  # more writes while the long one lasts: still no holding
    assert not wave.holding
    wave.end()
    wave.end()
    wave.begin()  # drained once: a new wave holds again
    assert wave.holding
    wave.end()
    wave.close()


async def test_a_later_wave_gets_its_own_patience_from_the_one_timer() -> None:
    """The timer armed for an earlier wave does not release a later one early: it re-arms itself
    for the later wave's deadline (one timer for all waves, not one per wave)."""
    wave = WriteWave(patience=1.0)
    wave.begin()
    wave.end()  # a short wave; its timer stays armed for t = 1.0
    await asyncio.sleep(0.5)
    wave.begin()  # a new wave at t = 0.5: its deadline is t = 1.5
    await asyncio.sleep(0.7)  # t = 1.2: the first deadline has passed
    assert wave.holding and wave.released == 0
    await asyncio.wait_for(wave.hold(), 5)  # released at its own deadline, the write still in flight
    assert wave.released == 1 and wave.in_flight == 1
    wave.end()
    wave.close()


async def test_a_closed_wave_never_holds() -> None:
    wave = WriteWave(patience=30)
    wave.begin()
    held = asyncio.create_task(wave.hold())
    await asyncio.sleep(0.01)
    wave.close()
    await asyncio.wait_for(held, 1)
    wave.end()
    wave.begin()
    assert not wave.holding
    wave.end()


@pytest.fixture(params=[30_000, 300], ids=["patient", "impatient"])
async def served(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Pilot]:
    meshgen.generate(tmp_path, services=200)  # CDS responses of ~250 KB: past the client's window
    settings = PilotSettings(ads_port=0, debug_port=0, config_dir=tmp_path, write_budget_mb=0,
                             ack_hold_ms=request.param)
    async with Pilot(settings) as p:
        yield p


async def test_after_an_ack_a_proxys_next_request_waits_for_the_writes_in_flight(served: Pilot) -> None:
    """A proxy that does not read keeps pilot's write to it in flight. A delta proxy's request that
    follows its ACK is read when that write ends, or once the wave has lasted the hold's patience;
    a SotW proxy's is read at once (SotW streams are not held)."""
    pilot = served
    wave = pilot.ads.write_wave
    assert wave is not None
    channel = grpc.aio.insecure_channel(pilot.ads_address, options=SMALL_WINDOW)
    try:
        async with AdsClient(pilot.ads_address, node("reads"), delta=True) as reads, \
                AdsClient(pilot.ads_address, node("sotw")) as sotw:
            reads.send_delta(CLUSTER)
            clusters = await asyncio.wait_for(reads.recv(), 15)
            reads.ack(clusters)
            sotw.send(CLUSTER)
            sotw_clusters = await asyncio.wait_for(sotw.recv(), 15)
            sotw.ack(sotw_clusters)
            stuck = channel.stream_stream(SOTW_METHOD, request_serializer=bytes, response_deserializer=bytes)()
            await stuck.write(discovery_pb2.DiscoveryRequest(node=node("stuck"), type_url=CLUSTER).SerializeToString())
            for _ in range(200):
                if wave.in_flight:
                    break
                await asyncio.sleep(0.02)
            assert wave.in_flight == 1  # its CDS response waits for it to read
            reads.ack(clusters)  # a plain ACK again (Envoy repeats one on reconnects too) ...
            reads.send_delta(LISTENER)  # ... then a request that needs an answer
            if wave.patience > 5:
                sotw.ack(sotw_clusters)  # the same from a SotW proxy: answered while the write is in flight
                sotw.send(LISTENER)
                assert (await asyncio.wait_for(sotw.recv(), 15)).type_url == LISTENER
                await reads.expect_silence(1.0)  # not read while the write is in flight
                assert wave.in_flight >= 1 and metric(pilot, "pilot_xds_ack_holds_total") >= 1
                first = discovery_pb2.DiscoveryResponse.FromString(await asyncio.wait_for(stuck.read(), 15))
                assert first.type_url == CLUSTER  # the write ended ...
            listeners = await asyncio.wait_for(reads.recv(), 15)  # ... or the wave outlasted its patience
            assert listeners.type_url == LISTENER and resource_names(listeners)
            if wave.patience < 5:
                assert wave.in_flight >= 1  # the stuck proxy still has not read (its write is in flight)
                assert metric(pilot, "pilot_xds_write_waves_outlasted_total") >= 1
            stuck.cancel()
    finally:
        await channel.close()
