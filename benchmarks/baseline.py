"""The baseline: raw grpc.aio fan-out of pre-serialized responses, with no pilot logic at all.

It replays responses recorded from pilot in the same run (so sizes are equal): a request
without a nonce for a type gets that type's initial responses, ACKs are ignored, and `push`
sends one recorded change response to every open stream; `learn` replaces the recorded change of
a kind (`benchmarks.paired` teaches it each change pilot made in its first round). Runs as its own
process (spawn), driven over a pipe like a client worker; one event loop, one queue per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from benchmarks.worker import Command
from pilot.xds.grpcoptions import server_options

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


class Replay:
    """Recorded responses: type_url -> initial responses, and change kind -> one response."""

    def __init__(self, initial: dict[str, list[bytes]], changes: dict[str, bytes]) -> None:
        self.initial = initial
        self.changes = changes
        self.streams: set[asyncio.Queue[bytes]] = set()

    def handler(self) -> grpc.GenericRpcHandler:
        sotw = discovery_pb2.DiscoveryRequest.FromString
        delta = discovery_pb2.DeltaDiscoveryRequest.FromString
        return grpc.method_handlers_generic_handler(SERVICE, {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(self._stream, sotw, bytes),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(self._stream, delta, bytes),
        })

    async def _stream(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.streams.add(queue)
        reader = asyncio.create_task(self._read(requests, queue))
        try:
            while raw := await queue.get():  # b"": the proxy closed its side
                yield raw
        finally:
            reader.cancel()
            self.streams.discard(queue)

    async def _read(self, requests: AsyncIterator[Any], queue: asyncio.Queue[bytes]) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for request in requests:
                if not request.response_nonce:
                    for raw in self.initial.get(request.type_url, []):
                        queue.put_nowait(raw)
        queue.put_nowait(b"")

    def push(self, kind: str) -> int:
        raw = self.changes[kind]
        for queue in self.streams:
            queue.put_nowait(raw)
        return len(self.streams)


async def serve(conn: Connection, replay: Replay) -> None:
    # pilot's gRPC options (its read buffer cap included), so the two servers differ only in
    # what they run per write, not in how gRPC reads and buffers.
    server = grpc.aio.server(options=server_options(None))
    server.add_generic_rpc_handlers((replay.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(port)
    try:
        while True:
            try:
                cmd: Command = await asyncio.to_thread(conn.recv)
            except EOFError:
                return
            if cmd.name == "close":
                conn.send(True)
                return
            if cmd.name == "learn":  # (kind, bytes): pilot's change of that kind, to replay from now on
                replay.changes[cmd.args[0]] = cmd.args[1]
                conn.send(True)
                continue
            conn.send(replay.push(*cmd.args) if cmd.name == "push" else ValueError(cmd.name))
    finally:
        await server.stop(0)


def main(conn: Connection, initial: dict[str, list[bytes]], changes: dict[str, bytes]) -> None:
    """Process entry point (multiprocessing, spawn start method)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(conn, Replay(initial, changes)))
    conn.close()
