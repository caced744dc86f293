"""The delivery design pinned down without timing: cost follows what changed, shared means shared.

A route change regenerates the routes of its own hosts only; an endpoint change touches no
cluster, listener or route; classes share the same objects for what they have in common; a
stream's memory does not grow with its ACKs; publishing many classes yields to the event loop.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from benchmarks import meshgen
from pilot.config.files import FileSource
from pilot.config.store import ConfigStore
from pilot.metrics import PushMetrics
from pilot.model.build import build_mesh
from pilot.model.conversions import Conversions
from pilot.model.diff import endpoints_only
from pilot.model.proxy import ProxyClass, ProxyIdentity, ProxyKind
from pilot.push import Pusher
from pilot.translate import generate_endpoints, generate_parts, routes
from pilot.xds.cache import SnapshotCache
from pilot.xds.delta import DeltaSession
from pilot.xds.resources import Resource, View
from pilot.xds.session import Subscriptions
from pilot.xds.snapshot import Snapshot
from pilot.xds.sotw import TYPE_FIELDS, SotwSession
from pilot.xds.status import StatusRegistry, XdsMetrics
from pilot.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from pilot.xds.wire import ack_nonce, names_region, subscribe_tail
from tests.conformance.builders import snapshot

SERVICES = 12


def workload_class(i: int) -> ProxyClass:
    """The class of a proxy of workload i: one per (service, version), as in the mission-scale benchmark."""
    labels = (("app", f"svc-{i // 2:03d}"), ("version", f"v{i % 2 + 1}"))
    return ProxyClass(ProxyKind.SIDECAR, meshgen.NAMESPACE, labels)


class Mesh:
    """A generated mesh on disk, its store, and a pusher over every workload's class."""

    def __init__(self, directory: Path, classes: int = 2 * SERVICES, slice_seconds: float = 0.01) -> None:
        self.config = meshgen.generate(directory, services=SERVICES)
        self.store = ConfigStore()
        self.files = FileSource(self.store, directory)
        self.files.sync()
        self.cache = SnapshotCache()
        self.metrics = PushMetrics(CollectorRegistry())
        conversions, carry = Conversions(), Conversions()
        self.carry = carry
        self.pusher = Pusher(
            self.store, self.cache, lambda objs: build_mesh(objs, "cluster.local", conversions, carry),
            generate_parts, self.metrics, endpoints_only=endpoints_only, generate_endpoints=generate_endpoints,
            slice_seconds=slice_seconds, carry=carry)
        self.classes = [workload_class(i) for i in range(classes)]
        self._watching = ExitStack()
        for key in self.classes:
            self._watching.enter_context(self.cache.watch(key))

    def snapshots(self) -> dict[ProxyClass, Snapshot]:
        found = {k: self.cache.get(k) for k in self.classes}
        assert all(s is not None for s in found.values())
        return found  # type: ignore[return-value]

    def edit(self, kind: str, service: int) -> None:
        if kind == "route":
            self.config.route_change(service)
        else:
            self.config.endpoint_change(service)
        self.config.write_service(service)
        self.files.sync()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    built = Mesh(tmp_path)
    built.pusher.rebuild()
    yield built
    built._watching.close()


