"""The write budget: how many bytes of large responses gRPC may hold for proxies at once, taken in
turn, given back, and never a reason for a stuck proxy to hold up everyone else's pushes for long.
The last tests run it in pilot's ADS server over real gRPC, with proxies that stop reading."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from benchmarks import meshgen
from pilot.app import Pilot
from pilot.settings import PilotSettings
from pilot.testing.ads_client import SMALL_WINDOW, SOTW_METHOD, AdsClient, resource_names
from pilot.xds.typeurls import CLUSTER
from pilot.xds.writebudget import WriteBudget
from tests.unit.stuckproxies import metric, node


def test_small_responses_pass_uncounted_and_large_ones_are_counted_until_given_back() -> None:
    budget = WriteBudget(limit=1000, small=100)
    assert budget.take_now(99) == 0 and budget.in_flight == 0
    assert budget.take_now(600) == 600 and budget.take_now(400) == 400
    assert budget.in_flight == 1000
    assert budget.take_now(100) is None  # spent: this one must wait
    assert budget.take_now(50) == 0  # a small one never waits
    budget.give_back(600)
    assert budget.in_flight == 400
    assert budget.take_now(600) == 600


def test_a_response_larger_than_the_budget_goes_alone() -> None:
    budget = WriteBudget(limit=1000, small=100)
    assert budget.take_now(5000) == 5000
    assert budget.take_now(200) is None
    budget.give_back(5000)
    assert budget.take_now(200) == 200


async def test_waiting_writes_go_in_the_order_they_came_as_room_is_given_back() -> None:
    budget = WriteBudget(limit=1000, small=100, patience=30)
    assert budget.take_now(1000) == 1000
    order: list[str] = []

    async def write(name: str, size: int) -> None:
        await budget.take(size)
        order.append(name)

    waiting = [asyncio.create_task(write(n, s)) for n, s in (("a", 700), ("b", 200), ("c", 300))]
    await asyncio.sleep(0.01)
    assert order == [] and budget.waits == 3
    # "b" would fit in 300 bytes but came after "a": no overtaking, or a large write could starve.
    budget.give_back(300)
    await asyncio.sleep(0.01)
    assert order == []
    budget.give_back(700)  # 1000 free: a (700) and b (200) fit, c (300) does not
    await asyncio.sleep(0.01)
    assert order == ["a", "b"] and budget.in_flight == 900
    budget.give_back(700)
    await asyncio.gather(*waiting)
    assert order == ["a", "b", "c"] and budget.in_flight == 500 and budget.overdrawn == 0


async def test_a_write_that_waited_its_patience_goes_over_budget_and_is_counted() -> None:
    budget = WriteBudget(limit=1000, small=100, patience=0.05)
    budget.take_now(1000)  # held by a proxy that stopped reading
    assert await asyncio.wait_for(budget.take(400), 5) == 400
    assert budget.overdrawn == 1 and budget.in_flight == 1400
    budget.give_back(400)
    budget.give_back(1000)
    assert budget.in_flight == 0
    assert budget.take_now(1000) == 1000  # nothing left behind in the queue


async def test_a_write_waits_past_its_patience_while_the_budget_keeps_draining() -> None:
    """A long queue behind proxies that read (a fleet connecting at once) is not a stall: the
    waiting write goes in its turn, within budget, however long that takes."""
    budget = WriteBudget(limit=1000, small=100, patience=0.1)
    for _ in range(10):
        assert budget.take_now(100) == 100  # ten writes in flight, each taken in turn
    began = asyncio.get_running_loop().time()
    waiting = asyncio.create_task(budget.take(1000))
    for _ in range(10):  # one completes every 60 ms: 600 ms in all, six times the patience
        await asyncio.sleep(0.06)
        assert not waiting.done() or budget.in_flight == 1000
        budget.give_back(100)
    assert await asyncio.wait_for(waiting, 5) == 1000
    assert asyncio.get_running_loop().time() - began >= 0.5
    assert budget.overdrawn == 0 and budget.in_flight == 1000
    # Then a stall: nothing comes back, so the next write goes over budget after its patience.
    assert await asyncio.wait_for(budget.take(300), 5) == 300
    assert budget.overdrawn == 1 and budget.in_flight == 1300


async def test_a_cancelled_waiter_leaves_the_queue_and_keeps_no_bytes() -> None:
    budget = WriteBudget(limit=1000, small=100, patience=30)
    budget.take_now(1000)
    gone = asyncio.create_task(budget.take(800))
    after = asyncio.create_task(budget.take(300))
    await asyncio.sleep(0.01)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    budget.give_back(1000)
    assert await asyncio.wait_for(after, 5) == 300
    assert budget.in_flight == 300


@dataclass
class Served:
    pilot: Pilot
    mesh: meshgen.MeshConfig


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    mesh = meshgen.generate(tmp_path, services=200)  # CDS responses of ~250 KB: past the client's window
    # A 1 MB budget: four stuck CDS responses spend it.
    settings = PilotSettings(ads_port=0, debug_port=0, config_dir=tmp_path, write_budget_mb=1)
    async with Pilot(settings) as p:
        yield Served(p, mesh)


async def open_stuck(pilot: Pilot, channels: list[grpc.aio.Channel]) -> list[Any]:
    """A stream per channel that asks for clusters and never reads; returns once two wait for the budget."""
    calls = []
    for i, channel in enumerate(channels):
        call = channel.stream_stream(SOTW_METHOD, request_serializer=bytes, response_deserializer=bytes)()
        await call.write(discovery_pb2.DiscoveryRequest(node=node(f"stuck-{i}"), type_url=CLUSTER).SerializeToString())
        calls.append(call)
    for _ in range(100):
        if metric(pilot, "pilot_xds_write_budget_waits_total") >= 2:
            break
        await asyncio.sleep(0.05)
    return calls


async def test_proxies_that_stop_reading_hold_up_others_only_for_the_budgets_patience(served: Served) -> None:
    pilot = served.pilot
    channels = [grpc.aio.insecure_channel(pilot.ads_address, options=SMALL_WINDOW) for _ in range(6)]
    try:
        calls = await open_stuck(pilot, channels)
        # Four of them spent the budget; the others wait their turn instead of piling up copies.
        assert metric(pilot, "pilot_xds_write_budget_waits_total") >= 2
        assert metric(pilot, "pilot_xds_write_budget_bytes") <= 1024 * 1024
        # A connecting proxy that reads is served anyway, once the waits before it ran out of patience (2 s).
        async with AdsClient(pilot.ads_address, node("fine")) as fine:
            fine.send(CLUSTER)
            response = await asyncio.wait_for(fine.recv(), 15)
            assert "outbound|8080||svc-199.bench.svc.cluster.local" in resource_names(response)
        assert metric(pilot, "pilot_xds_write_budget_overdrawn_total") >= 2
        # The stuck ones still get their clusters when they read again.
        for call in calls:
            first = discovery_pb2.DiscoveryResponse.FromString(await asyncio.wait_for(call.read(), 15))
            assert first.type_url == CLUSTER and len(first.resources) >= 600
            call.cancel()
        for _ in range(100):  # every write ended: nothing is left counted
            if metric(pilot, "pilot_xds_write_budget_bytes") == 0:
                break
            await asyncio.sleep(0.05)
        assert metric(pilot, "pilot_xds_write_budget_bytes") == 0
    finally:
        for channel in channels:
            await channel.close()


async def test_a_push_to_a_connected_proxy_never_waits_for_the_budget(served: Served) -> None:
    pilot = served.pilot
    channels = [grpc.aio.insecure_channel(pilot.ads_address, options=SMALL_WINDOW) for _ in range(6)]
    try:
        async with AdsClient(pilot.ads_address, node("connected")) as connected:
            connected.send(CLUSTER)
            first = await asyncio.wait_for(connected.recv(), 15)
            connected.ack(first)
            calls = await open_stuck(pilot, channels)  # the budget is spent, and two connecting proxies wait
            waits = metric(pilot, "pilot_xds_write_budget_waits_total")
            assert waits >= 2
            # A new service: every proxy's clusters change, a ~250 KB push to the connected proxy.
            new = meshgen.ServiceSpec(index=200, endpoints={"v1": ["10.2.0.1"], "v2": ["10.2.0.2"]})
            served.mesh.services.append(new)
            served.mesh.write_service(200)
            pushed = await asyncio.wait_for(connected.recv(), 15)
            assert "outbound|8080||svc-200.bench.svc.cluster.local" in resource_names(pushed)
            assert len(pushed.SerializeToString()) >= 200_000
            assert metric(pilot, "pilot_xds_write_budget_waits_total") == waits  # it went without waiting
            for call in calls:
                call.cancel()
    finally:
        for channel in channels:
            await channel.close()

