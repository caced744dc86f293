"""A client worker process: many simulated Envoys on one event loop, driven over a pipe.

The coordinator sends commands (`Command`) and waits for each reply; the worker handles one
command at a time on its event loop while the clients' tasks run. Receiving blocks a helper
thread, never the loop. A worker exits on `close`, on a closed pipe, or on any error (the
error is sent back as the reply so the coordinator can report it).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import grpc

from benchmarks.client import ClientResult, Expectation, NameCache, SimClient
from pilot.testing.ads_client import make_node

STREAMS_PER_CHANNEL = 250  # `write_floor`'s channels; the benchmark's clients take theirs from `connect`
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel, not one shared
]


@dataclass(frozen=True)
class NodeSpec:
    """A simulated proxy: node id, namespace and labels (which decide its config class)."""

    node_id: str
    namespace: str
    labels: tuple[tuple[str, str], ...]
    workload: str = "loadgen"  # metadata only: without a bind address it does not split classes


@dataclass(frozen=True)
class Command:
    name: str  # connect | status | arm | results | recorded | recorded_changes | disconnect | close
    args: tuple[Any, ...] = ()


class Worker:
    def __init__(self) -> None:
        self.names = NameCache()
        self.clients: list[SimClient] = []
        self.channels: list[grpc.aio.Channel] = []
        self.tasks: list[asyncio.Task[None]] = []

    def connect(self, target: str, delta: bool, nodes: list[NodeSpec], record_first: bool,
                per_connection: int = 1) -> int:
        """Open a stream per node, `per_connection` streams on each channel (TCP connection)."""
        count = max(1, math.ceil(len(nodes) / max(1, per_connection)))
        self.channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(count)]
        for i, spec in enumerate(nodes):
            client = SimClient(self.node(spec), delta, self.names, record=record_first and i == 0)
            self.clients.append(client)
            self.tasks.append(asyncio.create_task(client.run(self.channels[i % count])))
        return len(self.clients)

    @staticmethod
    def node(spec: NodeSpec) -> Any:
        """The Node a client for `spec` sends (subclasses pose as other kinds of proxy)."""
        return make_node(spec.node_id, namespace=spec.namespace, labels=dict(spec.labels), workload=spec.workload)

    def status(self) -> dict[str, Any]:
        results = [c.result for c in self.clients]
        errors = [r.error for r in results if r.error]
        return {
            "clients": len(results),
            "ready": sum(r.ready_at is not None for r in results),
            "matched": sum(r.matched_at is not None for r in results),
            "reconnects": sum(r.reconnects for r in results),
            "first_error": errors[0] if errors else "",
        }

    def arm(self, expectation: Expectation) -> None:
        for client in self.clients:
            client.arm(expectation)

    def results(self) -> list[ClientResult]:
        return [c.result for c in self.clients]

    def recorded(self) -> tuple[list[tuple[str, bytes]], dict[str, bytes]]:
        """The recording client's initial responses and change responses (empty if none)."""
        for c in self.clients:
            if c.record:
                return c.recorded_initial, c.recorded_changes
        return [], {}

    async def close(self, grace: float = 5.0) -> None:
        """Half-close every stream and let the server end them; cancel what is left after `grace`."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(grace):
                await asyncio.gather(*(c.close() for c in self.clients), return_exceptions=True)
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=grace)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for channel in self.channels:
            await channel.close(grace=None)
        self.clients, self.tasks, self.channels = [], [], []


async def serve(conn: Connection, worker: Worker | None = None) -> None:
    """Run `worker` (a plain `Worker` by default): one command at a time, each reply on the pipe."""
    worker = Worker() if worker is None else worker
    try:
        while True:
            try:
                cmd: Command = await asyncio.to_thread(conn.recv)
            except EOFError:
                return
            try:
                reply = _dispatch(worker, cmd)
            except Exception:
                reply = RuntimeError(traceback.format_exc())
            if cmd.name == "close":
                await worker.close()
                conn.send(reply)
                return
            if cmd.name == "disconnect":  # the clients leave; the worker stays for the next fleet
                await worker.close()
            conn.send(reply)
            await asyncio.sleep(0)
    finally:
        await worker.close()


def _dispatch(worker: Worker, cmd: Command) -> Any:
    if cmd.name == "connect":
        return worker.connect(*cmd.args)
    if cmd.name == "status":
        return worker.status()
    if cmd.name == "arm":
        worker.arm(*cmd.args)
        return True
    if cmd.name == "results":
        return worker.results()
    if cmd.name == "recorded":
        return worker.recorded()
    if cmd.name == "recorded_changes":  # the change responses alone: the initial config is megabytes
        return worker.recorded()[1]
    if cmd.name in ("close", "disconnect"):
        return True
    raise ValueError(f"unknown command {cmd.name!r}")


def main(conn: Connection) -> None:
    """Process entry point (multiprocessing, spawn start method)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(conn))
    conn.close()


class WorkerHandle:
    """The coordinator's side of one worker process: synchronous request/reply with timeouts."""

    def __init__(self, conn: Connection, process: Any) -> None:
        self.conn = conn
        self.process = process

    def call(self, name: str, *args: Any, timeout: float = 30.0) -> Any:
        self.conn.send(Command(name, args))
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.05):
            if not self.process.is_alive():
                raise RuntimeError(f"client worker {self.process.pid} died (exit code {self.process.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"client worker {self.process.pid}: no reply to {name!r} in {timeout}s")
        reply = self.conn.recv()
        if isinstance(reply, BaseException):
            raise RuntimeError(f"client worker {self.process.pid} failed on {name!r}: {reply}")
        return reply