@pytest.fixture
def serialized(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(type, name) of every message serialized from now on."""
    calls: list[tuple[str, str]] = []
    real = Resource.from_message.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Resource], type_url: str, name: str, message: Any) -> Resource:
        calls.append((type_url, name))
        return real(cls, type_url, name, message)  # type: ignore[no-any-return]

    monkeypatch.setattr(Resource, "from_message", classmethod(counting))
    return calls


def test_classes_share_what_they_have_in_common(mesh: Mesh) -> None:
    snaps = list(mesh.snapshots().values())
    first = snaps[0]
    assert len(first.of(CLUSTER)) > 3 * SERVICES  # not vacuous: every service's clusters
    for other in snaps[1:]:
        assert other.of(CLUSTER).parts[0] is first.of(CLUSTER).parts[0]  # the outbound clusters
        assert other.of(ENDPOINT) is first.of(ENDPOINT)
        assert other.of(ROUTE) is first.of(ROUTE)
        # What is a class's own depends only on its inbound ports and bind address: equal here
        # (one port, no bind address), so its listeners and whole cluster view are shared too.
        assert other.of(LISTENER) is first.of(LISTENER) and other.of(CLUSTER) is first.of(CLUSTER)
    # ...and a class's own part holds only its own resources.
    assert [n.split("|")[0] for n in first.of(CLUSTER).parts[1]] == ["inbound"]
    assert sorted(first.of(LISTENER)) == ["0.0.0.0_15001", f"0.0.0.0_{meshgen.PORT}"]


def test_a_route_change_regenerates_only_the_routes_of_its_hosts(
        mesh: Mesh, monkeypatch: pytest.MonkeyPatch, serialized: list[tuple[str, str]]) -> None:
    built: list[str] = []
    real = routes._build_routes

    def counting(mesh_: Any, service: Any, *args: Any) -> Any:
        built.append(service.host)
        return real(mesh_, service, *args)

    monkeypatch.setattr(routes, "_build_routes", counting)
    before = mesh.snapshots()
    mesh.edit("route", 3)
    mesh.pusher.rebuild()
    after = mesh.snapshots()
    assert built == [mesh.config.services[3].host]  # one virtual host's routes, once for every class
    # One route configuration serialized (all classes share it); nothing else.
    assert serialized == [(ROUTE, "outbound")]
    for key, old in before.items():
        new = after[key]
        assert new.version(ROUTE) != old.version(ROUTE)
        for type_url in (CLUSTER, ENDPOINT, LISTENER):
            assert new.version(type_url) == old.version(type_url)
            assert all(new.of(type_url)[n] is r for n, r in old.of(type_url).items())  # same bytes, same objects


def test_endpoint_changes_keep_what_the_next_route_change_reuses(mesh: Mesh) -> None:
    """The EDS fast path asks only for endpoints; that must not make the carried clusters and
    routes look unused, or the next rule change would regenerate and serialize everything."""
    for i in range(3):
        mesh.edit("endpoint", i)
        mesh.pusher.rebuild()
    serialized: list[tuple[str, str]] = []
    real = Resource.from_message.__func__  # type: ignore[attr-defined]

    def counting(cls: type[Resource], type_url: str, name: str, message: Any) -> Resource:
        serialized.append((type_url, name))
        return real(cls, type_url, name, message)  # type: ignore[no-any-return]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Resource, "from_message", classmethod(counting))
        mesh.edit("route", 4)
        mesh.pusher.rebuild()
    # The route configuration, and the clusters of the three services whose endpoints moved (their
    # Service objects changed, so their clusters are generated once more; same bytes, new objects).
    moved = {mesh.config.services[i].host for i in range(3)}
    assert (ROUTE, "outbound") in serialized
    clusters = [n for t, n in serialized if t == CLUSTER]
    assert len(serialized) == 1 + len(clusters) and {n.split("|")[3] for n in clusters} == moved


def test_an_endpoint_change_touches_no_cluster_listener_or_route(
        mesh: Mesh, serialized: list[tuple[str, str]]) -> None:
    before = mesh.snapshots()
    mesh.edit("endpoint", 5)
    mesh.pusher.rebuild()
    after = mesh.snapshots()
    host = mesh.config.services[5].host
    # The service's assignments (whole service, v1, v2) are all that is serialized.
    assert sorted(serialized) == sorted((ENDPOINT, f"outbound|{meshgen.PORT}|{s}|{host}") for s in ("", "v1", "v2"))
    for key, old in before.items():
        new = after[key]
        for type_url in (CLUSTER, LISTENER, ROUTE):
            assert new.of(type_url) is old.of(type_url)
        assert new.version(ENDPOINT) != old.version(ENDPOINT)
        changed = new.of(ENDPOINT).changes_from(old.of(ENDPOINT), old.version(ENDPOINT))
        # v1 moved (and so did the whole service); v2 was regenerated with the same content.
        assert sorted(changed) == sorted(f"outbound|{meshgen.PORT}|{s}|{host}" for s in ("", "v1"))


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_an_endpoint_change_costs_a_stream_nothing_for_its_other_types(
        mesh: Mesh, delta: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream in sync with every type gets only EDS after an endpoint change, and never even asks
    the unchanged clusters, listeners and routes for its view of them: the fast path published
    the same objects, and the session sees it by identity (2,000 streams x 3 types per push)."""
    registry = _registry()
    key = mesh.classes[0]
    status = registry.open(ProxyIdentity("p", "c", key), "delta" if delta else "sotw", "test")
    session: Any = DeltaSession(status, registry) if delta else SotwSession(status, registry)
    snap = mesh.cache.get(key)
    assert snap is not None

    def names(type_url: str) -> list[str]:
        return [] if type_url in (CLUSTER, LISTENER) else sorted(snap.of(type_url))

    def request(type_url: str, nonce: str = "") -> Any:
        if delta:
            return discovery_pb2.DeltaDiscoveryRequest(
                type_url=type_url, response_nonce=nonce, resource_names_subscribe=[] if nonce else names(type_url))
        return discovery_pb2.DiscoveryRequest(type_url=type_url, response_nonce=nonce, resource_names=names(type_url))

    def push_and_ack(current: Snapshot) -> list[str]:
        sent = []
        for raw in session.responses(current):
            kind = discovery_pb2.DeltaDiscoveryResponse if delta else discovery_pb2.DiscoveryResponse
            resp = kind.FromString(raw)
            sent.append(resp.type_url)
            session.handle_wire(request(resp.type_url, resp.nonce).SerializeToString())
        return sent

    for type_url in (CLUSTER, ENDPOINT, LISTENER, ROUTE):
        session.handle_wire(request(type_url).SerializeToString())
        assert push_and_ack(snap) == [type_url]
    asked: list[str] = []
    real = View.view

    def counting(self: View, names: frozenset[str] | None) -> View:
        assert after is not None
        asked.append(next(t for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE) if after.of(t) is self))
        return real(self, names)

    mesh.edit("endpoint", 3)
    mesh.pusher.rebuild()
    after = mesh.cache.get(key)
    assert after is not None and after is not snap
    published = time.monotonic_ns()
    monkeypatch.setattr(View, "view", counting)
    assert push_and_ack(after) == [ENDPOINT]
    assert asked == [ENDPOINT]
    # Skipped, but taken into account: `meshctl wait` counts the proxy as holding this snapshot.
    assert all(status.of(t).current_at >= published for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE))


