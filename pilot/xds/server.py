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
mission scale about 65 KB of pilot's RSS with its TCP connection, mostly gRPC's own per-call and
per-connection state (its read buffers capped as `pilot.xds.grpcoptions` explains).

Slow and hostile clients: the writer awaits each `context.write`, so gRPC holds at most one
response per stream that the proxy has not taken yet (gRPC copies it per call: up to the
largest response, ~0.9 MB at mission scale); connecting proxies' large first responses share a
`WriteBudget` (`pilot.xds.writebudget`: pushes to connected proxies never wait for it). A write
that does not finish within the send timeout closes the stream on pilot's side at once (status
row, session, cache watch, reader) and sends DEADLINE_EXCEEDED behind the stuck response.
grpc.aio cannot reset one call, so gRPC frees its copy when the connection ends: when the proxy
reads again (it then gets the status and reconnects), when keepalive finds a dead peer (ping
every 30 s, 10 s to answer), or at the latest when the connection reaches its maximum age (30
min by default, as istiod; then 10 s of grace). Every response written and every stream's end
(its handler returning; gRPC ends the call right after) is reported to `quiet` (a
`pilot.quiet.WhenQuiet` shared with the pusher), so pilot's release (garbage collected, free heap
pages back to the OS) waits until streams have stopped taking responses: releasing while a
fan-out still writes would leave its buffers, freed afterwards, in the heap. Not through gRPC's
`add_done_callback`: grpc.aio keeps each callback in a list on the call's state, bound to the
context that holds that state, so every call that had one ended as a reference cycle (the call's
state, its context and their lists, ~11 objects with gRPC's own), freed only by a full garbage
collection, which pilot runs rarely (`pilot.gcpolicy`): with a fleet of 2,000 reconnecting,
pilot's allocated heap grew 2.9-3.2 MB per reconnect with them and 0.3-1.1 MB without. The one
case where the handler's end comes long before the call's, a stream closed behind a stuck
response, leaves that response's pages to the allocator's own decay (or the next release).

Two faces, one state: `start` serves plaintext ADS (15010, unauthenticated: any local process
may claim any Node); `start_secure` adds the authenticated port (15012): a `TlsFront` terminates
mutual TLS (client certificate verified if given) and relays to an internal gRPC server carrying
ADS in authenticated mode plus the extra handlers the composition root passes (the CSR service).
There a stream is refused unless its client certificate's identity holds what its Node claims
(`pilot.xds.peers`): UNAUTHENTICATED without a certificate, PERMISSION_DENIED for another
identity's Node; each refusal is logged and counted in `pilot_xds_stream_errors{reason}`.
Both faces share the cache, the status registry and the subscriptions.

A proxy's class can change while it is connected: when the Kubernetes registry sees its Pod's
labels change (`pod_changed`), the stream classifies its Node again (a copy of the Node is kept for
proxies whose id names a Pod) and moves its cache watch to the new class, new before old.

Gateway certificates (`secrets`, a `pilot.xds.secrets.SecretServer`, Kubernetes only): an
authenticated router's stream gets its namespace's Secrets as the SDS type of its snapshot,
composed per stream from the class's cached snapshot and the namespace's shared set, never
stored in the cache; the stream is woken when that namespace's Secrets change. Plaintext
streams and sidecars never get any.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from pilot.listen import check_free
from pilot.metrics import xds_type
from pilot.model.proxy import NodeError, ProxyIdentity, identity_from_node, served_as
from pilot.quiet import WhenQuiet
from pilot.xds import typeurls
from pilot.xds.cache import ClassWatch, SnapshotCache
from pilot.xds.delta import DeltaSession
from pilot.xds.grpcoptions import server_options
from pilot.xds.peers import (
    PeerIdentityHook,
    PeerMismatchError,
    PeerUnauthenticatedError,
    WorkloadAccount,
    check_peer,
)
from pilot.xds.secrets import SecretGrant, SecretServer
from pilot.xds.sendwatch import SendTimeoutError, SendWatch, abort_stuck
from pilot.xds.session import SessionBase, Subscriptions
from pilot.xds.snapshot import Snapshot
from pilot.xds.sotw import SotwSession
from pilot.xds.status import StatusRegistry
from pilot.xds.streams import PodStreams, StreamSignals, read_requests
from pilot.xds.tlsfront import TlsFront
from pilot.xds.wakeups import drain_wakeups
from pilot.xds.writebudget import DEFAULT_LIMIT, WriteBudget
from pilot.xds.writewave import DEFAULT_PATIENCE, WriteWave

if TYPE_CHECKING:
    from pilot.tracing import ChangeTracker

log = logging.getLogger(__name__)

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


@dataclass(frozen=True)
class SecureServing:
    """What the composition root hands pilot to serve authenticated xDS (see `AdsServer.start_secure`)."""

    context: Callable[[], ssl.SSLContext]
    peer_identity: PeerIdentityHook
    extra_handlers: Sequence[grpc.GenericRpcHandler] = ()


class AdsServer:
    """Serves StreamAggregatedResources and DeltaAggregatedResources from a SnapshotCache."""

    def __init__(
        self,
        cache: SnapshotCache,
        status: StatusRegistry,
        classify: Callable[[Any], ProxyIdentity] = identity_from_node,
        *,
        send_timeout: float | None = 30.0,
        max_connection_age: float | None = 1800.0,
        quiet: WhenQuiet | None = None,
        write_budget: int | None = DEFAULT_LIMIT,
        ack_hold: float | None = DEFAULT_PATIENCE,
        vhds: bool = True,
    ) -> None:
        """`send_timeout` (seconds, None: never) bounds how long one response may wait for the
        proxy to take it; `max_connection_age` (None: unbounded) is when gRPC closes a connection
        gracefully; `quiet` is told of every response written and every call ended;
        `write_budget`: bytes of first responses gRPC may hold at once (None: unbounded);
        `ack_hold`: seconds a wave of writes may keep readers from reading on after a plain ACK
        (`pilot.xds.writewave`; None: never); `vhds`: sidecars on delta streams whose Envoy takes
        VHDS over ADS get their virtual hosts that way (`ProxyClass.vhds`, `pilot.translate.vhds`)."""
        self.cache = cache
        self.status = status
        self.classify = classify
        self.vhds = vhds
        self.send_timeout = send_timeout
        self._send_watch = SendWatch(send_timeout) if send_timeout else None
        self.max_connection_age = max_connection_age
        self.quiet = quiet
        self.write_budget = WriteBudget(write_budget) if write_budget else None
        status.metrics.write_budget = self.write_budget
        self.write_wave = WriteWave(ack_hold) if ack_hold else None
        status.metrics.write_wave = self.write_wave
        self.subscriptions = Subscriptions(sharing=cache.sharing)  # shared by every stream's session
        self._server: grpc.aio.Server | None = None
        self._secure: grpc.aio.Server | None = None
        self._front: TlsFront | None = None
        self._peer_identity: PeerIdentityHook | None = None
        self._workload_account: WorkloadAccount | None = None
        self.secrets: SecretServer | None = None  # gateway certificates over ADS (see the module docstring)
        self.changes: ChangeTracker | None = None  # config changes followed to the proxies (pilot.tracing)
        # Open streams by the Pod their node id names; enabled with the Kubernetes registry.
        self.pods = PodStreams()

    def pod_changed(self, namespace: str, name: str) -> None:
        """A Pod's labels changed (`pilot.kube.registry_source`): its proxies' streams classify their
        Node again and move to the class it gives now, without reconnecting (Istio updates a proxy's
        labels from its Pod likewise)."""
        self.pods.changed(namespace, name)

    def handler(self, *, authenticated: bool = False) -> grpc.GenericRpcHandler:
        """ADS; `authenticated` streams must hold the identity their Node claims (see `start_secure`)."""
        # Requests are read with `context.read`, never through gRPC's iterator (`read_requests`).
        async def sotw(_requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
            await self._stream(context, SotwSession, authenticated)

        async def delta(_requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
            await self._stream(context, DeltaSession, authenticated)

        # No (de)serializers: requests reach the sessions as the bytes gRPC read and responses are
        # pre-encoded bytes, so gRPC passes both through as they are, without a Python call each.
        return grpc.method_handlers_generic_handler(SERVICE, {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(sotw),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(delta),
        })

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port alone (0 = any free port); returns the bound port.

        Raises AddressInUseError, leaving nothing running, when another process has the address.
        """
        check_free("xDS", host, port)  # before gRPC tries: it would log its own error first
        server = grpc.aio.server(options=server_options(self.max_connection_age))
        server.add_generic_rpc_handlers((self.handler(),))
        try:
            bound = int(server.add_insecure_port(f"{host}:{port}"))
        except RuntimeError:
            await server.stop(None)
            check_free("xDS", host, port)  # taken since the probe: say so
            raise
        self._server = server
        await server.start()
        drain_wakeups(asyncio.get_running_loop())  # completions reach the loop during a fan-out
        return bound

    async def start_secure(
        self,
        host: str,
        port: int,
        *,
        context: Callable[[], ssl.SSLContext],
        peer_identity: PeerIdentityHook,
        workload_account: WorkloadAccount,
        extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    ) -> int:
        """Serve authenticated ADS (and `extra_handlers`) over TLS on host:port; returns the bound port.

        `context` gives the server's SSL context for each new connection (server certificate, the
        roots client certificates must chain to, `CERT_OPTIONAL`); `peer_identity` maps a verified
        client certificate to a `PeerIdentity`; `workload_account` names a local-mesh workload's
        service account. Raises AddressInUseError, leaving nothing running, if the address is taken.
        """
        check_free("authenticated xDS", host, port)
        self._peer_identity, self._workload_account = peer_identity, workload_account
        server = grpc.aio.server(options=server_options(self.max_connection_age))
        server.add_generic_rpc_handlers((self.handler(authenticated=True), *extra_handlers))
        internal = int(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        drain_wakeups(asyncio.get_running_loop())
        self._secure = server
        self._front = TlsFront(context, "127.0.0.1", internal)
        try:
            return await self._front.start(host, port)
        except OSError:
            check_free("authenticated xDS", host, port)  # taken since the probe: say so
            raise

    async def stop(self, grace: float = 1.0) -> None:
        if self._front is not None:
            await self._front.stop()
            self._front = None
        if self._secure is not None:
            await self._secure.stop(grace)
            self._secure = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._send_watch is not None:
            self._send_watch.close()
        if self.write_wave is not None:
            self.write_wave.close()

    def _stream_ended(self) -> None:
        """A stream's handler is returning, and gRPC ends its call and frees its buffers right
        after: one more thing the release waits to settle (see the module docstring)."""
        if self.quiet is not None:
            self.quiet.touch()

    def _authenticate(self, identity: ProxyIdentity, context: grpc.aio.ServicerContext) -> ProxyIdentity:
        """`identity` checked against the stream's client certificate (see `pilot.xds.peers`)."""
        peer = self._front.peer(context.peer()) if self._front is not None else None
        if peer is None:
            raise PeerUnauthenticatedError("the connection did not come through the TLS port")
        if peer.certificate is None or self._peer_identity is None:
            raise PeerUnauthenticatedError("xDS on this port requires a client certificate from the mesh CA "
                                           "(mutual TLS); none was presented")
        holder = self._peer_identity(peer.certificate)
        account = None
        if identity.workload and self._workload_account is not None:
            account = self._workload_account(identity.namespace, identity.workload)
        return check_peer(identity, holder, account)

    async def _open(
        self, context: grpc.aio.ServicerContext, kind: type[SessionBase[Any]], authenticated: bool,
    ) -> tuple[ProxyIdentity, Any, bytes] | None:
        """The first request, decoded, and who sent it; None once the stream is refused (aborted,
        counted, logged) or ended before its first request. Requests arrive as bytes: sessions
        decode what they need (`handle_wire`)."""
        first_wire = await context.read()  # not the request iterator: see `read_requests`
        if first_wire is grpc.aio.EOF:
            return None
        try:
            first = kind.parse(first_wire)
            identity = self._served_as(self.classify(first.node), first.node, kind.protocol)
            if authenticated:
                identity = self._authenticate(identity, context)
        except DecodeError as exc:
            await self._refuse(context, "bad_request", grpc.StatusCode.INVALID_ARGUMENT,
                               f"cannot decode the first request: {exc}")
        except NodeError as exc:
            await self._refuse(context, "bad_node", grpc.StatusCode.INVALID_ARGUMENT, f"cannot identify proxy: {exc}")
        except PeerUnauthenticatedError as exc:
            log.warning("refused %s stream from %s: %s", kind.protocol, context.peer(), exc)
            await self._refuse(context, "unauthenticated", grpc.StatusCode.UNAUTHENTICATED, f"xDS refused: {exc}")
        except PeerMismatchError as exc:
            log.warning("refused %s stream from %s: %s", kind.protocol, context.peer(), exc)
            await self._refuse(context, "identity_mismatch", grpc.StatusCode.PERMISSION_DENIED, f"xDS refused: {exc}")
        else:
            return identity, first, first_wire
        return None

    def _served_as(self, identity: ProxyIdentity, node: Any, protocol: str) -> ProxyIdentity:
        """`identity` as this server serves it: a VHDS class where `served_as` says so, unless off."""
        return served_as(identity, node, protocol) if self.vhds else identity

    async def _refuse(self, context: grpc.aio.ServicerContext, reason: str, code: grpc.StatusCode, detail: str) -> None:
        self.status.metrics.stream_errors.labels(reason).inc()
        await context.abort(code, detail)

    # Coroutine handlers that write with `context.write`: an async-generator handler would leave
    # each stream's last response (megabytes at mission scale) referenced by gRPC's own loop until
    # the next one, so every idle stream would hold a copy. Here nothing keeps a written response.
    async def _stream(
        self, context: grpc.aio.ServicerContext, kind: type[SessionBase[Any]], authenticated: bool = False,
    ) -> None:
        try:
            await self._run_stream(context, kind, authenticated)
        finally:  # however the stream ends (refused, before its first request, timed out, ...)
            self._stream_ended()

    async def _run_stream(
        self, context: grpc.aio.ServicerContext, kind: type[SessionBase[Any]], authenticated: bool,
    ) -> None:
        opened = await self._open(context, kind, authenticated)
        if opened is None:
            return
        identity, first, first_wire = opened
        del opened  # the first request can be 100 KB of names: only `first`/`first_wire` hold it, until handled
        # Headers now, not with the first response: a status sent after a stuck first response
        # would otherwise repeat them, which gRPC refuses (the call could then never be ended).
        await context.send_initial_metadata(())
        stream_status = self.status.open(identity, kind.protocol, context.peer())
        session: Any = kind(stream_status, self.status, self.subscriptions)
        stream_status.session = session  # its subscriptions, for /debug/adsz
        log.debug("%s stream %d opened by %s (%s)", kind.protocol, stream_status.stream_id,
                  identity.node_id, identity.proxy_class.describe())
        stream = StreamSignals()
        grant = await self.secrets.stream_grant(identity, authenticated) if self.secrets is not None else None
        # Delta streams only: held SotW ACKs cost pilot ~25% more CPU per route change at 1,000 proxies.
        held = self.write_wave if kind.protocol == "delta" else None
        reader = asyncio.create_task(read_requests(context.read, session, stream, held))
        pod = self.pods.follow(identity.node_id, first.node, stream)  # to classify again (`pod_changed`)
        try:
            with ClassWatch(self.cache, identity.proxy_class, stream.wake.set) as watch, \
                    self._secrets_watch(grant, stream.wake.set):
                session.handle(first, first_wire)
                del first, first_wire
                await self._serve(identity, session, stream, context, grant, watch, authenticated)
        except SendTimeoutError as exc:
            timed_out = str(exc)  # not the exception: its traceback would keep the writer's frames
        else:
            timed_out = ""
        finally:
            self.pods.leave(pod, stream)
            reader.cancel()
            self.status.close(stream_status)
            if grant is not None and self.secrets is not None:
                self.secrets.forget(stream_status.stream_id, identity.node_id)
            log.debug("stream %d of %s closed", stream_status.stream_id, identity.node_id)
        if timed_out:
            del session, stream, reader  # pilot's part of the stream goes now, not with the call
            self.status.metrics.stream_errors.labels("send_timeout").inc()
            log.warning("closing %s stream %d of %s: %s", kind.protocol, stream_status.stream_id,
                        identity.node_id, timed_out)
            await abort_stuck(context, timed_out)

    def _secrets_watch(self, grant: SecretGrant | None, wake: Callable[[], None]) -> Any:
        if grant is None or self.secrets is None:
            return contextlib.nullcontext()
        return self.secrets.watch(grant.namespace, wake)

    def _parts(self, latest: Snapshot | None, grant: SecretGrant | None) -> tuple[Snapshot | None, Any]:
        """What a stream's snapshot is made of: its class's snapshot and, for a router with a grant,
        its namespace's Secrets (a shared set, replaced when they change)."""
        return latest, (self.secrets.view(grant) if grant is not None and self.secrets is not None else None)

    async def _serve(
        self, identity: ProxyIdentity, session: Any, stream: StreamSignals, context: grpc.aio.ServicerContext,
        grant: SecretGrant | None, watch: ClassWatch, authenticated: bool,
    ) -> None:
        """Answer whenever a request calls for it or the class gets a new snapshot, until the client leaves."""
        snapshot: Snapshot | None = None
        made_of: tuple[Snapshot | None, Any] | None = None
        stream.dirty = True  # the first request is handled already
        wake = stream.wake
        task = asyncio.current_task()  # this stream's writer, as the send watch follows it
        first_sent: set[str] = set()  # types whose first response this stream has written (`_write`)
        while True:
            # Cleared before looking, so whatever happens from here on (a request, a snapshot, the
            # client leaving, even while the responses below are written) sets it again and is seen
            # on the next pass; a pass that was woken by nothing new costs no lookup at all.
            wake.clear()
            if stream.error is not None:
                raise stream.error
            if stream.closed:
                return
            if stream.reclassify:
                stream.reclassify = False
                identity = self._reclassified(identity, session, stream, context, watch, authenticated)
            latest, secrets = parts = self._parts(self.cache.get(watch.key), grant)
            if made_of is None or latest is not made_of[0] or secrets is not made_of[1]:
                # Composed per stream, never cached: the keys stay in the SecretServer's sets.
                snapshot = latest if latest is None or secrets is None else latest.with_type(typeurls.SECRET, secrets)
                made_of, stream.dirty = parts, True
            if snapshot is not None and stream.dirty:
                stream.dirty = False
                if grant is not None and self.secrets is not None:
                    self._audit_secrets(identity, session, grant)
                began = time.perf_counter()
                responses = session.responses(snapshot)
                made = time.perf_counter() - began  # Istio's push time counts making a response too
                sent = session.status.take_sent()  # the type (CDS, ...) of each response, in order
                types = sent if len(sent) == len(responses) else []
                if responses and self.quiet is not None:
                    self.quiet.touch(len(responses))
                for i in range(len(responses)):  # not kept once written
                    kind = types[i] if types else ""
                    first = bool(kind) and kind not in first_sent
                    first_sent.add(kind)
                    await self._write(context, responses.pop(0), kind, made if i == 0 else 0.0, first, task)
                if self.changes is not None and types:
                    self.changes.written(session.status.stream_id, session.status.connected_at, types)
            if not wake.is_set():  # else: something came while the responses were written
                await wake.wait()

    def _reclassified(self, identity: ProxyIdentity, session: Any, stream: StreamSignals,
                      context: grpc.aio.ServicerContext, watch: ClassWatch, authenticated: bool) -> ProxyIdentity:
        """The stream's identity after its Pod changed: its Node classified again (the Pod's labels
        now), checked against its certificate on the authenticated port. A new class is watched
        before the old one is let go, so its snapshot is ready for the next step; the session then
        brings the proxy from what it holds to that snapshot as for any config change. If the Node
        no longer passes (it cannot: a Pod's IPs and service account do not change), the stream
        keeps its class and says why in the log."""
        try:
            found = self._served_as(self.classify(stream.node), stream.node, session.protocol)
            if authenticated:
                found = self._authenticate(found, context)
        except (NodeError, PeerUnauthenticatedError, PeerMismatchError) as exc:
            log.warning("stream %d of %s keeps its class %s: %s", session.status.stream_id, identity.node_id,
                        identity.proxy_class.describe(), exc)
            return identity
        if found.proxy_class != identity.proxy_class:
            log.info("stream %d of %s: its Pod changed, class %s -> %s", session.status.stream_id, identity.node_id,
                     identity.proxy_class.describe(), found.proxy_class.describe())
            watch.move(found.proxy_class)
        session.status.identity = found
        return found

    def _audit_secrets(self, identity: ProxyIdentity, session: Any, grant: SecretGrant) -> None:
        """Log the SDS names the router subscribed to and may not (or cannot) have."""
        state = session.types.get(typeurls.SECRET)
        names = getattr(state, "names", None)
        if self.secrets is not None and names:
            self.secrets.audit(session.status.stream_id, identity.node_id, grant, names)

    async def _write(self, context: grpc.aio.ServicerContext, response: bytes, type_name: str = "",
                     made: float = 0.0, first: bool = False, task: Any = None) -> None:
        """Hand one response (of type `type_name`: CDS, ...) to gRPC; SendTimeoutError if the proxy
        does not take it in time. `made`: seconds this stream spent making the response (its step);
        `first`: the stream's first response of the type (a connecting proxy's config), which
        waits for its share of the `WriteBudget` before the send timeout starts. `task`: the
        writing task (looked up when not given).

        The timeout is one server-wide `SendWatch`, not a timer per write (a timer object, a heap
        push and a cancellation each: about 7 µs per write on the shared 2-core machine, 14 ms per
        route change at mission scale). Istio's histograms: `XdsMetrics.written`.
        """
        istio = self.status.metrics.istio
        budget = self.write_budget if first else None  # a few writes per stream: not the hot path
        taken = await budget.take(len(response)) if budget is not None else 0
        began = time.perf_counter()
        watch, wave = self._send_watch, self.write_wave
        if task is None and watch is not None:
            task = asyncio.current_task()
        if watch is not None:
            watch.begin(task)
        if wave is not None:
            wave.begin()
        try:
            await context.write(response)
        except asyncio.CancelledError:
            if watch is None or not watch.expired(task):
                raise
            istio.write_timeout.inc()
            if type_name:
                istio.pushes.inc(f"{xds_type(type_name)}_senderr")
            raise SendTimeoutError(
                f"it did not read a {len(response)}-byte response for {self.send_timeout:g} s (send timeout)"
            ) from None
        finally:
            if wave is not None:
                wave.end()
            if watch is not None:
                watch.end(task)
            if budget is not None:
                budget.give_back(taken)
        self.status.metrics.written(type_name, time.perf_counter() - began, made, len(response))

