"""Pilot's per-stream CPU in its ADS server, without gRPC, against a replay floor in the same run.

    python -m benchmarks.stream_fanout --streams 2000 --services 1000

Why: at mission scale pilot shares two cores with 2,000 simulated Envoys, so every microsecond it
spends per stream and push becomes latency, and the `ads_load` figures move by 10-20 % from run to
run. `session_fanout` times the sessions alone; this times everything pilot does per stream and
push, in one process and in a form that does not move with the machine's load.

N streams, one config class each (as per-workload classes at mission scale), run through the very
handler pilot registers with gRPC (`AdsServer.handler`): its writer and reader tasks, the cache
waking each class's stream, the session, the status rows and the metrics. An in-process client
stands in for gRPC and Envoy: `write` hands it the response and it queues the ACK Envoy would
send (its own work is timed apart and taken off). Each change is published as pilot's fast paths
publish it, every class's snapshot with one type replaced (`SnapshotCache.set`; the pusher's own
per-class steps are `ads_load`'s to measure).

The floor does the same with no pilot logic, like the replay baseline of `ads_load`: each stream
wakes on its class's new snapshot, writes the bytes pilot wrote for that change, and parses every
ACK. Printed per protocol and change: microseconds per stream (the fastest of the rounds) and
Python function calls per stream (counted in the last round: the same on any machine), for pilot
and the floor, and their difference, which is pilot's own cost per stream and push.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from benchmarks.session_fanout import delta_request, mesh_changes, sotw_request
from pilot.model.proxy import ProxyClass, ProxyIdentity, ProxyKind
from pilot.quiet import WhenQuiet
from pilot.xds import typeurls
from pilot.xds.cache import SnapshotCache
from pilot.xds.server import SERVICE, AdsServer
from pilot.xds.snapshot import Snapshot
from pilot.xds.status import StatusRegistry, XdsMetrics
from pilot.xds.wire import str_field

TYPES = typeurls.PUSH_ORDER[:4]  # CDS, EDS, LDS, RDS: what a sidecar subscribes to


@dataclass
class Client:
    """One simulated Envoy: its requests as a queue of wire bytes, ACKs built from templates."""

    delta: bool
    node_id: str
    key: ProxyClass
    requests: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    templates: dict[str, bytes] = field(default_factory=dict)  # type URL -> an ACK without its nonce
    received: int = 0
    due: int = 0  # responses this client waits for
    done: asyncio.Event = field(default_factory=asyncio.Event)
    last: bytes = b""  # the last response, to replay in the floor
    reading: bool = False  # a request was read: it counts as handled once the next is asked for

    def subscribe(self, snapshot: Snapshot) -> None:
        """Queue the four requests of a connecting sidecar and learn what its ACKs repeat (a SotW ACK
        repeats the names; the nonce, appended, is the field encoders write after them)."""
        make = delta_request if self.delta else sotw_request
        for type_url in TYPES:
            first = make(snapshot, type_url)
            first.node.id = self.node_id
            self.requests.put_nowait(first.SerializeToString())
            ack = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url) if self.delta else make(snapshot, type_url)
            self.templates[type_url] = ack.SerializeToString()
        self.expect(len(TYPES))

    def expect(self, responses: int) -> None:
        self.due = self.received + responses
        self.done.clear()

    def take(self, data: bytes) -> None:
        """A response arrived: ACK it."""
        kind = discovery_pb2.DeltaDiscoveryResponse if self.delta else discovery_pb2.DiscoveryResponse
        response = kind.FromString(data)
        nonce_field = 6 if self.delta else 5
        self.requests.put_nowait(self.templates[response.type_url] + str_field(nonce_field, response.nonce))
        self.last = data
        self.received += 1
        if self.received >= self.due:
            self.done.set()

    async def read(self) -> bytes:
        """The next request, as pilot reads it (`context.read`); the one before counts as handled."""
        if self.reading:
            self.requests.task_done()
        wire = await self.requests.get()
        self.reading = True
        return wire


@dataclass
class Context:
    """What the ADS handler uses of a gRPC servicer context; `write` hands the response to the client."""

    client: Client
    clock: list[float]  # seconds spent in clients, to take off

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        pass

    async def send_initial_metadata(self, metadata: Any) -> None:
        pass

    def peer(self) -> str:
        return "ipv4:127.0.0.1:15000"

    async def read(self) -> bytes:
        return await self.client.read()

    async def write(self, data: bytes) -> None:
        began = time.perf_counter()
        self.client.take(data)
        self.clock[0] += time.perf_counter() - began


@dataclass
class Result:
    """Per change kind: microseconds per stream in each round, and Python calls per stream."""

    micros: dict[str, list[float]] = field(default_factory=dict)
    calls: dict[str, float] = field(default_factory=dict)
    sent: dict[str, bytes] = field(default_factory=dict)  # the bytes a stream got for each change
    received: int = 0  # responses all clients got, connecting included


async def _floor_stream(cache: SnapshotCache, client: Client, context: Context, replay: dict[str, bytes],
                        change: list[str]) -> None:
    """The replay floor's stream: woken by its class's snapshot, writes the change's recorded bytes."""
    wake = asyncio.Event()
    kind = discovery_pb2.DeltaDiscoveryRequest if client.delta else discovery_pb2.DiscoveryRequest

    async def read() -> None:
        while True:
            kind.FromString(await client.read())

    reader = asyncio.create_task(read())
    try:
        with cache.watch(client.key, wake.set):
            for _ in TYPES:
                await context.write(replay["connect"])
            while True:
                wake.clear()
                await wake.wait()
                await context.write(replay[change[0]])
    finally:
        reader.cancel()


