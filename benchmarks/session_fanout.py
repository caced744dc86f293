"""Pilot's per-stream CPU for one push, without gRPC: N sessions of one class answer a change.

    python -m benchmarks.session_fanout --streams 1000 --rounds 5

The ADS load benchmark measures the whole system on shared cores, where a few milliseconds
are noise; this isolates what pilot's own code costs per stream and push. N sessions
(SotW or delta) subscribe like Envoy to the benchmark mesh's snapshot for one class and ACK
it; then, for each of an endpoint and a route change, every session computes its responses
and handles its ACK. Printed per stream, for each protocol and change: microseconds in
`responses` and in ACK handling, timed apart from the harness's own ACK building, and Python
function calls, counted (a figure that does not move with the machine's load).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from benchmarks import meshgen
from pilot.config import load_dir
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyIdentity, ProxyKind
from pilot.translate.generate import generate_parts
from pilot.xds import typeurls
from pilot.xds.delta import DeltaSession
from pilot.xds.session import SessionBase, Subscriptions
from pilot.xds.snapshot import Serializer, Snapshot
from pilot.xds.sotw import SotwSession
from pilot.xds.status import StatusRegistry, XdsMetrics

PROXY = ProxyClass(ProxyKind.SIDECAR, "team-0", (("app", "loadgen"),))


def snapshot_of(directory: Path, serializer: Serializer) -> Snapshot:
    """The class's snapshot as pilot publishes it: shared parts, serialized through one `Serializer`."""
    mesh = build_mesh(load_dir(directory).objects)
    serializer.next_mesh()
    return Snapshot.from_parts(generate_parts(mesh, PROXY), serializer)


