"""A lean simulated Envoy for load: one ADS stream that subscribes, follows names and ACKs.

Like Envoy it asks for CDS and LDS (wildcard), then EDS for every EDS cluster's service name
and RDS for every route name its listeners use, and ACKs each response. It timestamps (with
the system-wide monotonic clock, comparable across processes) the moment its full initial
config is ACKed, and the ACK of the first response matching an armed `Expectation`.

A failed stream is reopened after Envoy's jittered exponential backoff, with state reset (a
new stream starts from scratch, as Envoy's does without initial versions); reconnects are
counted. Concurrency: one task per client on its worker's event loop; the read loop is the only
writer of the client's state; the worker reads it between awaits. What a client takes from a
response (resource names, the names they refer to) is memoised per distinct response in a
`NameCache` shared by all clients of a worker, so per-client work stays small at 1,000 services.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import wrappers_pb2

from benchmarks import meshgen
from pilot.translate.names import outbound_cluster
from pilot.xds.references import cluster_eds_name, listener_route_names
from pilot.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from pilot.xds.wire import str_field

SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
SOTW_METHOD = SERVICE + "StreamAggregatedResources"
DELTA_METHOD = SERVICE + "DeltaAggregatedResources"
Request = discovery_pb2.DiscoveryRequest
DeltaRequest = discovery_pb2.DeltaDiscoveryRequest
Response = discovery_pb2.DiscoveryResponse
DeltaResponse = discovery_pb2.DeltaDiscoveryResponse
# Envoy's ADS retry backoff: jittered exponential from 500 ms, capped at 30 s.
RETRY_BASE = 0.5
RETRY_MAX = 30.0
# The type that, once received, tells which names of the dependent type to request.
DEPENDENT = {CLUSTER: ENDPOINT, LISTENER: ROUTE}
# Responses of at most this many EDS/RDS resources are decoded per client, not looked up.
FEW = 16
# How far from the first needle of an expectation the others are looked for first (bytes).
NEAR = 2048


def _raw(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class Expectation:
    """What the response carrying a config change looks like; `kind` is 'route' or 'endpoint'.

    A route change is recognised by the serialized weighted clusters it must contain, one per
    subset of `host`; an endpoint change by the new address. Both are byte searches over the
    raw response (C speed): a 1,000-service RouteConfiguration is ~0.6 MB with 1,000 virtual
    hosts, too much to decode in Python for every client.
    """

    kind: str
    host: str = ""
    subsets: tuple[str, ...] = ()
    weights: tuple[int, ...] = ()
    address: str = ""
    port: int = meshgen.PORT

    @classmethod
    def route(cls, edit: meshgen.RouteEdit) -> Expectation:
        return cls("route", host=edit.host, subsets=edit.subsets, weights=edit.weights)

    @classmethod
    def endpoint(cls, address: str) -> Expectation:
        return cls("endpoint", address=address)

    @property
    def type_url(self) -> str:
        return ROUTE if self.kind == "route" else ENDPOINT

    @cached_property
    def needles(self) -> tuple[bytes, ...]:
        """Byte strings that all occur in a response carrying the change, and in no older one."""
        if self.kind == "endpoint":
            # SocketAddress.address is field 2: tag, length, text. Exact, no decoding needed.
            addr = self.address.encode()
            return (b"\x12" + bytes([len(addr)]) + addr,)
        return tuple(weighted_cluster(outbound_cluster(self.port, subset, self.host), weight)
                     for subset, weight in zip(self.subsets, self.weights, strict=True))

    def matches(self, raw: bytes) -> bool:
        """Whether every needle occurs in `raw`. The others are looked for near the first one
        first (a route's weighted clusters are adjacent), so a 0.6 MB response is scanned about
        once, not once per needle; only if they are not there is the whole response searched."""
        first, *rest = self.needles
        at = raw.find(first)
        if at < 0:
            return False
        near = raw[max(0, at - NEAR):at + NEAR]
        return all(needle in near or needle in raw for needle in rest)


def weighted_cluster(name: str, weight: int) -> bytes:
    """A `WeightedCluster.ClusterWeight` holding just name and weight, serialized.

    Found verbatim inside whatever pilot sends: protobuf serializes fields in number order and
    `name` (1) and `weight` (3) are the lowest, so they lead the embedded message even when a
    route adds header rules (fields 4 and up) to the cluster. Cluster names contain the host,
    so the bytes are unique to one service; the weights are unique to one edit.
    """
    weight_value = wrappers_pb2.UInt32Value(value=weight)
    message = route_components_pb2.WeightedCluster.ClusterWeight(name=name, weight=weight_value)
    return bytes(message.SerializeToString())


def first_string(value: bytes) -> str:
    """Field 1 of a serialized message when it is a string (the name of every xDS resource)."""
    if not value or value[0] != 0x0A:
        return ""
    length, shift, i = 0, 0, 1
    while True:
        byte = value[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            break
        shift += 7
    return value[i:i + length].decode()


def response_key(raw: bytes, version: str, nonce: str) -> tuple[int, ...]:
    """What two responses carrying the same resources have in common: the hashes of `raw`'s bytes
    around its version (field 1) and nonce (field 5), and how many bytes that is.

    Why not re-serialize the parsed response without them: at 1,000 services that costs ~3 ms per
    1 MB CDS response, a third of a simulated Envoy's CPU on connect (py-spy, session 25), on the
    2 cores pilot shares. Cutting the two encoded fields out is a byte search (the version leads a
    field-ordered encoding, the nonce follows the type URL near the end), and the parts are hashed
    through a memoryview, without copying a megabyte per response. Should a search hit the same
    bytes inside a resource first, the key only stops matching other responses (a cache miss,
    never a wrong hit: the rest of the bytes still differ wherever the responses do).
    """
    cuts = []
    for number, value in ((1, version), (5, nonce)):
        if value:
            encoded = str_field(number, value)
            at = raw.find(encoded) if number == 1 else raw.rfind(encoded)
            if at >= 0:
                cuts.append((at, at + len(encoded)))
    view, start, hashes, kept = memoryview(raw), 0, [], 0
    for begin, end in sorted(cuts):
        if begin < start:  # overlapping matches: keep the bytes, the key just will not match
            continue
        hashes.append(hash(view[start:begin]))
        kept += begin - start
        start = end
    hashes.append(hash(view[start:]))
    return (kept + len(raw) - start, *hashes)


@dataclass(frozen=True)
class Decoded:
    """What clients take from one response's resources; shared by every client that gets them."""

    names: frozenset[str]  # the resources' own names
    refs: dict[str, tuple[str, ...]]  # CDS/LDS: resource name -> names of the dependent type it uses
    wanted: tuple[frozenset[str], list[str]]  # CDS/LDS: the union of `refs`, as a shared subscription


class NameCache:
    """Responses and resources -> what a client needs from them; shared by a worker's clients.

    Clients of one class receive the same resources (only version and nonce differ), so a
    worker decodes each distinct response once, not once per client: at 1,000 services a CDS
    response holds 3,000 clusters (1 MB), too many to walk in Python for each of 1,000 clients.
    What is handed out is shared too (interned names, one set and sorted list per distinct
    subscription), instead of ~150 KB of strings, sets and lists per client.
    """

    def __init__(self) -> None:
        self._refs: dict[bytes, tuple[str, ...]] = {}
        self._responses: dict[tuple[object, ...], Decoded] = {}
        self._subscriptions: dict[frozenset[str], tuple[frozenset[str], list[str]]] = {}

    def response(self, resp: Any, delta: bool, raw: bytes) -> Decoded:
        """The decoded resources of a (Delta)DiscoveryResponse, parsed from `raw`.

        The key is `raw` without the version and nonce fields (`response_key`: 64-bit hashes with
        the length and type stand for the bytes, so a worker does not keep megabytes of keys).
        A response of a few EDS or RDS resources (every change) is read directly instead: the
        key alone would cost a hash of up to 0.6 MB (one route configuration of 1,000 virtual
        hosts), while taking a few names costs microseconds.
        """
        if resp.type_url not in DEPENDENT and len(resp.resources) <= FEW:
            return self._decode_response(resp, delta)
        key = (str(resp.type_url), *response_key(raw, resp.system_version_info if delta else resp.version_info,
                                                  resp.nonce))
        found = self._responses.get(key)
        if found is None:
            found = self._responses[key] = self._decode_response(resp, delta)
        return found

    def refs(self, type_url: str, value: bytes) -> tuple[str, ...]:
        """Names of the dependent type a CDS or LDS resource refers to."""
        found = self._refs.get(value)
        if found is None:
            found = self._refs[value] = tuple(sys.intern(n) for n in self._decode(type_url, value))
        return found

    def subscription(self, names: set[str]) -> tuple[frozenset[str], list[str]]:
        """One shared (set, sorted list) per distinct subscription; callers must not mutate them."""
        key = frozenset(names)
        found = self._subscriptions.get(key)
        if found is None:
            found = self._subscriptions[key] = (key, sorted(key))
        return found

    def _decode_response(self, resp: Any, delta: bool) -> Decoded:
        type_url: str = resp.type_url
        if type_url not in DEPENDENT and delta:  # names only: a resource's bytes are not copied out
            return Decoded(frozenset(sys.intern(r.name) for r in resp.resources), {}, self.subscription(set()))
        if delta:
            pairs = [(sys.intern(r.name), r.resource.value) for r in resp.resources]
        else:
            pairs = [(sys.intern(first_string(r.value)), r.value) for r in resp.resources]
        names = frozenset(name for name, _ in pairs)
        if type_url not in DEPENDENT:
            return Decoded(names, {}, self.subscription(set()))
        refs = {name: self.refs(type_url, value) for name, value in pairs}
        return Decoded(names, refs, self.subscription({n for used in refs.values() for n in used}))

    @staticmethod
    def _decode(type_url: str, value: bytes) -> tuple[str, ...]:
        if type_url == CLUSTER:
            name = cluster_eds_name(cluster_pb2.Cluster.FromString(value))
            return (name,) if name else ()
        if type_url == LISTENER:
            return tuple(listener_route_names(listener_pb2.Listener.FromString(value)))
        return ()


@dataclass
class _TypeState:
    version: str = ""
    nonce: str = ""
    acked: bool = False
    subscribed: frozenset[str] = frozenset()  # EDS/RDS names asked for (shared, from the NameCache)
    ordered: list[str] = field(default_factory=list)  # `subscribed` sorted, repeated by every SotW ACK (shared)
    received: set[str] = field(default_factory=set)  # EDS/RDS names held
    refs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # delta CDS/LDS: resource -> names used

    def subscribe(self, subscription: tuple[frozenset[str], list[str]]) -> None:
        """Replace the subscription; what is held outside it is forgotten."""
        self.subscribed, self.ordered = subscription
        self.received &= self.subscribed


@dataclass
class ClientResult:
    ready_at: float | None = None
    matched_at: float | None = None
    responses: int = 0
    reconnects: int = 0
    error: str = ""  # why the last stream failed


class SimClient:
    """One simulated Envoy. `await run(channel)` until cancelled or closed; reconnects on failure."""

    def __init__(self, node: Any, delta: bool, names: NameCache, record: bool = False) -> None:
        self.node = node
        self.delta = delta
        self.names = names
        self.types: dict[str, _TypeState] = {t: _TypeState() for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE)}
        self.result = ClientResult()
        self.expectation: Expectation | None = None
        self.record = record  # keep raw responses, for the baseline server to replay
        self.recorded_initial: list[tuple[str, bytes]] = []  # (type_url, raw) until the first arm
        self.recorded_changes: dict[str, bytes] = {}  # expectation kind -> raw matching response
        self._sent_node = False
        self._call: Any = None
        self._closing = False

    async def close(self) -> None:
        """Half-close the stream, as a proxy shutting down cleanly would; the server then ends it."""
        self._closing = True
        if self._call is not None:
            await self._call.done_writing()

    def arm(self, expectation: Expectation) -> None:
        self.expectation = expectation
        self.result.matched_at = None

    async def run(self, channel: grpc.aio.Channel) -> None:
        """Keep a stream open; after a failure reconnect with Envoy's jittered exponential backoff."""
        attempt = 0
        while True:
            got_responses = await self._stream(channel)
            if self._closing:
                return
            self.result.reconnects += 1
            attempt = 1 if got_responses else attempt + 1
            await asyncio.sleep(random.uniform(0, min(RETRY_MAX, RETRY_BASE * 2 ** (attempt - 1))))
            self._reset()

    def _reset(self) -> None:
        self.types = {t: _TypeState() for t in self.types}
        self._sent_node = False
        if self.expectation is None:
            self.recorded_initial.clear()

    async def _stream(self, channel: grpc.aio.Channel) -> bool:
        """One ADS stream until it ends; records why and returns whether it got any response."""
        if self.delta:
            method = channel.stream_stream(DELTA_METHOD, DeltaRequest.SerializeToString, _raw)
        else:
            method = channel.stream_stream(SOTW_METHOD, Request.SerializeToString, _raw)
        call = self._call = method()
        got = False
        try:
            for type_url in (CLUSTER, LISTENER):
                await call.write(self._request(type_url))
            while (raw := await call.read()) is not grpc.aio.EOF:
                got = True
                await self._on_response(call, raw)
            self.result.error = "stream ended by server"
        except grpc.aio.AioRpcError as exc:
            self.result.error = f"{exc.code().name}: {exc.details()}"
        except asyncio.InvalidStateError as exc:
            self.result.error = f"stream already finished: {exc}"
        except asyncio.CancelledError:
            call.cancel()
            raise
        return got

    async def _on_response(self, call: Any, raw: bytes) -> None:
        self.result.responses += 1
        type_url, requests = self._delta_response(raw) if self.delta else self._sotw_response(raw)
        for req in requests:
            await call.write(req)
        now = time.monotonic()
        if self.record and self.expectation is None:
            self.recorded_initial.append((type_url, raw))
        if self.result.ready_at is None and self._complete():
            self.result.ready_at = now
        exp = self.expectation
        if exp is not None and self.result.matched_at is None and type_url == exp.type_url \
                and exp.matches(raw):
            self.result.matched_at = now
            if self.record:
                self.recorded_changes[exp.kind] = raw

    def _complete(self) -> bool:
        t = self.types
        return (t[CLUSTER].acked and t[LISTENER].acked
                and t[ENDPOINT].subscribed <= t[ENDPOINT].received
                and t[ROUTE].subscribed <= t[ROUTE].received)

    # --- state of the world -------------------------------------------------------------
    def _sotw_response(self, raw: bytes) -> tuple[str, list[Any]]:
        resp = Response.FromString(raw)
        type_url: str = resp.type_url
        state = self.types[type_url]
        state.version, state.nonce, state.acked = resp.version_info, resp.nonce, True
        decoded = self.names.response(resp, False, raw)
        requests: list[Any] = [self._request(type_url, state.version, state.nonce, state.ordered)]
        dependent = DEPENDENT.get(type_url)
        if dependent is None:
            state.received.update(decoded.names)
            return type_url, requests
        dep = self.types[dependent]
        if decoded.wanted[0] != dep.subscribed:
            dep.subscribe(decoded.wanted)
            requests.append(self._request(dependent, dep.version, dep.nonce, dep.ordered))
        return type_url, requests

    def _request(self, type_url: str, version: str = "", nonce: str = "", names: Iterable[str] = ()) -> Any:
        if self.delta:
            req = DeltaRequest(type_url=type_url, response_nonce=nonce, resource_names_subscribe=list(names))
        else:
            req = Request(type_url=type_url, version_info=version, response_nonce=nonce,
                          resource_names=list(names))
        if not self._sent_node:
            req.node.CopyFrom(self.node)
            self._sent_node = True
        return req

    # --- delta --------------------------------------------------------------------------
    def _delta_response(self, raw: bytes) -> tuple[str, list[Any]]:
        resp = DeltaResponse.FromString(raw)
        type_url: str = resp.type_url
        state = self.types[type_url]
        state.nonce, state.acked = resp.nonce, True
        requests: list[Any] = [DeltaRequest(type_url=type_url, response_nonce=state.nonce)]
        decoded = self.names.response(resp, True, raw)
        dependent = DEPENDENT.get(type_url)
        if dependent is None:
            state.received.update(decoded.names)
            state.received.difference_update(resp.removed_resources)
            return type_url, requests
        dep = self.types[dependent]
        if not state.refs and not resp.removed_resources:
            # The first response (every connect): what it refers to is the shared union, sorted once.
            state.refs = dict(decoded.refs)
            wanted = decoded.wanted
        else:
            state.refs.update(decoded.refs)
            for name in resp.removed_resources:
                state.refs.pop(name, None)
            wanted = self.names.subscription({n for names in state.refs.values() for n in names})
        want = wanted[0]
        if want != dep.subscribed:
            subscribe = wanted[1] if not dep.subscribed else sorted(want - dep.subscribed)
            requests.append(DeltaRequest(type_url=dependent, resource_names_subscribe=subscribe,
                                         resource_names_unsubscribe=sorted(dep.subscribed - want)))
            dep.subscribe(wanted)
        return type_url, requests
