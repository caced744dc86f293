"""The agent's SDS server: `envoy.service.secret.v3.SecretDiscoveryService` on a Unix socket.

Rules kept (xDS): every response carries a fresh nonce; a request whose `response_nonce` is not
the latest sent on its stream is stale and changes nothing but its subscription; a request with
`error_detail` is a NACK: logged with the stream's peer, counted per secret
(`citadel_agent_sds_nacks`), and the same versions are not sent again (only a new certificate is);
a secret is sent when it is newly subscribed or its version (content hash) changed. SDS is not a
wildcard type: an empty name list subscribes to nothing. StreamSecrets (state of the world)
answers with every subscribed secret the agent has; DeltaSecrets with the changed ones only;
FetchSecrets (unary) with the subscribed ones now. A name the agent does not serve is never
answered (Envoy keeps waiting for it, as with Istio's agent), and logged once per stream.

Concurrency: one handler coroutine per stream (the writer) and a reader task that applies each
request to the stream's state machine; the writer sleeps on an event that the reader and the
`SecretStore` (a renewal) both set. Cost: a renewal costs each stream one small response (~2 KB);
a plain ACK costs nothing but the state update. The socket is created 0600 in a directory the
agent creates 0700, so only the workload's user can read its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from citadel.agent.metrics import AgentMetrics
from citadel.agent.secrets import SECRET_TYPE_URL, SecretStore, ServedSecret
from citadel.errors import CitadelError

log = logging.getLogger(__name__)

SERVICE = "envoy.service.secret.v3.SecretDiscoveryService"
MAX_ERROR_DETAIL = 300


class SDSError(CitadelError):
    """The SDS socket cannot be served (path taken by a live agent, not a socket, ...)."""


class SDSProtocolError(CitadelError):
    """A client broke the protocol (wrong type URL); its stream is ended with INVALID_ARGUMENT."""


def _check_type(type_url: str) -> None:
    if type_url and type_url != SECRET_TYPE_URL:
        raise SDSProtocolError(f"field type_url: {type_url!r} is not {SECRET_TYPE_URL}")


def _set_version(secrets: list[ServedSecret]) -> str:
    return hashlib.sha256("".join(f"{s.name}={s.version};" for s in secrets).encode()).hexdigest()[:16]


class _StreamBase:
    """What SotW and delta streams share: the peer, nonces, NACK accounting, unknown names."""

    def __init__(self, store: SecretStore, metrics: AgentMetrics, peer: str) -> None:
        self.store = store
        self.metrics = metrics
        self.peer = peer
        self.nonce = ""
        self.last_sent: tuple[str, ...] = ()
        self.nacks = 0
        self._nonces = itertools.count(1)
        self._unknown_logged: set[str] = set()

    def _next_nonce(self) -> str:
        self.nonce = f"{next(self._nonces)}-{os.urandom(4).hex()}"
        return self.nonce

    def _nack(self, version: str, message: str) -> None:
        self.nacks += 1
        for name in self.last_sent:
            self.metrics.nacks.labels(name).inc()
        log.warning("citadel agent: Envoy (%s) rejected SDS secrets %s version %s: %s", self.peer,
                    list(self.last_sent), version or "<none>", message[:MAX_ERROR_DETAIL])

    def _available(self, names: frozenset[str] | set[str]) -> list[ServedSecret]:
        current = self.store.current
        for name in sorted(names - current.keys()):
            if current and name not in self._unknown_logged:
                self._unknown_logged.add(name)
                log.warning("citadel agent: Envoy (%s) asked for secret %r; only %s are served", self.peer, name,
                            sorted(current))
        return [current[n] for n in sorted(names) if n in current]

    def _sent(self, secrets: list[ServedSecret]) -> None:
        self.last_sent = tuple(s.name for s in secrets)
        for secret in secrets:
            self.metrics.pushes.labels(secret.name).inc()


class SotwStream(_StreamBase):
    """One StreamSecrets stream: its subscription and what it was sent (a pure state machine)."""

    def __init__(self, store: SecretStore, metrics: AgentMetrics, peer: str) -> None:
        super().__init__(store, metrics, peer)
        self.names: frozenset[str] = frozenset()
        self.sent: dict[str, str] = {}  # name -> version last sent
        self.acked_version = ""
        self.force = False

    def handle(self, request: discovery_pb2.DiscoveryRequest) -> None:
        """Apply one request (ACK, NACK, subscription change or stale)."""
        _check_type(request.type_url)
        if request.response_nonce and request.response_nonce != self.nonce:
            return  # stale: a response crossed this request; the newer one will be (N)ACKed
        if request.response_nonce:
            if request.HasField("error_detail"):
                self._nack(request.version_info, request.error_detail.message)
            else:
                self.acked_version = request.version_info
        names = frozenset(request.resource_names)
        if not request.response_nonce or names - self.names:
            self.force = True  # a new stream, or new names: answer with every subscribed secret
        self.names = names
        self.sent = {n: v for n, v in self.sent.items() if n in names}

    def response(self) -> discovery_pb2.DiscoveryResponse | None:
        """The response due now (every subscribed secret available), or None."""
        secrets = self._available(self.names)
        if not secrets:
            return None
        if not self.force and all(self.sent.get(s.name) == s.version for s in secrets):
            return None
        self.force = False
        self.sent = {s.name: s.version for s in secrets}
        self._sent(secrets)
        return discovery_pb2.DiscoveryResponse(
            version_info=_set_version(secrets), type_url=SECRET_TYPE_URL, nonce=self._next_nonce(),
            resources=[s.resource for s in secrets])


class DeltaStream(_StreamBase):
    """One DeltaSecrets stream: subscribed names and the version the client holds of each."""

    def __init__(self, store: SecretStore, metrics: AgentMetrics, peer: str) -> None:
        super().__init__(store, metrics, peer)
        self.names: set[str] = set()
        self.holds: dict[str, str] = {}
        self.started = False

    def handle(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        """Apply one request: subscription changes always, ACK/NACK only for the latest nonce."""
        _check_type(request.type_url)
        if not self.started:
            self.started = True
            self.holds.update(request.initial_resource_versions)
        if request.response_nonce == self.nonce and request.response_nonce and request.HasField("error_detail"):
            self._nack("", request.error_detail.message)
        self.names |= set(request.resource_names_subscribe)
        for name in request.resource_names_unsubscribe:
            self.names.discard(name)
            self.holds.pop(name, None)

    def response(self) -> discovery_pb2.DeltaDiscoveryResponse | None:
        """The changed or newly subscribed secrets, or None."""
        secrets = [s for s in self._available(self.names) if self.holds.get(s.name) != s.version]
        if not secrets:
            return None
        self.holds.update({s.name: s.version for s in secrets})
        self._sent(secrets)
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=str(self.store.generation), type_url=SECRET_TYPE_URL, nonce=self._next_nonce(),
            resources=[discovery_pb2.Resource(name=s.name, version=s.version, resource=s.resource)
                       for s in secrets])


def prepare_socket_path(path: Path) -> None:
    """Create the socket's directory (0700) and remove a stale socket; SDSError if a live agent holds it."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SDSError(f"sds_socket {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink(missing_ok=True)  # nobody listens: left behind by a dead agent
        return
    finally:
        probe.close()
    raise SDSError(f"sds_socket {path}: another process is serving on it")