def mesh_changes(services: int, rounds: int) -> tuple[Snapshot, dict[str, list[Snapshot]]]:
    """The benchmark mesh's snapshot for one class, and `rounds` endpoint and route changes to it,
    alternating, each as pilot's fast paths publish it: the class's last snapshot with the one type
    replaced (so the other types stay the very views, as in pilot)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = meshgen.generate(Path(tmp), services=services)
        serializer = Serializer()
        before = snapshot_of(config.directory, serializer)
        changes: dict[str, list[Snapshot]] = {"endpoint": [], "route": []}
        last = before
        for i in range(rounds):
            config.endpoint_change(i * 7 + 3)
            config.write_service(i * 7 + 3)
            last = last.with_type(typeurls.ENDPOINT, snapshot_of(config.directory, serializer).of(typeurls.ENDPOINT))
            changes["endpoint"].append(last)
            config.route_change(i * 7)
            config.write_service(i * 7)
            last = last.with_type(typeurls.ROUTE, snapshot_of(config.directory, serializer).of(typeurls.ROUTE))
            changes["route"].append(last)
    return before, changes


def _names(snapshot: Snapshot, type_url: str) -> list[str]:
    return sorted(snapshot.of(type_url))


def sotw_request(snapshot: Snapshot, type_url: str, nonce: str = "") -> Any:
    names = [] if type_url in typeurls.WILDCARD_TYPES else _names(snapshot, type_url)
    return discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names, response_nonce=nonce)


def delta_request(snapshot: Snapshot, type_url: str, nonce: str = "") -> Any:
    if nonce:
        return discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=nonce)
    names = [] if type_url in typeurls.WILDCARD_TYPES else _names(snapshot, type_url)
    return discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names)


def _nonces(responses: list[bytes], delta: bool) -> list[tuple[str, str]]:
    kind = discovery_pb2.DeltaDiscoveryResponse if delta else discovery_pb2.DiscoveryResponse
    return [(r.type_url, r.nonce) for r in (kind.FromString(raw) for raw in responses)]


class Fleet:
    """N sessions of one protocol, all subscribed to every type and in sync with `snapshot`."""

    def __init__(self, n: int, delta: bool, snapshot: Snapshot) -> None:
        self.delta = delta
        self.registry = StatusRegistry(XdsMetrics(CollectorRegistry()))
        kind: type[SessionBase[Any]] = DeltaSession if delta else SotwSession
        self.sessions: list[SessionBase[Any]] = []
        shared = Subscriptions()  # as the ADS server shares one across its streams
        for i in range(n):
            identity = ProxyIdentity(f"sidecar~10.0.0.{i}~w{i}.team-0~team-0.svc.cluster.local", "bench", PROXY)
            session = kind(self.registry.open(identity, kind.protocol, "bench"), self.registry, shared)
            for type_url in typeurls.PUSH_ORDER[:4]:
                make = delta_request if delta else sotw_request
                session.handle(make(snapshot, type_url))
            self.sessions.append(session)
        self.push(snapshot)

    def push(self, snapshot: Snapshot) -> tuple[float, float, int]:
        """Every session answers `snapshot`, then handles its ACKs as received bytes (as the server
        does: `handle_wire`). Returns the seconds spent in `responses` and in handling the ACKs (the
        ACK bytes are built in between, untimed) and the number of responses."""
        started = time.perf_counter()
        answers = [session.responses(snapshot) for session in self.sessions]
        answered = time.perf_counter()
        make = delta_request if self.delta else sotw_request
        acks = [[make(snapshot, type_url, nonce).SerializeToString() for type_url, nonce in _nonces(r, self.delta)]
                for r in answers]
        handling = time.perf_counter()
        for session, wires in zip(self.sessions, acks, strict=True):
            for wire in wires:
                session.handle_wire(wire)
        return answered - started, time.perf_counter() - handling, sum(len(r) for r in answers)

    def calls(self, snapshot: Snapshot) -> float:
        """Python function calls per stream for one push and its ACKs, harness included (counted,
        not timed: the same on any machine, unlike microseconds on shared cores)."""
        count = 0

        def profile(frame: Any, event: str, arg: Any) -> None:
            nonlocal count
            if event == "call":
                count += 1

        sys.setprofile(profile)
        try:
            self.push(snapshot)
        finally:
            sys.setprofile(None)
        return count / len(self.sessions)


def measure(delta: bool, streams: int, before: Snapshot, changes: dict[str, list[Snapshot]]) -> dict[str, str]:
    """Per change kind: median microseconds per stream in `responses` and in ACK handling (the
    harness's own ACK building is outside both), and Python calls per stream in the last round."""
    fleet = Fleet(streams, delta, before)
    answer: dict[str, list[float]] = {kind: [] for kind in changes}
    ack: dict[str, list[float]] = {kind: [] for kind in changes}
    for i in range(len(changes["endpoint"]) - 1):
        for kind, snapshots in changes.items():
            took, acked, _ = fleet.push(snapshots[i])
            answer[kind].append(took / streams)
            ack[kind].append(acked / streams)
    calls = {kind: fleet.calls(snapshots[-1]) for kind, snapshots in changes.items()}
    return {kind: f"{statistics.median(answer[kind]) * 1e6:6.1f} + {statistics.median(ack[kind]) * 1e6:5.1f} us, "
                  f"{calls[kind]:5.1f} calls" for kind in changes}


@click.command()
@click.option("--streams", default=1000, show_default=True)
@click.option("--rounds", default=5, show_default=True, help="Changes of each kind, alternating.")
@click.option("--services", default=50, show_default=True)
def main(streams: int, rounds: int, services: int) -> None:
    """Microseconds of pilot session work per stream and push (lower is better)."""
    before, changes = mesh_changes(services, rounds)
    print(f"{streams} streams, {services} services, per stream and push: microseconds in responses + in ACK "
          f"handling (median of {rounds - 1} rounds), and Python calls in the last round (counted)")
    for protocol in ("sotw", "delta"):
        result = measure(protocol == "delta", streams, before, changes)
        print("  " + protocol.ljust(6) + "  ".join(f"{kind} {text}" for kind, text in result.items()))


if __name__ == "__main__":
    main()
