"""An ADS client that speaks like Envoy, for conformance tests and the load benchmark.

It opens one SotW or delta stream over real gRPC, sends requests exactly as given (the test
decides nonces, versions and NACKs), and hands responses back decoded. `auto_ack` mode
ACKs every response and follows EDS/RDS names the way Envoy does, for load generation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from pilot.model.proxy import META_BIND_ADDRESS, META_LABELS, META_NAMESPACE, META_WORKLOAD
from pilot.xds.server import SERVICE
from pilot.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE

DiscoveryRequest = discovery_pb2.DiscoveryRequest
DeltaDiscoveryRequest = discovery_pb2.DeltaDiscoveryRequest

# The SotW ADS method, for raw calls that write request bytes and may stop reading.
SOTW_METHOD = f"/{SERVICE}/StreamAggregatedResources"
# Channel options of a client that opens no flow-control window beyond 16 KB while its application
# does not read: a proxy that stops reading, for tests of what pilot does about it.
SMALL_WINDOW = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384),
                ("grpc.max_receive_message_length", 64 << 20)]


def make_node(
    node_id: str,
    namespace: str = "default",
    labels: Mapping[str, str] | None = None,
    workload: str = "",
    bind_address: str = "",
) -> Any:
    """An envoy Node with the metadata pilot reads."""
    meta = struct_pb2.Struct()
    fields: dict[str, Any] = {META_NAMESPACE: namespace, META_LABELS: dict(labels or {})}
    if workload:
        fields[META_WORKLOAD] = workload
    if bind_address:
        fields[META_BIND_ADDRESS] = bind_address
    meta.update(fields)
    return base_pb2.Node(id=node_id, cluster=f"{workload or 'client'}.{namespace}", metadata=meta)


class AdsClient:
    """One ADS stream. Use `async with AdsClient(target, node, delta=...) as c:`."""

    def __init__(self, target: str, node: Any, delta: bool = False) -> None:
        self.target = target
        self.node = node
        self.delta = delta
        self._channel: grpc.aio.Channel | None = None
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._sent_node = False
        # type_url -> names the test subscribed to; ACKs repeat them, as Envoy does.
        self.subscriptions: dict[str, list[str]] = {}

    async def __aenter__(self) -> AdsClient:
        self._channel = grpc.aio.insecure_channel(self.target)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        rpc = stub.DeltaAggregatedResources if self.delta else stub.StreamAggregatedResources
        self._call = rpc(self._requests())
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        # A grpc.aio read() cancelled by a timeout cancels the whole call, so one task reads
        # continuously and tests wait on the inbox instead.
        try:
            while True:
                msg = await self._call.read()
                if msg is grpc.aio.EOF:
                    break
                self._inbox.put_nowait(msg)
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            self._inbox.put_nowait(exc)
            return
        self._inbox.put_nowait(EOFError("stream ended"))

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _requests(self) -> AsyncIterator[Any]:
        while True:
            item = await self._outbox.get()
            if item is None:
                return
            yield item

    def _with_node(self, request: Any) -> Any:
        if not self._sent_node:
            request.node.CopyFrom(self.node)
            self._sent_node = True
        return request

    def send(
        self,
        type_url: str,
        names: Iterable[str] = (),
        nonce: str = "",
        version: str = "",
        error: str | None = None,
    ) -> None:
        """Queue a SotW DiscoveryRequest (an ACK when nonce is given, a NACK when error is)."""
        self.subscriptions[type_url] = list(names)
        req = DiscoveryRequest(type_url=type_url, resource_names=list(names), response_nonce=nonce,
                               version_info=version)
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._outbox.put_nowait(self._with_node(req))

    def send_delta(
        self,
        type_url: str,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        nonce: str = "",
        error: str | None = None,
        initial_versions: Mapping[str, str] | None = None,
    ) -> None:
        """Queue a DeltaDiscoveryRequest."""
        req = DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            response_nonce=nonce,
            initial_resource_versions=dict(initial_versions or {}),
        )
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._outbox.put_nowait(self._with_node(req))

    def ack(self, response: Any) -> None:
        """ACK a response, keeping the current subscription unchanged."""
        if self.delta:
            self.send_delta(response.type_url, nonce=response.nonce)
        else:
            self.send(response.type_url, self.subscriptions.get(response.type_url, ()),
                      nonce=response.nonce, version=response.version_info)

    async def recv(self, timeout: float = 5.0) -> Any:
        """The next response; raises TimeoutError if none comes in time, or the stream's error."""
        async with asyncio.timeout(timeout):
            got = await self._inbox.get()
        if isinstance(got, BaseException):
            raise got
        return got

    async def expect_silence(self, seconds: float = 0.3) -> None:
        """Assert the server sends nothing for a while."""
        try:
            async with asyncio.timeout(seconds):
                got = await self._inbox.get()
        except TimeoutError:
            return
        if isinstance(got, BaseException):
            raise got
        raise AssertionError(f"expected no response, got {got.type_url} nonce={got.nonce}")


def resource_names(response: Any) -> list[str]:
    """Names of the resources in a SotW or delta response, in order."""
    names = []
    for res in response.resources:
        if hasattr(res, "name") and res.name:
            names.append(res.name)
        else:
            names.append(_any_name(res))
    return names


_KINDS = {
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
}


def decode(any_msg: Any) -> Any:
    """Unpack a resource `Any` into its message type."""
    msg = _KINDS[any_msg.type_url]()
    any_msg.Unpack(msg)
    return msg


def _any_name(any_msg: Any) -> str:
    msg = decode(any_msg)
    any_msg.Unpack(msg)
    return str(getattr(msg, "cluster_name", "") or msg.name)