class SDSServer:
    """grpc.aio server for SDS on a Unix socket, answering from a `SecretStore`."""

    def __init__(self, store: SecretStore, metrics: AgentMetrics) -> None:
        self.store = store
        self.metrics = metrics
        self.streams: list[SotwStream | DeltaStream] = []  # open streams, for tests and debugging
        self._server: grpc.aio.Server | None = None
        self.path: Path | None = None

    def handler(self) -> grpc.GenericRpcHandler:
        """StreamSecrets, DeltaSecrets and FetchSecrets with Envoy's discovery messages."""
        req, resp = discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse
        dreq, dresp = discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse
        return grpc.method_handlers_generic_handler(SERVICE, {
            "StreamSecrets": grpc.stream_stream_rpc_method_handler(
                self._sotw, req.FromString, resp.SerializeToString),
            "DeltaSecrets": grpc.stream_stream_rpc_method_handler(
                self._delta, dreq.FromString, dresp.SerializeToString),
            "FetchSecrets": grpc.unary_unary_rpc_method_handler(
                self._fetch, req.FromString, resp.SerializeToString),
        })

    async def start(self, path: Path) -> None:
        """Listen on the Unix socket `path` (made 0600)."""
        prepare_socket_path(path)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((self.handler(),))
        if not server.add_insecure_port(f"unix:{path}"):
            raise SDSError(f"sds_socket {path}: cannot bind")
        os.chmod(path, 0o600)
        await server.start()
        self._server, self.path = server, path
        log.info("citadel agent: serving SDS (default, ROOTCA and any credentialName secrets) on unix:%s", path)

    async def stop(self, grace: float = 0.5) -> None:
        """Stop serving and remove the socket."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    async def _sotw(self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
                    context: grpc.aio.ServicerContext) -> None:
        await self._stream(SotwStream(self.store, self.metrics, context.peer()), requests, context)

    async def _delta(self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
                     context: grpc.aio.ServicerContext) -> None:
        await self._stream(DeltaStream(self.store, self.metrics, context.peer()), requests, context)

    async def _fetch(self, request: discovery_pb2.DiscoveryRequest,
                     context: grpc.aio.ServicerContext) -> discovery_pb2.DiscoveryResponse:
        state = SotwStream(self.store, self.metrics, context.peer())
        try:
            state.handle(request)
        except SDSProtocolError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        response = state.response()
        if response is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "no certificate yet for the requested secrets")
        return response

    async def _stream(self, state: SotwStream | DeltaStream, requests: AsyncIterator[object],
                      context: grpc.aio.ServicerContext) -> None:
        wake = asyncio.Event()
        failure: list[SDSProtocolError] = []
        reader = asyncio.create_task(_read(requests, state, wake, failure))
        self.streams.append(state)
        self.metrics.streams.inc()
        try:
            await self._write_loop(state, context, reader, wake)
        finally:
            reader.cancel()
            self.streams.remove(state)
            self.metrics.streams.dec()
        if failure:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(failure[0]))

    async def _write_loop(self, state: SotwStream | DeltaStream, context: grpc.aio.ServicerContext,
                          reader: asyncio.Task[None], wake: asyncio.Event) -> None:
        generation = self.store.generation
        while not reader.done():
            wake.clear()
            response = state.response()
            if response is not None:
                await context.write(response)
                continue
            changed = asyncio.create_task(self.store.changed(generation))
            woken = asyncio.create_task(wake.wait())
            try:
                await asyncio.wait({changed, woken, reader}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
                woken.cancel()
            generation = max(generation, self.store.generation)


async def _read(requests: AsyncIterator[object], state: SotwStream | DeltaStream, wake: asyncio.Event,
                failure: list[SDSProtocolError]) -> None:
    """Apply each request to `state` as it arrives and wake the writer; ends when the client does."""
    handle: Callable[[Any], None] = state.handle
    with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.BaseError):
        try:
            async for request in requests:
                handle(request)
                wake.set()
        except SDSProtocolError as exc:
            failure.append(exc)