async def run_fleet(streams: int, delta: bool, before: Snapshot, changes: dict[str, list[Snapshot]],
                    replay: dict[str, bytes] | None = None) -> tuple[Result, StatusRegistry]:
    """N streams through pilot's ADS handler (`replay` None) or the floor (`replay`: the bytes each
    change sends); each change of `changes` published to every class in turn, alternating kinds."""
    cache, clock, result = SnapshotCache(), [0.0], Result()
    status = StatusRegistry(XdsMetrics(CollectorRegistry()))
    identities: dict[str, ProxyIdentity] = {}
    server = AdsServer(cache, status, lambda node: identities[node.id], quiet=WhenQuiet())
    method = "DeltaAggregatedResources" if delta else "StreamAggregatedResources"
    handler = server.handler().service(_Call(f"/{SERVICE}/{method}"))
    assert handler is not None and handler.stream_stream is not None
    kind = [""]
    clients, tasks = [], []
    for i in range(streams):
        key = ProxyClass(ProxyKind.SIDECAR, "bench", (("app", f"svc-{i}"),))
        client = Client(delta, f"sidecar~10.1.{i // 250}.{i % 250}~w{i}.bench~bench.svc.cluster.local", key)
        identities[client.node_id] = ProxyIdentity(client.node_id, "bench", key)
        cache.set(key, before)
        client.subscribe(before)
        context = Context(client, clock)
        stream = handler.stream_stream(None, context) if replay is None else \
            _floor_stream(cache, client, context, replay, kind)
        clients.append(client)
        tasks.append(asyncio.ensure_future(stream))
    await _settled(clients)
    rounds = list(zip(changes["endpoint"], changes["route"], strict=True))
    for i, pair in enumerate(rounds):
        for change, snapshot in zip(("endpoint", "route"), pair, strict=True):
            kind[0] = change
            counted = i == len(rounds) - 1
            calls, clock[0] = 0, 0.0

            def count(frame: Any, event: str, arg: Any) -> None:
                nonlocal calls
                if event == "call":
                    calls += 1

            for client in clients:
                client.expect(1)
            began = time.perf_counter()
            if counted:
                sys.setprofile(count)
            for client in clients:
                cache.set(client.key, snapshot)
            await _settled(clients)
            sys.setprofile(None)
            took = time.perf_counter() - began - clock[0]
            if counted:
                result.calls[change] = calls / streams
            else:
                result.micros.setdefault(change, []).append(took / streams * 1e6)
            result.sent[change] = clients[0].last
    result.received = sum(c.received for c in clients)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return result, status


@dataclass(frozen=True)
class _Call:
    """grpc.HandlerCallDetails: the method a generic handler is asked about."""

    method: str
    invocation_metadata: tuple[()] = ()


async def _settled(clients: list[Client]) -> None:
    """Every client got what it waits for, and every ACK queued was handled."""
    for client in clients:
        await client.done.wait()
    for client in clients:
        await client.requests.join()


def measure(streams: int, services: int, rounds: int, delta: bool) -> tuple[Result, Result]:
    """Pilot and the floor, for one protocol. `rounds` >= 2 (the last one is counted, not timed)."""
    before, changes = mesh_changes(services, rounds)
    pilot, _ = asyncio.run(run_fleet(streams, delta, before, changes))
    replay = {"connect": pilot.sent["endpoint"], **pilot.sent}
    floor, _ = asyncio.run(run_fleet(streams, delta, before, changes, replay))
    return pilot, floor


@click.command()
@click.option("--streams", default=2000, show_default=True)
@click.option("--services", default=1000, show_default=True)
@click.option("--rounds", default=4, show_default=True, help="Changes of each kind (>= 2; the last is counted).")
def main(streams: int, services: int, rounds: int) -> None:
    """Pilot's ADS server cost per stream and push, next to a replay floor (lower is better)."""
    if rounds < 2:
        raise click.BadParameter("at least 2 rounds: one timed, one counted", param_hint="--rounds")
    print(f"{streams} streams, one class each, {services} services; per stream and push: microseconds "
          f"(fastest of {rounds - 1} rounds) and Python calls (counted)")
    for protocol in ("sotw", "delta"):
        pilot, floor = measure(streams, services, rounds, protocol == "delta")
        for change in ("endpoint", "route"):
            p_us, f_us = min(pilot.micros[change]), min(floor.micros[change])
            p_calls, f_calls = pilot.calls[change], floor.calls[change]
            print(f"  {protocol:6}{change:9} pilot {p_us:6.1f} us {p_calls:6.1f} calls   floor {f_us:6.1f} us "
                  f"{f_calls:5.1f} calls   pilot's own {p_us - f_us:6.1f} us {p_calls - f_calls:6.1f} calls")


if __name__ == "__main__":
    main()
