"""What writing a route change's bytes costs a server that does nothing else, on this machine.

    python -m benchmarks.write_floor --bytes 568068 --streams 2000 --rounds 3

A route change at mission scale sends every proxy the one outbound route configuration
(0.57 MB, 1,000 virtual hosts): 2,000 proxies are 1.14 GB however the server is built. This
measures the floor under pilot's "CPU per route change": the server CPU (user + system, from
`getrusage`) of handing those bytes to the kernel, once through `grpc.aio` (the stack pilot is
built on: one message per stream, pre-encoded, written with `context.write` as pilot does) and
once as plain TCP `sendall` on one socket per stream (what the bytes cost below any RPC layer).
A reader process (spawned, with the benchmark's client channels: 250 streams each, one TCP
connection per channel) takes every byte without parsing it and shares the 2 cores with the
server, as the ADS load benchmark's clients do.

Cost: the run itself writes rounds x streams x bytes twice (about 7 GB at the defaults).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import resource
import selectors
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import click
import grpc

from benchmarks.worker import CHANNEL_OPTIONS, STREAMS_PER_CHANNEL

SERVICE = "meshctl.bench.WriteFloor"
OPEN_TIMEOUT = 120.0  # seconds for the reader to open every stream
ROUTE_CONFIG_BYTES = 568_068  # the mission-scale outbound route configuration (benchmarks/README.md)


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


def _grpc_reader(port: int, streams: int, conn: Connection) -> None:
    """Open `streams` calls and count every byte they bring, until the server ends them."""

    async def run() -> int:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
                    for _ in range(-(-streams // STREAMS_PER_CHANNEL))]
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


async def grpc_floor(streams: int, size: int, rounds: int) -> Floor:
    """Rounds of one `size`-byte message to each of `streams` gRPC streams, all written at once."""
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
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    parent, child = multiprocessing.get_context("spawn").Pipe()
    reader = multiprocessing.get_context("spawn").Process(target=_grpc_reader, args=(port, streams, child))
    reader.start()
    try:
        await asyncio.wait_for(opened.wait(), OPEN_TIMEOUT)
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
        await server.stop(None)
        reader.join(30)
    return Floor("grpc.aio", streams, size, (u1 - user) / rounds, (s1 - system) / rounds,
                 elapsed / rounds, received)


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
    if len(floors) == 2 and floors[1].cpu > 0:
        lines.append(f"grpc.aio / plain TCP CPU: {floors[0].cpu / floors[1].cpu:.1f}x")
    return "\n".join(lines)


@click.command()
@click.option("--bytes", "size", type=click.IntRange(min=2), default=ROUTE_CONFIG_BYTES, show_default=True,
              help="Message size: the route configuration every proxy gets.")
@click.option("--streams", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Streams (proxies) written to in each round.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Route changes: rounds of one message per stream.")
def main(size: int, streams: int, rounds: int) -> None:
    """Server CPU per round of one message to every stream: grpc.aio, then plain TCP."""
    floors = [asyncio.run(grpc_floor(streams, size, rounds)), tcp_floor(streams, size, rounds)]
    click.echo(report(floors, rounds))


if __name__ == "__main__":
    main()