def _registry() -> StatusRegistry:
    return StatusRegistry(XdsMetrics(CollectorRegistry()))


def _identity() -> ProxyIdentity:
    return ProxyIdentity("p", "c", workload_class(0))


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_a_streams_memory_does_not_grow_with_its_acks(mesh: Mesh, delta: bool) -> None:
    """Hundreds of pushes and ACKs, each repeating a subscription of every EDS name: the stream
    keeps referring to shared objects (the view, the subscription), and allocates nothing it keeps."""
    registry, subscriptions = _registry(), Subscriptions()
    status = registry.open(_identity(), "delta" if delta else "sotw", "test")
    session: Any = DeltaSession(status, registry, subscriptions) if delta else SotwSession(status, registry,
                                                                                            subscriptions)
    key = mesh.classes[0]
    names = sorted(mesh.cache.get(key).of(ENDPOINT))  # type: ignore[union-attr]

    def request(nonce: str = "", first: bool = False) -> tuple[Any, bytes]:
        if delta:
            msg: Any = discovery_pb2.DeltaDiscoveryRequest(
                type_url=ENDPOINT, response_nonce=nonce, resource_names_subscribe=names if first else [])
        else:
            msg = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, response_nonce=nonce, resource_names=names,
                                                 version_info="v" if nonce else "")
        return msg, msg.SerializeToString()

    def push_and_ack() -> None:
        snap = mesh.cache.get(key)
        assert snap is not None
        for raw in session.responses(snap):
            resp = (discovery_pb2.DeltaDiscoveryResponse if delta else discovery_pb2.DiscoveryResponse).FromString(raw)
            assert resp.type_url == ENDPOINT
            session.handle_wire(request(resp.nonce)[1])

    session.handle_wire(request(first=True)[1])
    push_and_ack()
    for i in range(5):  # warm up: every memo that will exist, exists
        mesh.edit("endpoint", i)
        mesh.pusher.rebuild()
        push_and_ack()
    state = session.types[ENDPOINT]
    tracemalloc.start()
    try:
        start = tracemalloc.take_snapshot()
        for i in range(60):
            mesh.edit("endpoint", i)
            mesh.pusher.rebuild()
            push_and_ack()
            assert state.held is mesh.cache.get(key).of(ENDPOINT)  # type: ignore[union-attr]
        end = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert isinstance(state.held, View) and state.acked is state.held  # references, not copies
    grown = sum(s.size_diff for s in end.compare_to(start, "filename")
                if any(f.filename.endswith(("/xds/sotw.py", "/xds/delta.py", "/xds/session.py")) for f in s.traceback))
    assert grown < 16 * 1024, grown  # a few small objects at most, not a copy of ~40 names per ACK


