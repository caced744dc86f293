"""A lean simulated Envoy for load: one ADS stream that subscribes, follows names and ACKs.

Like Envoy it asks for CDS and LDS (wildcard), then EDS for every EDS cluster's service name
and RDS for every route name its listeners use, and ACKs each response. It timestamps (with
the system-wide monotonic clock, comparable across processes) the moment its full initial
config is ACKed, and the ACK of the first response matching an armed `Expectation`.

A failed stream is reopened after Envoy's jittered exponential backoff, with state reset (a
new stream starts from scratch, as Envoy's does without initial versions); reconnects are
counted. Concurrency: one task per client on its worker's event loop; the read loop is the only
writer of the client's state; the worker reads it between awaits. Decoded cross-type names
are memoised per resource bytes in a `NameCache` shared by all clients of a worker.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2

from pilot.xds.references import cluster_eds_name, listener_route_names
from pilot.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE

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


def _raw(data: bytes) -> bytes:
    return data


@dataclass(frozen=True)
class Expectation:
    """What the response carrying a config change looks like; `kind` is 'route' or 'endpoint'."""

    kind: str
    weights: tuple[int, int] = (0, 0)
    address: str = ""

    @property
    def type_url(self) -> str:
        return ROUTE if self.kind == "route" else ENDPOINT

    def matches(self, raw: bytes, values: list[bytes]) -> bool:
        if self.kind == "endpoint":
            # SocketAddress.address is field 2: tag, length, text. Exact, no decoding needed.
            addr = self.address.encode()
            return b"\x12" + bytes([len(addr)]) + addr in raw
        return any(_has_weights(v, self.weights) for v in values)


def _has_weights(value: bytes, weights: tuple[int, int]) -> bool:
    rc = route_pb2.RouteConfiguration.FromString(value)
    for vh in rc.virtual_hosts:
        for r in vh.routes:
            got = [c.weight.value for c in r.route.weighted_clusters.clusters]
            if sorted(got) == sorted(weights):
                return True
    return False


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


class NameCache:
    """Resource bytes -> names it refers to in the dependent type; shared by a worker's clients."""

    def __init__(self) -> None:
        self._refs: dict[bytes, tuple[str, ...]] = {}

    def refs(self, type_url: str, value: bytes) -> tuple[str, ...]:
        found = self._refs.get(value)
        if found is None:
            found = self._refs[value] = self._decode(type_url, value)
        return found

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
    subscribed: set[str] = field(default_factory=set)  # EDS/RDS names asked for
    received: set[str] = field(default_factory=set)  # EDS/RDS names held
    refs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # CDS/LDS: resource -> names used


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
        type_url, values, requests = self._delta_response(raw) if self.delta else self._sotw_response(raw)
        for req in requests:
            await call.write(req)
        now = time.monotonic()
        if self.record and self.expectation is None:
            self.recorded_initial.append((type_url, raw))
        if self.result.ready_at is None and self._complete():
            self.result.ready_at = now
        exp = self.expectation
        if exp is not None and self.result.matched_at is None and type_url == exp.type_url \
                and exp.matches(raw, values):
            self.result.matched_at = now
            if self.record:
                self.recorded_changes[exp.kind] = raw

    def _complete(self) -> bool:
        t = self.types
        return (t[CLUSTER].acked and t[LISTENER].acked
                and t[ENDPOINT].subscribed <= t[ENDPOINT].received
                and t[ROUTE].subscribed <= t[ROUTE].received)

    # --- state of the world -------------------------------------------------------------
    def _sotw_response(self, raw: bytes) -> tuple[str, list[bytes], list[Any]]:
        resp = Response.FromString(raw)
        type_url: str = resp.type_url
        state = self.types[type_url]
        values = [r.value for r in resp.resources]
        state.version, state.nonce, state.acked = resp.version_info, resp.nonce, True
        requests: list[Any] = [self._request(type_url, state.version, state.nonce, sorted(state.subscribed))]
        dependent = DEPENDENT.get(type_url)
        if dependent is not None:
            state.refs = {str(i): self.names.refs(type_url, v) for i, v in enumerate(values)}
            want = {n for names in state.refs.values() for n in names}
            dep = self.types[dependent]
            if want != dep.subscribed:
                dep.subscribed = want
                dep.received &= want
                requests.append(self._request(dependent, dep.version, dep.nonce, sorted(want)))
        else:
            state.received.update(first_string(v) for v in values)
        return type_url, values, requests

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
    def _delta_response(self, raw: bytes) -> tuple[str, list[bytes], list[Any]]:
        resp = DeltaResponse.FromString(raw)
        type_url: str = resp.type_url
        state = self.types[type_url]
        state.nonce, state.acked = resp.nonce, True
        values = [r.resource.value for r in resp.resources]
        requests: list[Any] = [DeltaRequest(type_url=type_url, response_nonce=resp.nonce)]
        dependent = DEPENDENT.get(type_url)
        if dependent is None:
            state.received.update(r.name for r in resp.resources)
            state.received.difference_update(resp.removed_resources)
            return type_url, values, requests
        for r, value in zip(resp.resources, values, strict=True):
            state.refs[r.name] = self.names.refs(type_url, value)
        for name in resp.removed_resources:
            state.refs.pop(name, None)
        want = {n for names in state.refs.values() for n in names}
        dep = self.types[dependent]
        if want != dep.subscribed:
            requests.append(DeltaRequest(type_url=dependent, resource_names_subscribe=sorted(want - dep.subscribed),
                                         resource_names_unsubscribe=sorted(dep.subscribed - want)))
            dep.subscribed = want
            dep.received &= want
        return type_url, values, requests
