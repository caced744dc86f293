"""Client workers whose simulated Envoys pose as Pods' sidecars, with captured traffic.

The same worker and client as `ads_load` (`benchmarks.worker`, `benchmarks.client`); only the
Node differs: Istio's sidecar id naming the Pod and its IP (pilot matches it to the Pod, whose
labels then decide the class) and `INTERCEPTION_MODE: REDIRECT`, so pilot serves the
captured-traffic listener model (per-port listeners and route configurations named by port) a
sidecar behind iptables gets. Runs as a spawned process, driven over a pipe like `worker.main`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import traceback
from multiprocessing.connection import Connection
from typing import Any

import grpc

from benchmarks.client import SimClient
from benchmarks.worker import CHANNEL_OPTIONS, STREAMS_PER_CHANNEL, Command, NodeSpec, Worker, _dispatch
from pilot.model.proxy import INTERCEPTION_REDIRECT, META_INTERCEPTION_MODE
from pilot.testing.ads_client import make_node


def captured_node(spec: NodeSpec) -> Any:
    """The Node an injected sidecar of the Pod in `spec` sends (namespace, labels, REDIRECT)."""
    node = make_node(spec.node_id, namespace=spec.namespace, labels=dict(spec.labels), workload=spec.workload)
    node.metadata.update({META_INTERCEPTION_MODE: INTERCEPTION_REDIRECT})
    return node


class CapturedWorker(Worker):
    """`Worker` whose clients send `captured_node`s."""

    def connect(self, target: str, delta: bool, nodes: list[NodeSpec], record_first: bool) -> int:
        count = max(1, math.ceil(len(nodes) / STREAMS_PER_CHANNEL))
        self.channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(count)]
        for i, spec in enumerate(nodes):
            client = SimClient(captured_node(spec), delta, self.names, record=record_first and i == 0)
            self.clients.append(client)
            self.tasks.append(asyncio.create_task(client.run(self.channels[i % count])))
        return len(self.clients)


async def serve(conn: Connection) -> None:
    """`benchmarks.worker.serve` with a `CapturedWorker`: one command at a time, replies on the pipe."""
    worker = CapturedWorker()
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
            conn.send(reply)
            await asyncio.sleep(0)
    finally:
        await worker.close()


def main(conn: Connection) -> None:
    """Process entry point (multiprocessing, spawn start method)."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(conn))
    conn.close()