def test_publishing_many_classes_yields_to_the_event_loop(tmp_path: Path) -> None:
    """A probe task keeps running while 2,000 classes are published (yield after every slice)."""
    built = Mesh(tmp_path, classes=2000, slice_seconds=0.0)
    published: list[int] = []
    probe_saw: list[int] = []
    real_set = built.cache.set

    def counting_set(key: ProxyClass, snap: Snapshot) -> None:
        real_set(key, snap)
        published.append(1)

    built.cache.set = counting_set  # type: ignore[method-assign,assignment]

    async def scenario() -> None:
        done = asyncio.Event()

        async def probe() -> None:
            while not done.is_set():
                probe_saw.append(len(published))
                await asyncio.sleep(0)

        task = asyncio.create_task(probe())
        await built.pusher.rebuild_yielding()
        done.set()
        await task

    asyncio.run(scenario())
    built._watching.close()
    assert len(published) == 2000
    during = {n for n in probe_saw if 0 < n < 2000}
    assert len(during) > 100  # the probe ran between publications, again and again


def request_names_key(raw: bytes, type_fields: dict[bytes, str]) -> bytes | None:
    found = names_region(raw, type_fields)
    return None if found is None else raw[found[0]:found[1]]


def test_the_names_of_an_ack_are_compared_as_bytes() -> None:
    names = [f"outbound|80||svc-{i}.example" for i in range(50)]
    first = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names)
    first.node.id = "sidecar~1.2.3.4~a.ns~ns.svc.cluster.local"
    ack = discovery_pb2.DiscoveryRequest(version_info="abc", type_url=ENDPOINT, resource_names=names,
                                         response_nonce="n-1")
    other = discovery_pb2.DiscoveryRequest(version_info="abc", type_url=ENDPOINT, resource_names=names[:-1],
                                           response_nonce="n-1")
    key = request_names_key(first.SerializeToString(), TYPE_FIELDS)
    assert key is not None and key == request_names_key(ack.SerializeToString(), TYPE_FIELDS)
    assert key != request_names_key(other.SerializeToString(), TYPE_FIELDS)
    nack = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names, response_nonce="n-1")
    nack.error_detail.message = "rejected"
    assert request_names_key(nack.SerializeToString(), TYPE_FIELDS) == key  # the same subscription


def _count_parses(monkeypatch: pytest.MonkeyPatch, session_type: type[SotwSession] | type[DeltaSession]) -> list[int]:
    """The sizes of the requests `session_type` decodes from now on (its `parse`), in order."""
    decoded: list[int] = []
    real = session_type.parse

    def counting(data: bytes) -> Any:
        decoded.append(len(data))
        return real(data)

    monkeypatch.setattr(session_type, "parse", staticmethod(counting))
    return decoded


def test_an_ack_repeating_its_names_is_applied_without_decoding_them(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = _registry()
    session = SotwSession(registry.open(_identity(), "sotw", "test"), registry)
    names = [f"c{i}" for i in range(1, 40)]
    snap = snapshot({n: i + 1 for i, n in enumerate(names)})
    session.handle_wire(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names).SerializeToString())
    state = session.types[ENDPOINT]
    subscription, key = state.names, state.requested_key
    (raw,) = session.responses(snap)
    nonce = discovery_pb2.DiscoveryResponse.FromString(raw).nonce
    decoded = _count_parses(monkeypatch, SotwSession)
    ack = discovery_pb2.DiscoveryRequest(version_info="v", type_url=ENDPOINT, resource_names=names,
                                         response_nonce=nonce)
    session.handle_wire(ack.SerializeToString())
    assert decoded == [] and registry.streams()[0].of(ENDPOINT).acked_version  # ACKed, names never decoded
    assert state.names is subscription and state.requested_key is key
    # Other names (one fewer) are decoded the ordinary way, and the subscription follows them.
    fewer = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names[:-1], response_nonce=nonce)
    session.handle_wire(fewer.SerializeToString())
    assert len(decoded) == 1 and state.names == frozenset(names[:-1])



