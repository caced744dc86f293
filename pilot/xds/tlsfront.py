"""The TLS face of pilot's authenticated gRPC server (15012): terminate TLS, relay bytes, remember the peer.

Why it exists: on one port, istiod serves the CSR service (whose callers have no certificate yet:
they authenticate with a token) and ADS (whose callers must present a mesh certificate). That
needs TLS that *requests* a client certificate and verifies it *if given*; grpcio's server
credentials offer only "never request" or "require and verify". So this front accepts TCP on the
public address, runs the TLS handshake with Python's `ssl` (`CERT_OPTIONAL`: a certificate that
is presented must chain to the configured roots, or the handshake fails), and relays the
decrypted bytes (HTTP/2, untouched) to a gRPC server listening in plaintext on an internal
loopback port. Before relaying it records, under the internal connection's local address, the
client's verified leaf certificate; handlers map `context.peer()` back to it with `peer`.

The internal port accepts anyone local, but a connection that did not come through the front has
no recorded peer, so handlers that need one refuse it (ADS answers UNAUTHENTICATED).

Concurrency: everything runs on the caller's event loop, and after the handshake nothing but
callbacks: each connection is a pair of asyncio protocols, each writing what it receives straight
into the other side's transport (no tasks, no stream buffers). Backpressure is the transports':
when one side's write buffer passes `HIGH_WATER`, the other side stops reading until it drains
(gRPC flow control then does the rest). The SSL context is asked for per connection, so a renewed
server certificate or a changed trust bundle applies to new handshakes at once.
Cost: every byte crosses the event loop once more than on a plaintext port (one read and one write
per chunk of up to 256 KiB, plus the TLS record work that gRPC would otherwise do in C).
`benchmarks.write_floor` measures it: one mission-scale route change (2,000 x 0.57 MB) costs the
server about 1.8 s of CPU through this front, 0.7 s on plain gRPC, and 1.4-1.7 s over gRPC's own
TLS (no hop, encrypting in C): TLS is most of the difference, the hop and the relay's Python
0.1-0.4 s. (With a coroutine per direction reading asyncio streams, as before session 21, the
relay's part was larger: see the README's "How it fits together".)
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# How much a side's transport may buffer before the other side stops reading. asyncio's TLS layer
# reads up to 256 KiB from the socket at a time and hands it over as one chunk; with 64 KiB (the
# default) almost every chunk paused and resumed the other side. Cost: up to this much buffered per
# direction and connection, and what a paused reader had already taken.
HIGH_WATER = 256 * 1024
HANDSHAKE_TIMEOUT = 10.0  # seconds a client may take to finish its TLS handshake
CLOSE_TIMEOUT = 1.0  # seconds for a TLS close_notify exchange before the connection is just dropped


@dataclass(frozen=True)
class Peer:
    """Who is at the other end of a relayed connection: its address and verified certificate (DER)."""

    address: str
    certificate: bytes | None


class TlsFront:
    """Accepts TLS on a public address and relays each connection to `backend` (a plaintext gRPC port)."""

    def __init__(self, context: Callable[[], ssl.SSLContext], backend_host: str, backend_port: int) -> None:
        self._context = context
        self._backend = (backend_host, backend_port)
        self._peers: dict[str, Peer] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # handshakes and backend connects under way
        self._relays: set[_Relay] = set()
        self.handshake_failures = 0
        self.relay_failures = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on `host:port` (0: any free port); returns the bound port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Relay(self).client, host, port, reuse_address=True)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and close every relayed connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for relay in list(self._relays):  # at once: a graceful TLS close may wait for the peer
            relay.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._peers.clear()

    def peer(self, grpc_peer: str) -> Peer | None:
        """The client behind an internal connection, by gRPC's `context.peer()`; None if not relayed."""
        return self._peers.get(grpc_peer)

    def _accepted(self, relay: _Relay, raw: asyncio.BaseTransport) -> None:
        """A TCP connection came in: run its handshake and connect it to the backend (a task)."""
        self._relays.add(relay)
        task = asyncio.get_running_loop().create_task(self._open(relay, raw))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, relay: _Relay, raw: asyncio.BaseTransport) -> None:
        client = _address(raw.get_extra_info("peername"))
        loop = asyncio.get_running_loop()
        if relay.closed or raw.is_closing():  # the client left before its handshake began
            relay.close()
            return
        try:
            try:
                tls = await loop.start_tls(raw, relay.client, self._context(), server_side=True,  # type: ignore[arg-type]
                                           ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                                           ssl_shutdown_timeout=CLOSE_TIMEOUT)
            except (ssl.SSLError, OSError, TimeoutError) as exc:
                self.handshake_failures += 1
                log.info("xDS/TLS: handshake with %s failed: %s", client, exc)
                raw.abort()  # type: ignore[attr-defined]
                relay.close()
                return
            if tls is None or relay.closed:  # the client left during the handshake
                relay.close()
                return
            relay.client.attach(tls)
            ssl_object = tls.get_extra_info("ssl_object")
            relay.peer = Peer(client, ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None)
            try:
                await loop.create_connection(lambda: relay.backend, *self._backend)
            except OSError as exc:
                log.error("xDS/TLS: cannot reach the internal gRPC server %s:%d: %s", *self._backend, exc)
                relay.close()
        except asyncio.CancelledError:
            relay.abort()
            raise
        except Exception:  # a bug, not the peer's doing: logged with context, the other connections go on
            self.relay_failures += 1
            log.exception("xDS/TLS: relaying a connection from %s failed", client)
            relay.abort()


