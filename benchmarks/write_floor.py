"""What writing a route change's bytes costs a server that does nothing else, on this machine.

    python -m benchmarks.write_floor --bytes 568068 --streams 2000 --rounds 3

A route change at mission scale sends every proxy the one outbound route configuration
(0.57 MB, 1,000 virtual hosts): 2,000 proxies are 1.14 GB however the server is built. This
measures the floor under pilot's "CPU per route change": the server CPU (user + system, from
`getrusage`) of handing those bytes to the kernel, once through `grpc.aio` (the stack pilot is
built on: one message per stream, pre-encoded, written with `context.write` as pilot does), once
the same way but reached over TLS through pilot's `TlsFront` (the relay in front of the
authenticated port 15012, which sidecars on Kubernetes use), once over gRPC's own TLS on the gRPC
port (what TLS costs a server with no relay: grpcio encrypting in C), and once as plain TCP
`sendall` on one socket per stream (what the bytes cost below any RPC layer). A reader process (spawned, with the
benchmark's client channels: 250 streams each, one TCP connection per channel) takes every byte
without parsing it and shares the 2 cores with the server, as the ADS load benchmark's clients do.

Cost: the run itself writes rounds x streams x bytes four times (about 14 GB at the defaults).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import selectors
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import click
import grpc

from benchmarks.worker import CHANNEL_OPTIONS, STREAMS_PER_CHANNEL
from meshctl.devcerts import DevCa
from pilot.xds.tlsfront import TlsFront

SERVICE = "meshctl.bench.WriteFloor"
OPEN_TIMEOUT = 120.0  # seconds for the reader to open every stream
ROUTE_CONFIG_BYTES = 568_068  # the mission-scale outbound route configuration (benchmarks/README.md)
TLS_HOST = "pilot.write-floor.test"  # the name in the TLS front's certificate


@dataclass(frozen=True)
class Floor:
    """Server CPU for one round (every stream gets one message), averaged over the rounds."""

    transport: str
    streams: int
    size: int
    user: float
    system: float
    wall: float
    received: int  # bytes the reader took over all rounds (checks nothing was lost)

    @property
    def cpu(self) -> float:
        return self.user + self.system

    def per_message_us(self) -> float:
        return self.cpu / self.streams * 1e6


def _cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def _identity(data: bytes) -> bytes:
    return data


def _grpc_reader(port: int, streams: int, conn: Connection, ca_pem: bytes | None = None) -> None:
    """Open `streams` calls and count every byte they bring, until the server ends them. With
    `ca_pem`, over TLS to a server certificate for `TLS_HOST` issued by that CA."""

    def channel() -> grpc.aio.Channel:
        if ca_pem is None:
            return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca_pem),
                                       options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", TLS_HOST)])

    async def run() -> int:
        channels = [channel() for _ in range(-(-streams // STREAMS_PER_CHANNEL))]
        calls = [c.unary_stream(f"/{SERVICE}/Take", request_serializer=_identity, response_deserializer=_identity)
                 for c in channels]

        async def one(i: int) -> int:
            total = 0
            async for message in calls[i % len(calls)](b""):
                total += len(message)
            return total

        try:
            return sum(await asyncio.gather(*(one(i) for i in range(streams))))
        finally:
            for c in channels:
                await c.close()

    conn.send(asyncio.run(run()))


def _tcp_reader(port: int, streams: int, conn: Connection) -> None:
    """Connect `streams` sockets and read each until the server closes it."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(streams)]
    conn.send("connected")
    selector = selectors.DefaultSelector()
    for s in socks:
        selector.register(s, selectors.EVENT_READ)
    buf, total, open_ = bytearray(1 << 20), 0, len(socks)
    while open_:
        for key, _ in selector.select():
            got = key.fileobj.recv_into(buf)  # type: ignore[union-attr]
            total += got
            if not got:
                selector.unregister(key.fileobj)
                open_ -= 1
    conn.send(total)


# `grpc_floor`'s `tls` -> the transport's name in the report.
TRANSPORTS = {"": "grpc.aio", "grpc": "grpc TLS", "front": "TLS front"}


async def grpc_floor(streams: int, size: int, rounds: int, tls: str = "") -> Floor:
    """Rounds of one `size`-byte message to each of `streams` gRPC streams, all written at once.

    `tls` "front": the streams come over TLS through pilot's `TlsFront` (the 15012 port's relay, on
    the same event loop as the server, as in pilot), not straight to the gRPC port; "grpc": over
    TLS terminated by gRPC itself (`ssl_server_credentials`, no client certificate asked for:
    grpcio cannot ask for one and accept its absence, which is why pilot has the front); "": plaintext."""
    if tls not in TRANSPORTS:
        raise ValueError(f"tls must be one of {sorted(TRANSPORTS)}, not {tls!r}")
    message = b"\x0a" + bytes(size - 1)
    go: list[asyncio.Event] = [asyncio.Event() for _ in range(rounds)]
    done: list[asyncio.Future[None]] = []
    opened = asyncio.Event()

    async def take(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.append(finished)
        if len(done) == streams:
            opened.set()
        for event in go:
            await event.wait()
            await context.write(message)
            if event is go[-1]:
                finished.set_result(None)

    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 0), ("grpc.max_send_message_length", 64 * 1024 * 1024),
        # gRPC queues at most 1,000 calls waiting for a handler by default (pilot raises it too).
        ("grpc.server.max_pending_requests", 100_000), ("grpc.server.max_pending_requests_hard_limit", 100_000)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Take": grpc.unary_stream_rpc_method_handler(take, _identity, _identity)}),))
    front, ca_pem = None, None
    if tls == "grpc":
        key, chain, ca_pem = _server_pem()
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, chain)]))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    if tls == "front":
        context, ca_pem = _server_tls()
        front = TlsFront(lambda: context, "127.0.0.1", port)
        port = await front.start("127.0.0.1", 0)
    parent, child = multiprocessing.get_context("spawn").Pipe()
    reader = multiprocessing.get_context("spawn").Process(target=_grpc_reader, args=(port, streams, child, ca_pem))
    reader.start()
    try:
        async with asyncio.timeout(OPEN_TIMEOUT):
            await opened.wait()
        user, system = _cpu()
        wall = time.perf_counter()
        for event in go:
            event.set()
        await asyncio.gather(*done)
        u1, s1 = _cpu()
        # Wall ends when the last write is taken by gRPC; the reader may still be reading.
        elapsed = time.perf_counter() - wall
        received = await asyncio.get_running_loop().run_in_executor(None, parent.recv)
    finally:
        if front is not None:
            await front.stop()
        await server.stop(None)
        reader.join(30)
    return Floor(TRANSPORTS[tls], streams, size, (u1 - user) / rounds,
                 (s1 - system) / rounds, elapsed / rounds, received)