def test_a_plain_sotw_ack_is_read_without_a_message_and_anything_more_the_ordinary_way(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SotW ACK whose names repeat the stream's and that carries nothing after its type but the
    nonce is settled from that field alone; a NACK (error_detail after the nonce), a stale nonce and
    a request carrying a node behave as the decoded ones do."""
    registry = _registry()
    session = SotwSession(registry.open(_identity(), "sotw", "test"), registry)
    names = [f"c{i}" for i in range(1, 40)]
    status = registry.streams()[0]
    session.handle_wire(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names).SerializeToString())
    messages: list[int] = []
    real = discovery_pb2.DiscoveryRequest.FromString

    def counted(data: bytes) -> Any:
        messages.append(len(data))
        return real(data)

    monkeypatch.setattr(discovery_pb2.DiscoveryRequest, "FromString", staticmethod(counted))

    def push(version: int) -> str:
        (raw,) = session.responses(snapshot({n: version for n in names}))
        return str(discovery_pb2.DiscoveryResponse.FromString(raw).nonce)

    def request(nonce: str, **fields: Any) -> bytes:
        return bytes(discovery_pb2.DiscoveryRequest(
            version_info="v", type_url=ENDPOINT, resource_names=names, response_nonce=nonce, **fields
        ).SerializeToString())

    nonce = push(1)
    assert not session.handle_wire(request(nonce))  # a plain ACK: nothing to answer
    assert status.of(ENDPOINT).acked_version and not session.pending
    assert messages == []  # no DiscoveryRequest was decoded
    nonce = push(2)
    nack = discovery_pb2.DiscoveryRequest.FromString(request(nonce))
    nack.error_detail.message = "rejected"
    session.handle_wire(nack.SerializeToString())
    assert status.of(ENDPOINT).nack_message == "rejected" and len(messages) == 2  # decoded: it has an error
    assert not session.handle_wire(request("stale"))  # a stale nonce is ignored, as decoded
    messages.clear()
    nonce = push(3)
    with_node = discovery_pb2.DiscoveryRequest.FromString(request(nonce))
    with_node.node.id = "sidecar~1.2.3.4~a.ns~ns.svc.cluster.local"
    session.handle_wire(with_node.SerializeToString())  # the node precedes the names: still a plain ACK
    assert len(messages) == 1  # this test's own
    endpoints = status.of(ENDPOINT)
    assert endpoints.nack_message == "" and endpoints.acked_version == endpoints.sent_version


def _delta_subscribe(names: list[str], node_id: str = "", **fields: Any) -> bytes:
    request = discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT, resource_names_subscribe=names, **fields)
    if node_id:
        request.node.id = node_id
    return bytes(request.SerializeToString())


def test_a_delta_subscription_another_stream_sent_is_taken_without_decoding_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Envoy's first EDS request on a delta stream names every cluster; the second stream sending
    the same bytes (with its own node) gets the first one's subscription object, decodes nothing,
    and is answered exactly as a stream that decoded the request."""
    registry, subscriptions = _registry(), Subscriptions()
    names = [f"outbound|80||svc-{i}.example" for i in range(1, 60)]
    snap = snapshot({n: i + 1 for i, n in enumerate(names)})

    def session(node: str, shared: Subscriptions) -> DeltaSession:
        return DeltaSession(registry.open(ProxyIdentity(node, "c", ProxyClass(ProxyKind.SIDECAR, "ns")), "delta", "t"),
                            registry, shared)

    first = session("a", subscriptions)
    assert first.handle_wire(_delta_subscribe(names, "a"))
    decoded = _count_parses(monkeypatch, DeltaSession)
    second = session("b", subscriptions)
    assert second.handle_wire(_delta_subscribe(list(names), "b"))  # a node of its own: not part of the tail
    assert decoded == [] and second.types[ENDPOINT].names is first.types[ENDPOINT].names
    third = session("c", Subscriptions())  # nothing remembered: decodes
    assert third.handle_wire(_delta_subscribe(names))
    assert len(decoded) == 1

    def answer(s: DeltaSession) -> list[tuple[str, list[tuple[str, str]]]]:
        out = []
        for raw in s.responses(snap):
            response = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
            out.append((response.type_url, sorted((r.name, r.version) for r in response.resources)))
        return out

    assert answer(second) == answer(third) == answer(first) != []


@pytest.mark.parametrize("extra", [
    {"resource_names_unsubscribe": ["gone"]},
    {"response_nonce": "n-1"},
    {"initial_resource_versions": {"outbound|80||svc-1.example": "v1"}},
])
def test_a_delta_request_asking_more_than_a_subscription_is_decoded_every_time(
        extra: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    registry, subscriptions = _registry(), Subscriptions()
    names = [f"outbound|80||svc-{i}.example" for i in range(1, 20)]
    tail_at = len(discovery_pb2.DeltaDiscoveryRequest(type_url=ENDPOINT).SerializeToString())  # no node
    raw = _delta_subscribe(names, **extra)
    for node in ("a", "b"):
        DeltaSession(registry.open(ProxyIdentity(node, "c", ProxyClass(ProxyKind.SIDECAR, "ns")), "delta", "t"),
                     registry, subscriptions).handle_wire(raw)
    assert subscriptions.by_tail(raw, tail_at) is None
    # The plain subscription is remembered; one name changed, same length and place, is not taken for it.
    plain = _delta_subscribe(names)
    DeltaSession(registry.open(ProxyIdentity("c", "c", ProxyClass(ProxyKind.SIDECAR, "ns")), "delta", "t"),
                 registry, subscriptions).handle_wire(plain)
    assert subscriptions.by_tail(plain, tail_at) == frozenset(names)
    changed = _delta_subscribe([*names[:-1], names[-1][:-1] + "X"])
    assert len(changed) == len(plain) and subscriptions.by_tail(changed, tail_at) is None


def test_streams_taking_the_same_step_share_one_response_object(mesh: Mesh) -> None:
    """Proxies of different classes brought to the same shared view get the same bytes object (not
    a copy each); every stream still sees a fresh nonce on each of its responses."""
    registry, subscriptions = _registry(), Subscriptions()
    sessions = []
    for key in mesh.classes[:3]:
        status = registry.open(ProxyIdentity(str(key), "c", key), "sotw", "test")
        session = SotwSession(status, registry, subscriptions)
        names = sorted(mesh.cache.get(key).of(ENDPOINT))  # type: ignore[union-attr]
        request = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names)
        session.handle(request, request.SerializeToString())
        sessions.append((key, session, names))

    def push() -> list[bytes]:
        out = []
        for key, session, names in sessions:
            (raw,) = session.responses(mesh.snapshots()[key])
            out.append(raw)
            nonce = discovery_pb2.DiscoveryResponse.FromString(raw).nonce
            ack = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names, response_nonce=nonce)
            session.handle(ack, ack.SerializeToString())
        return out

    first = push()
    assert first[0] is first[1] is first[2]  # the whole view: one encoding for everyone
    mesh.edit("endpoint", 2)
    mesh.pusher.rebuild()
    change = push()
    assert change[0] is change[1] is change[2] and change[0] is not first[0]
    nonces = {discovery_pb2.DiscoveryResponse.FromString(r).nonce for r in (first[0], change[0])}
    assert len(nonces) == 2
    # A stream asking afresh for the same view gets its own response with a nonce it never had.
    key, session, names = sessions[0]
    again = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=names)
    session.handle(again, again.SerializeToString())
    (raw,) = session.responses(mesh.snapshots()[key])
    assert raw is not change[0] and discovery_pb2.DiscoveryResponse.FromString(raw).nonce not in nonces


