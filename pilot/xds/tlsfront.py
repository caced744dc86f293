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

Concurrency: everything runs on the caller's event loop; each connection is two relay coroutines
(one per direction) that await `drain`, so a slow reader on either side holds the other back
(gRPC flow control then does the rest). The SSL context is asked for per connection, so a
renewed server certificate or a changed trust bundle applies to new handshakes at once.
Cost: every byte crosses the event loop once more than on a plaintext port (one read and one
write of up to 256 KiB per chunk, plus the TLS record work that gRPC would otherwise do in C).
`benchmarks.write_floor` measures it: one mission-scale route change (2,000 x 0.57 MB) costs the
server about 2 s of CPU through this front against 0.7 s on plain gRPC; encrypting is about a
third of the difference, the extra loopback hop and the relay's Python the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

# What one relay step moves, and how much a side's reader buffers before it stops reading (asyncio
# pauses at twice the limit): the TLS layer reads 256 KiB from the socket at a time, and with
# asyncio's default 64 KiB limit every such read paused and resumed the transport. Measured with
# `benchmarks.write_floor` (2,000 streams x 0.57 MB): 2.9-3.0 s of CPU per round with the defaults,
# 1.9-2.0 s with these. Cost: up to 256 KiB buffered per direction and connection, not 128 KiB.
CHUNK = 256 * 1024
READ_LIMIT = 128 * 1024
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
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.handshake_failures = 0
        self.relay_failures = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on `host:port` (0: any free port); returns the bound port."""
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True,
                                                   limit=READ_LIMIT)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and close every relayed connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):  # at once: a graceful TLS close may wait for the peer
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._peers.clear()

    def peer(self, grpc_peer: str) -> Peer | None:
        """The client behind an internal connection, by gRPC's `context.peer()`; None if not relayed."""
        return self._peers.get(grpc_peer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:  # a bug, not the peer's doing: logged with context, the other connections go on
            self.relay_failures += 1
            log.exception("xDS/TLS: relaying a connection from %s failed", writer.get_extra_info("peername"))
        finally:
            if task is not None:
                self._tasks.discard(task)
            self._writers.discard(writer)
            await _close(writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _address(writer.get_extra_info("peername"))
        try:
            await writer.start_tls(self._context(), ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            self.handshake_failures += 1
            log.info("xDS/TLS: handshake with %s failed: %s", client, exc)
            return
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._backend, limit=READ_LIMIT)
        except OSError as exc:
            log.error("xDS/TLS: cannot reach the internal gRPC server %s:%d: %s", *self._backend, exc)
            return
        self._writers.add(up_writer)
        local = up_writer.get_extra_info("sockname")
        key = f"ipv4:{local[0]}:{local[1]}"
        self._peers[key] = Peer(client, der)  # before the first byte: the handler may look it up at once
        try:
            pumps = [asyncio.create_task(_pump(reader, up_writer)), asyncio.create_task(_pump(up_reader, writer))]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._peers.pop(key, None)
            self._writers.discard(up_writer)
            await _close(up_writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close gracefully if the peer answers within CLOSE_TIMEOUT, else drop the connection."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (TimeoutError, OSError, ssl.SSLError, asyncio.CancelledError):
        writer.transport.abort()


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until EOF or an error on either side; `drain` is the backpressure."""
    with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()


def _address(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return str(peername)
