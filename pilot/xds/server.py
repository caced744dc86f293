"""The ADS gRPC server (grpc.aio): moves bytes between sessions and proxies, nothing else.

Concurrency: each stream is one handler coroutine on the event loop plus a reader task that
feeds a bounded request queue (a full queue stops reading, which pushes back on the proxy).
The handler sleeps on one event that the reader (a request) and the cache (a new snapshot of
its class) both set, lets the session decide what to send, and writes it. Snapshots are coalesced, never queued, so a
slow proxy gets the newest config rather than a backlog. Responses are pre-encoded bytes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from pilot.model.proxy import NodeError, ProxyIdentity, identity_from_node
from pilot.xds.cache import SnapshotCache
from pilot.xds.delta import DeltaSession
from pilot.xds.session import SessionBase, Subscriptions
from pilot.xds.snapshot import Snapshot
from pilot.xds.sotw import SotwSession
from pilot.xds.status import StatusRegistry

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
_END = object()


def _identity(bytes_: bytes) -> bytes:
    return bytes_


class AdsServer:
    """Serves StreamAggregatedResources and DeltaAggregatedResources from a SnapshotCache."""

    def __init__(
        self,
        cache: SnapshotCache,
        status: StatusRegistry,
        queue_size: int = 16,
        classify: Callable[[Any], ProxyIdentity] = identity_from_node,
    ) -> None:
        self.cache = cache
        self.status = status
        self.queue_size = queue_size
        self.classify = classify
        self.subscriptions = Subscriptions()  # shared by every stream's session
        self._server: grpc.aio.Server | None = None

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._sotw, discovery_pb2.DiscoveryRequest.FromString, _identity),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta, discovery_pb2.DeltaDiscoveryRequest.FromString, _identity),
        })

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = any free port); returns the bound port."""
        self._server = grpc.aio.server(options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.keepalive_permit_without_calls", 1),
            # A fleet reconnecting at once (pilot restart) opens thousands of streams together;
            # gRPC's default of 1,000 pending calls would refuse most of them.
            ("grpc.server.max_pending_requests", 100_000),
            ("grpc.server.max_pending_requests_hard_limit", 100_000),
        ])
        self._server.add_generic_rpc_handlers((self.handler(),))
        bound = int(self._server.add_insecure_port(f"{host}:{port}"))
        await self._server.start()
        return bound

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    # grpc.aio decides how to drive a handler by inspecting it, so both must be async generators.
    async def _sotw(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for chunk in self._stream(requests, context, SotwSession):
            yield chunk

    async def _delta(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for chunk in self._stream(requests, context, DeltaSession):
            yield chunk

    async def _stream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, kind: type[SessionBase[Any]]
    ) -> AsyncIterator[bytes]:
        first = await anext(aiter(requests), None)
        if first is None:
            return
        try:
            identity = self.classify(first.node)
        except NodeError as exc:
            self.status.metrics.stream_errors.labels("bad_node").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot identify proxy: {exc}")
            return
        stream_status = self.status.open(identity, kind.protocol, context.peer())
        session: Any = kind(stream_status, self.status, self.subscriptions)
        log.debug("%s stream %d opened by %s (%s)", kind.protocol, stream_status.stream_id,
                 identity.node_id, identity.proxy_class.describe())
        queue: asyncio.Queue[Any] = asyncio.Queue(self.queue_size)
        wake = asyncio.Event()
        reader = asyncio.create_task(_read(requests, queue, wake))
        try:
            with self.cache.watch(identity.proxy_class, wake.set):
                session.handle(first)
                async for chunk in self._serve(identity, session, queue, wake):
                    yield chunk
        finally:
            reader.cancel()
            self.status.close(stream_status)
            log.debug("stream %d of %s closed", stream_status.stream_id, identity.node_id)

    async def _serve(
        self, identity: ProxyIdentity, session: Any, queue: asyncio.Queue[Any], wake: asyncio.Event
    ) -> AsyncIterator[bytes]:
        """Answer whenever requests arrive or the class gets a new snapshot, until the client leaves."""
        key = identity.proxy_class
        snapshot: Snapshot | None = None
        dirty = True  # the first request is handled already
        while True:
            latest = self.cache.get(key)
            if latest is not snapshot:
                snapshot, dirty = latest, True
            while not queue.empty():  # take everything already waiting before answering
                request = queue.get_nowait()
                if request is _END:
                    return
                dirty = session.handle(request) or dirty
            if snapshot is not None and dirty:
                for response in session.responses(snapshot):
                    yield response
            dirty = False
            if queue.empty() and self.cache.get(key) is snapshot:
                # No await between the checks above and clear(): nothing can slip in unseen.
                wake.clear()
                await wake.wait()


async def _read(requests: AsyncIterator[Any], queue: asyncio.Queue[Any], wake: asyncio.Event) -> None:
    """Copy requests into the bounded queue; a vanished client ends the stream quietly."""
    try:
        async for request in requests:
            await queue.put(request)
            wake.set()
    except grpc.aio.AioRpcError:
        pass
    except Exception:
        log.exception("reading an ADS stream failed")
    await queue.put(_END)
    wake.set()
