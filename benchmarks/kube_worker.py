"""Client workers whose simulated Envoys pose as Pods' sidecars, with captured traffic.

The same worker and client as `ads_load` (`benchmarks.worker`, `benchmarks.client`); only the
Node differs (`captured_node`, which the Go simulated Envoys of `benchmarks.goworker` send too):
Istio's sidecar id naming the Pod and its IP (pilot matches it to the Pod, whose labels then
decide the class) and `INTERCEPTION_MODE: REDIRECT`, so pilot serves the captured-traffic
listener model (per-port listeners and route configurations named by port) a sidecar behind
iptables gets. Runs as a spawned process, driven over a pipe like `worker.main`.
"""

from __future__ import annotations

import asyncio
import contextlib
from multiprocessing.connection import Connection
from typing import Any

from benchmarks.worker import NodeSpec, Worker, serve
from pilot.model.proxy import INTERCEPTION_REDIRECT, META_INTERCEPTION_MODE
from pilot.testing.ads_client import make_node


def captured_node(spec: NodeSpec) -> Any:
    """The Node an injected sidecar of the Pod in `spec` sends (namespace, labels, REDIRECT)."""
    node = make_node(spec.node_id, namespace=spec.namespace, labels=dict(spec.labels), workload=spec.workload)
    node.metadata.update({META_INTERCEPTION_MODE: INTERCEPTION_REDIRECT})
    return node


class CapturedWorker(Worker):
    """`Worker` whose clients send `captured_node`s."""

    @staticmethod
    def node(spec: NodeSpec) -> Any:
        return captured_node(spec)


def main(conn: Connection) -> None:
    """Process entry point (multiprocessing, spawn start method): `benchmarks.worker.serve` with a
    `CapturedWorker`."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(conn, CapturedWorker()))
    conn.close()