def test_shared_responses_are_forgotten_where_streams_left_them(mesh: Mesh) -> None:
    """After a push the encoded responses kept for sharing are dropped from exactly the views
    streams put them on (the cache is told which), so no class's snapshot keeps a copy."""
    registry, subscriptions = _registry(), Subscriptions(sharing=mesh.cache.sharing)
    for key in mesh.classes[:3]:
        status = registry.open(ProxyIdentity(str(key), "c", key), "delta", "test")
        session = DeltaSession(status, registry, subscriptions)
        for type_url in (CLUSTER, LISTENER):
            session.handle(discovery_pb2.DeltaDiscoveryRequest(type_url=type_url))
        assert len(session.responses(mesh.snapshots()[key])) == 2
    holders = set(mesh.cache.sharing)
    assert holders and all(view.responses for view in holders)
    # Every view holding a response is one of the snapshots' views (or a part of one).
    in_snapshots = {id(v) for s in mesh.snapshots().values() for t in s.types.values() for v in (t, *t.parts)}
    assert {id(v) for v in holders} <= in_snapshots
    kept = sum(len(view.responses) for view in holders)
    assert mesh.cache.forget_responses() == kept
    assert not any(view.responses for view in holders) and not mesh.cache.sharing
    assert mesh.cache.forget_responses() == 0


