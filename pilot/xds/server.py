"""The ADS gRPC server (grpc.aio): moves bytes between sessions and proxies, nothing else.

Concurrency: each stream is one handler coroutine on the event loop (the writer) plus a
reader task that applies each request to the session as it arrives; reading waits while a
request is applied, which is the backpressure. The writer sleeps on one event that the reader
(a request that calls for an answer; plain ACKs do not) and the cache (a new snapshot of its
class) both set, lets the session decide what to send, and writes it with `context.write`.
Snapshots are coalesced, never queued, so a slow proxy gets the newest config rather than a
backlog. Requests reach the session as the bytes gRPC read (it decodes what it needs) and
responses leave as pre-encoded bytes, often one object shared by every stream making the same
step; no frame keeps a response or a request once it is handed over.

Cost per stream: two small tasks and the session's state (references to shared views); at
mission scale about 60-80 KB of pilot's RSS, mostly gRPC's own per-call buffers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from pilot.model.proxy import NodeError, ProxyIdentity, identity_from_node
from pilot.xds.cache import SnapshotCache
from pilot.xds.delta import DeltaSession
from pilot.xds.session import SessionBase, Subscriptions
from pilot.xds.snapshot import Snapshot
from pilot.xds.sotw import SotwSession
from pilot.xds.status import StatusRegistry

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


def _identity(bytes_: bytes) -> bytes:
    return bytes_


class AdsServer:
    """Serves StreamAggregatedResources and DeltaAggregatedResources from a SnapshotCache."""

    def __init__(
        self,
        cache: SnapshotCache,
        status: StatusRegistry,
        classify: Callable[[Any], ProxyIdentity] = identity_from_node,
    ) -> None:
        self.cache = cache
        self.status = status
        self.classify = classify
        self.subscriptions = Subscriptions()  # shared by every stream's session
        self._server: grpc.aio.Server | None = None

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._sotw, _identity, _identity),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self._delta, _identity, _identity),
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

    # Coroutine handlers that write with `context.write`: an async-generator handler would leave
    # each stream's last response (megabytes at mission scale) referenced by gRPC's own loop until
    # the next one, so every idle stream would hold a copy. Here nothing keeps a written response.
    async def _sotw(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        await self._stream(requests, context, SotwSession)

    async def _delta(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        await self._stream(requests, context, DeltaSession)

    async def _stream(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, kind: type[SessionBase[Any]]
    ) -> None:
        # Requests arrive as bytes: sessions decode what they need (`handle_wire`).
        first_wire: bytes | None = await anext(aiter(requests), None)
        if first_wire is None:
            return
        try:
            first = kind.parse(first_wire)
        except DecodeError as exc:
            self.status.metrics.stream_errors.labels("bad_request").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"cannot decode the first request: {exc}")
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
        stream = _Stream()
        reader = asyncio.create_task(_read(requests, session, stream))
        try:
            with self.cache.watch(identity.proxy_class, stream.wake.set):
                session.handle(first, first_wire)
                del first, first_wire
                await self._serve(identity, session, stream, context)
        finally:
            reader.cancel()
            self.status.close(stream_status)
            log.debug("stream %d of %s closed", stream_status.stream_id, identity.node_id)

    async def _serve(
        self, identity: ProxyIdentity, session: Any, stream: _Stream, context: grpc.aio.ServicerContext,
    ) -> None:
        """Answer whenever a request calls for it or the class gets a new snapshot, until the client leaves."""
        key = identity.proxy_class
        snapshot: Snapshot | None = None
        stream.dirty = True  # the first request is handled already
        while True:
            if stream.error is not None:
                raise stream.error
            if stream.closed:
                return
            latest = self.cache.get(key)
            if latest is not snapshot:
                snapshot, stream.dirty = latest, True
            if snapshot is not None and stream.dirty:
                stream.dirty = False
                responses = session.responses(snapshot)
                while responses:
                    await context.write(responses.pop(0))  # once written, nothing here keeps it
                continue  # requests may have been handled while the responses were written
            # No await between the checks above and clear(): nothing can slip in unseen.
            stream.wake.clear()
            await stream.wake.wait()


class _Stream:
    """What the reader tells the writer of one stream; both run on the event loop."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()  # set by the reader (a request calls for an answer) and the cache
        self.dirty = False  # a handled request may call for a response
        self.closed = False  # the proxy ended the stream
        self.error: BaseException | None = None


async def _read(requests: AsyncIterator[Any], session: Any, stream: _Stream) -> None:
    """Apply each request to the session as it arrives; wake the writer only when it must answer.

    Sessions are synchronous state machines, so the reader can apply requests itself: a plain
    ACK costs no task switch, and not reading while one is applied is the backpressure (gRPC
    flow control then holds the proxy). A vanished client ends the stream quietly.
    """
    try:
        async for wire in requests:
            if session.handle_wire(wire):
                stream.dirty = True
                stream.wake.set()
            del wire  # a request can be 100 KB of names: not kept while waiting for the next
    except (grpc.aio.AioRpcError, grpc.aio.BaseError):  # the client left, or pilot is stopping
        pass
    except Exception as exc:
        log.exception("handling an ADS request failed")
        stream.error = exc
    stream.closed = True
    stream.wake.set()