def _server_pem() -> tuple[bytes, bytes, bytes]:
    """A private key and certificate for `TLS_HOST` from a fresh CA (PEM), and that CA's certificate."""
    ca = DevCa.create("write_floor CA")
    with tempfile.TemporaryDirectory() as d:
        issued = ca.issue(Path(d), "server", [TLS_HOST])
        return issued.key.read_bytes(), issued.cert.read_bytes(), ca.write_ca(Path(d) / "ca.pem").read_bytes()


def _server_tls() -> tuple[ssl.SSLContext, bytes]:
    """A server context for `TLS_HOST` from a fresh CA (as pilot's 15012 has: TLS 1.2+, client
    certificates requested but optional), and that CA's certificate for the reader."""
    key, chain, ca_pem = _server_pem()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    with tempfile.TemporaryDirectory() as d:  # `load_cert_chain` reads files
        (Path(d) / "key.pem").write_bytes(key)
        (Path(d) / "cert.pem").write_bytes(chain)
        context.load_cert_chain(Path(d) / "cert.pem", Path(d) / "key.pem")
    context.load_verify_locations(cadata=ca_pem.decode())
    context.verify_mode = ssl.CERT_OPTIONAL
    return context, ca_pem


def tcp_floor(streams: int, size: int, rounds: int) -> Floor:
    """The same bytes as plain blocking `sendall`, one socket per stream, round after round."""
    message = bytes(size)
    with socket.create_server(("127.0.0.1", 0), backlog=streams) as listener:
        port = listener.getsockname()[1]
        parent, child = multiprocessing.get_context("spawn").Pipe()
        reader = multiprocessing.get_context("spawn").Process(target=_tcp_reader, args=(port, streams, child))
        reader.start()
        socks = [listener.accept()[0] for _ in range(streams)]
        parent.recv()
        user, system = _cpu()
        began = time.perf_counter()
        for _ in range(rounds):
            for s in socks:
                s.sendall(message)
        u1, s1 = _cpu()
        elapsed = time.perf_counter() - began
        for s in socks:
            s.close()
        received = parent.recv()
        reader.join(30)
    return Floor("plain TCP", streams, size, (u1 - user) / rounds, (s1 - system) / rounds,
                 elapsed / rounds, received)


def report(floors: list[Floor], rounds: int) -> str:
    lines = [f"{'transport':<10} {'streams':>7} {'bytes':>9} {'CPU s/round':>11} {'user':>6} {'sys':>6} "
             f"{'us/message':>10} {'GB/round':>8} {'received ok':>11}"]
    for f in floors:
        ok = f.received == f.streams * f.size * rounds
        lines.append(f"{f.transport:<10} {f.streams:>7} {f.size:>9} {f.cpu:>11.3f} {f.user:>6.3f} "
                     f"{f.system:>6.3f} {f.per_message_us():>10.0f} {f.streams * f.size / 1e9:>8.2f} "
                     f"{'yes' if ok else 'NO':>11}")
    by = {f.transport: f for f in floors}
    for over, under in (("grpc.aio", "plain TCP"), ("grpc TLS", "grpc.aio"), ("TLS front", "grpc.aio"),
                        ("TLS front", "grpc TLS")):
        if over in by and under in by and by[under].cpu > 0:
            lines.append(f"{over} / {under} CPU: {by[over].cpu / by[under].cpu:.1f}x")
    return "\n".join(lines)


@click.command()
@click.option("--bytes", "size", type=click.IntRange(min=2), default=ROUTE_CONFIG_BYTES, show_default=True,
              help="Message size: the route configuration every proxy gets.")
@click.option("--streams", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Streams (proxies) written to in each round.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Route changes: rounds of one message per stream.")
@click.option("--tls/--no-tls", default=True, show_default=True,
              help="Also over TLS: gRPC's own, then through pilot's TLS front (the 15012 relay).")
def main(size: int, streams: int, rounds: int, tls: bool) -> None:
    """Server CPU per round of one message to every stream: grpc.aio, gRPC's TLS, the TLS front, plain TCP."""
    floors = [asyncio.run(grpc_floor(streams, size, rounds))]
    if tls:
        floors += [asyncio.run(grpc_floor(streams, size, rounds, tls)) for tls in ("grpc", "front")]
    floors.append(tcp_floor(streams, size, rounds))
    click.echo(report(floors, rounds))


if __name__ == "__main__":
    main()