def test_a_plain_ack_wakes_nobody_unless_removals_wait_for_it() -> None:
    """The writer of a stream is woken by an ACK only when the removal phase was put off for it:
    otherwise thousands of streams would each run a push's logic again for every ACK."""
    registry = _registry()
    session = SotwSession(registry.open(_identity(), "sotw", "test"), registry)

    def ack(raw: bytes, names: list[str] | None = None) -> bool:
        resp = discovery_pb2.DiscoveryResponse.FromString(raw)
        return session.handle(discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url, response_nonce=resp.nonce, resource_names=names or []))

    session.handle(discovery_pb2.DiscoveryRequest(type_url=CLUSTER))
    session.handle(discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=["c1", "c2"]))
    cds, eds = session.responses(snapshot({"c1": 1, "c2": 1}, routes={}))
    assert ack(cds) is False and ack(eds, ["c1", "c2"]) is False  # plain ACKs: nothing to do
    # c2 goes and c1's endpoints move: EDS goes out, the CDS removal waits for its ACK.
    (eds,) = session.responses(snapshot({"c1": 2}, routes={}))
    assert discovery_pb2.DiscoveryResponse.FromString(eds).type_url == ENDPOINT
    assert ack(eds, ["c1", "c2"]) is True
    (removal,) = session.responses(snapshot({"c1": 2}, routes={}))
    assert [r.type_url for r in discovery_pb2.DiscoveryResponse.FromString(removal).resources] == [CLUSTER]
    assert ack(removal) is False


def test_a_flood_of_new_proxy_identities_does_not_stall_a_push(tmp_path: Path) -> None:
    """While a push to connected classes runs, new classes keep arriving (each published on
    demand when its first stream watches). The push still finishes while the flood goes on,
    and every newcomer ends up with the new mesh's config."""
    built = Mesh(tmp_path, classes=300, slice_seconds=0.0)
    built.pusher.rebuild()
    order: list[str] = []
    real_set = built.cache.set

    def recording_set(key: ProxyClass, snap: Snapshot) -> None:
        real_set(key, snap)
        order.append("connected" if key in connected else "new")

    connected = set(built.classes)
    built.cache.set = recording_set  # type: ignore[method-assign,assignment]
    newcomers = [ProxyClass(ProxyKind.SIDECAR, f"flood-{i}", (("app", "x"),)) for i in range(1500)]
    built.edit("route", 3)

    async def scenario() -> None:
        async def flood() -> None:
            for key in newcomers:
                built._watching.enter_context(built.cache.watch(key))  # on-demand publication
                await asyncio.sleep(0)

        flooding = asyncio.create_task(flood())
        await asyncio.sleep(0)
        await built.pusher.rebuild_yielding()
        push_done_at = len(order)
        await flooding
        assert order[push_done_at:].count("new") > 0  # the flood was still going when the push ended

    asyncio.run(scenario())
    built._watching.close()
    assert order.count("connected") == 300
    first_new, last_connected = order.index("new"), len(order) - 1 - order[::-1].index("connected")
    assert first_new < last_connected  # interleaved, not one after the other
    route_version = built.pusher.mesh  # the mesh every newcomer was generated from is the new one
    fresh = Snapshot.from_parts(generate_parts(route_version, newcomers[-1]), built.pusher.serializer)
    snap = built.cache.get(newcomers[-1])
    assert snap is not None and snap.version(ROUTE) == fresh.version(ROUTE)


class _CountingSet(frozenset[str]):
    compared = 0

    def __le__(self, other: object) -> bool:
        type(self).compared += 1
        return super().__le__(other)  # type: ignore[operator]


def test_whether_clusters_are_warm_is_answered_once_per_pair_of_shared_sets() -> None:
    """Every stream of a namespace asks whether its clusters' EDS names are subscribed (thousands
    of names at mission scale); with the same two shared sets, the subset test runs once."""
    subscriptions = Subscriptions()
    needed = _CountingSet({"a", "b"})
    subscribed = subscriptions.intern(frozenset({"a", "b", "c"}))
    assert all(subscriptions.covers(subscribed, needed) for _ in range(100))
    assert _CountingSet.compared == 1
    partial = subscriptions.intern(frozenset({"a"}))
    assert not subscriptions.covers(partial, needed) and not subscriptions.covers(partial, needed)
    assert _CountingSet.compared == 2


