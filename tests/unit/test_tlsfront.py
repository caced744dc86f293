"""pilot.xds.tlsfront: the 15012 relay, against real TLS clients and a real TCP backend on loopback.

The ADS and CSR tests (`test_secure_xds.py`, the e2e mTLS tests) cover it behind gRPC; these pin
the relay itself: bytes in order both ways, the peer known before the backend reads a byte,
backpressure reaching the backend, closing either end, and a failed handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshctl.devcerts import DevCa
from pilot.xds.tlsfront import HIGH_WATER, Peer, TlsFront

HOST = "pilot.tlsfront.test"


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext  # presents a client certificate
    anonymous: ssl.SSLContext  # presents none
    client_der: bytes
    ca_pem: Path
    client_files: tuple[Path, Path]  # certificate, key


def _contexts(tmp: Path) -> Tls:
    ca = DevCa.create("tlsfront test CA")
    ca_pem = ca.write_ca(tmp / "ca.pem")
    server_cert = ca.issue(tmp, "server", [HOST])
    client_cert = ca.issue(tmp, "client", ["client.tlsfront.test"], client=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(server_cert.cert, server_cert.key)
    server.load_verify_locations(ca_pem)
    server.verify_mode = ssl.CERT_OPTIONAL  # as pilot's 15012: requested, verified if given

    def client_context(with_cert: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(ca_pem))
        if with_cert:
            context.load_cert_chain(client_cert.cert, client_cert.key)
        return context

    der = ssl.PEM_cert_to_DER_cert(client_cert.cert.read_text())
    return Tls(server, client_context(True), client_context(False), der, ca_pem, (client_cert.cert, client_cert.key))


@dataclass
class Backend:
    """A plaintext TCP server standing in for the internal gRPC port: records what each connection
    sent, who the front said was behind it when its first byte arrived, and keeps its writer."""

    front: TlsFront | None = None
    received: list[bytearray] = field(default_factory=list)
    peers_at_first_byte: list[Peer | None] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        got = bytearray()
        self.received.append(got)
        local = writer.get_extra_info("peername")  # the front's end of this connection
        first = True
        while data := await reader.read(65536):
            if first and self.front is not None:
                self.peers_at_first_byte.append(self.front.peer(f"ipv4:{local[0]}:{local[1]}"))
                first = False
            got += data
        self.ended.set()


@contextlib.asynccontextmanager
async def relay(tmp: Path) -> AsyncIterator[tuple[TlsFront, Backend, Tls, int]]:
    tls = _contexts(tmp)
    backend = Backend()
    server = await asyncio.start_server(backend.handle, "127.0.0.1", 0)
    front = TlsFront(lambda: tls.server, "127.0.0.1", server.sockets[0].getsockname()[1])
    backend.front = front
    port = await front.start("127.0.0.1", 0)
    try:
        yield front, backend, tls, port
    finally:
        await front.stop()
        for writer in backend.writers:
            writer.transport.abort()
        server.close()


async def _until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll `condition` (state of the relay, not a signal anything sets) until it holds."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def _client(port: int, context: ssl.SSLContext, backend: Backend,
                  first: bytes = b"hello") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS client of the front that sent `first` and whose connection the backend has seen."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=HOST)
    writer.write(first)
    await _until(lambda: backend.peers_at_first_byte)
    return reader, writer


@pytest.mark.timeout(30)
async def test_bytes_cross_in_order_both_ways_and_the_peer_is_known_before_the_first(tmp_path: Path) -> None:
    async with relay(tmp_path) as (front, backend, tls, port):
        up = bytes(range(256)) * 40_000  # 10 MB toward the backend, written at once
        reader, writer = await _client(port, tls.client, backend, up)
        await _until(lambda: backend.received and len(backend.received[0]) == len(up))
        assert bytes(backend.received[0]) == up
        # The client's verified certificate was recorded before the backend read a byte.
        peer = backend.peers_at_first_byte[0]
        assert peer is not None and peer.certificate == tls.client_der

        down = bytes(reversed(range(256))) * 40_000  # and 10 MB back
        backend.writers[0].write(down)
        assert await reader.readexactly(len(down)) == down

        writer.close()  # the client leaves: the backend's connection ends too, and the peer is forgotten
        await asyncio.wait_for(backend.ended.wait(), 5)
        await _until(lambda: not front._peers)


@pytest.mark.timeout(30)
async def test_a_client_without_a_certificate_is_relayed_with_none(tmp_path: Path) -> None:
    async with relay(tmp_path) as (_, backend, tls, port):
        _, writer = await _client(port, tls.anonymous, backend, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        peer = backend.peers_at_first_byte[0]
        assert peer is not None and peer.certificate is None
        writer.close()


@pytest.mark.timeout(30)
async def test_a_client_that_does_not_read_holds_the_backend_back(tmp_path: Path) -> None:
    async with relay(tmp_path) as (_, backend, tls, port):
        _, writer = await _client(port, tls.client, backend)
        sink = backend.writers[0]
        chunk = bytes(1024 * 1024)
        written = 0
        # The client never reads: past the kernel's socket buffers and the front's high-water marks
        # the backend's writes must stop being taken, instead of the front buffering all of it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3):
                while written < 512 * 1024 * 1024:
                    sink.write(chunk)
                    await sink.drain()
                    written += len(chunk)
        assert written < 64 * 1024 * 1024, f"the front took {written} bytes its client never read"
        assert written > 2 * HIGH_WATER  # it did relay until the buffers were full
        writer.transport.abort()


@pytest.mark.timeout(30)
async def test_the_backend_closing_ends_the_client_connection(tmp_path: Path) -> None:
    async with relay(tmp_path) as (_, backend, tls, port):
        reader, writer = await _client(port, tls.client, backend)
        backend.writers[0].write(b"bye")
        backend.writers[0].close()
        assert await asyncio.wait_for(reader.read(), 5) == b"bye"  # then EOF
        writer.close()


@pytest.mark.timeout(30)
async def test_a_failed_handshake_is_counted_and_reaches_no_backend(tmp_path: Path) -> None:
    async with relay(tmp_path) as (front, backend, tls, port):
        (tmp_path / "other").mkdir()
        other = _contexts(tmp_path / "other")
        # Trusts the front's server certificate but presents a client certificate from another CA:
        # CERT_OPTIONAL verifies what is given, so the handshake fails on the front's side.
        foreign = ssl.create_default_context(cafile=str(tls.ca_pem))
        foreign.load_cert_chain(*other.client_files)
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=foreign, server_hostname=HOST)
            writer.write(b"x")  # TLS 1.3: the client may learn of the refusal only now
            assert await asyncio.wait_for(reader.read(), 5) == b""
        plain_reader, plain_writer = await asyncio.open_connection("127.0.0.1", port)
        plain_writer.write(b"GET / HTTP/1.1\r\n\r\n")  # not TLS at all
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(plain_reader.read(), 5) == b""
        await _until(lambda: front.handshake_failures == 2)
        assert backend.received == [] and front._peers == {}