class _Side(asyncio.Protocol):
    """One end of a relayed connection: what it receives is written to the other end's transport."""

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.other: _Side = self
        self.early: list[bytes] = []  # received before the other end could take it, in order
        self.early_bytes = 0

    def attach(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        sink = self.other.transport
        if sink is not None and not self.early:
            sink.write(data)
            return
        self.early.append(data)  # the backend is not connected yet
        self.early_bytes += len(data)
        if self.early_bytes > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()

    def flush_early(self) -> None:
        """Hand over what arrived before the other end was there (it is now)."""
        sink = self.other.transport
        if sink is None or not self.early:
            return
        for data in self.early:
            sink.write(data)
        self.early.clear()
        if self.early_bytes > HIGH_WATER and self.transport is not None:
            self.transport.resume_reading()
        self.early_bytes = 0

    def eof_received(self) -> bool:
        self.relay.close()  # HTTP/2 does not half-close a connection: one end leaving ends the relay
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.relay.close()

    def pause_writing(self) -> None:
        source = self.other.transport
        if source is not None:
            source.pause_reading()

    def resume_writing(self) -> None:
        source = self.other.transport
        if source is not None and not source.is_reading():
            source.resume_reading()


class _Client(_Side):
    """The TLS end: its TCP connection is what the front accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The raw TCP transport, until the handshake replaces it with the TLS one (`attach`). Not
        # read until then: the ClientHello is the TLS layer's to read (`start_tls` resumes reading).
        transport.pause_reading()  # type: ignore[attr-defined]
        self.relay.front._accepted(self.relay, transport)


class _Backend(_Side):
    """The plaintext end, to the internal gRPC server."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        relay = self.relay
        if relay.closed or relay.peer is None:  # the client left meanwhile (its peer is set before connecting)
            transport.close()
            return
        self.attach(transport)  # type: ignore[arg-type]
        local = transport.get_extra_info("sockname")
        relay.key = f"ipv4:{local[0]}:{local[1]}"
        relay.front._peers[relay.key] = relay.peer  # before the first byte: the handler may look it up at once
        self.other.flush_early()


class _Relay:
    """One relayed connection: its two ends, who the client is, and closing both together."""

    def __init__(self, front: TlsFront) -> None:
        self.front = front
        self.client: _Side = _Client(self)
        self.backend: _Side = _Backend(self)
        self.client.other, self.backend.other = self.backend, self.client
        self.peer: Peer | None = None
        self.key = ""
        self.closed = False

    def close(self) -> None:
        """End both sides, each after writing what it still buffers (a TLS end also sends close_notify)."""
        self._end(abort=False)

    def abort(self) -> None:
        """End both sides at once, dropping what they buffer."""
        self._end(abort=True)

    def _end(self, abort: bool) -> None:
        first = not self.closed
        self.closed = True
        for side in (self.client, self.backend):
            transport = side.transport
            if transport is not None and (abort or not transport.is_closing()):
                if abort:
                    transport.abort()
                else:
                    transport.close()
        if first:
            self.front._relays.discard(self)
            if self.key:
                self.front._peers.pop(self.key, None)


def _address(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return str(peername)