class _EqualityCountingSet(frozenset[str]):
    """A frozenset that counts how often it is compared for equality (a value-keyed memo does)."""

    equalities = 0

    def __eq__(self, other: object) -> bool:
        type(self).equalities += 1
        return super().__eq__(other)

    __hash__ = frozenset.__hash__


def test_an_equal_set_that_is_another_object_is_never_compared_name_by_name() -> None:
    """A fleet reconnecting to classes generated again brings clusters' EDS names equal to the
    remembered ones but not the same objects; each stream asking must not compare ~3,000 names."""
    subscriptions = Subscriptions()
    subscribed = subscriptions.intern(frozenset({"a", "b", "c"}))
    first, again = _EqualityCountingSet({"a", "b"}), _EqualityCountingSet({"a", "b"})
    assert subscriptions.covers(subscribed, first)
    assert all(subscriptions.covers(subscribed, again) for _ in range(100))
    assert subscriptions.covers(subscribed, first)  # the first is still answered right
    wider = _EqualityCountingSet({"a", "b", "z"})
    assert not subscriptions.covers(subscribed, wider)
    assert _EqualityCountingSet.equalities == 0


def _delta_session(registry: StatusRegistry, node: str = "p") -> DeltaSession:
    return DeltaSession(registry.open(ProxyIdentity(node, "c", ProxyClass(ProxyKind.SIDECAR, "ns")), "delta", "t"),
                        registry)


def test_a_plain_delta_ack_is_settled_from_its_bytes_exactly_as_a_decoded_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Envoy ACKs a delta response with its type and nonce alone: 2,000 of them per change at
    mission scale. They are recognised in the received bytes and settled without decoding the
    request; the stream's state, its status and the counters end where decoding them would."""
    snap = snapshot({"c1": 1, "c2": 1})
    registry = _registry()
    fast, decoded_one = _delta_session(registry, "fast"), _delta_session(registry, "decoded")
    for session in (fast, decoded_one):
        session.handle_wire(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER).SerializeToString())
    (sent,) = fast.responses(snap)
    (also,) = decoded_one.responses(snap)
    acks = [discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce=r.nonce).SerializeToString()
            for r in map(discovery_pb2.DeltaDiscoveryResponse.FromString, (sent, also))]
    parsed = DeltaSession.parse(acks[1])
    decoded = _count_parses(monkeypatch, DeltaSession)
    assert fast.handle_wire(acks[0]) is False  # a plain ACK calls for nothing
    assert decoded == []
    assert decoded_one.handle(parsed) is False
    for session in (fast, decoded_one):
        state = session.types[CLUSTER]
        assert session.pending == {} and state.acked is state.held and state.acked_version == state.held_version
    rows = {row["proxy"]: row["types"]["CDS"] for row in registry.syncz()}
    assert rows["fast"]["acked_version"] == rows["decoded"]["acked_version"] != ""
    assert rows["fast"]["state"] == rows["decoded"]["state"] == "SYNCED"
    # The same ACK again carries a nonce no longer pending: counted as stale, as a decoded one is.
    assert fast.handle_wire(acks[0]) is False
    assert decoded == []
    stale = [sample.value for metric in registry.metrics.stale_requests.collect() for sample in metric.samples
             if sample.name.endswith("_total") and sample.labels == {"type": "CDS"}]
    assert stale == [1.0]


def test_a_delta_request_that_is_more_than_an_ack_is_decoded() -> None:
    """A NACK (error detail), an ACK that also subscribes, an empty nonce: not plain ACKs."""
    type_field = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER).SerializeToString()
    start = len(type_field)
    plain = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce="ab-1").SerializeToString()
    assert ack_nonce(plain, start) == "ab-1"
    with_node = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce="ab-1")
    with_node.node.id = "sidecar~1"
    raw = with_node.SerializeToString()
    tail = subscribe_tail(raw)
    assert tail is not None and tail[1] == CLUSTER and ack_nonce(raw, tail[0]) == "ab-1"
    nack = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce="ab-1")
    nack.error_detail.message = "rejected"
    more = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, response_nonce="ab-1", resource_names_subscribe=["x"])
    for other in (nack, more, discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER)):
        assert ack_nonce(other.SerializeToString(), start) is None
    assert ack_nonce(type_field + b"\x32\x02\xff\xfe", start) is None  # not UTF-8: the parser's to refuse
    assert ack_nonce(type_field + b"\x32\x05ab", start) is None  # cut short
