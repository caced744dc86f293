"""`meshctl wait --for=applied -k` against a real API server: `meshctl up --kubeconfig` watches the
cluster, an xDS client is connected, and wait follows the kubectl-applied VirtualService's
`metadata.generation` into pilot and through the client's ACK (exit 0), its missing ACK (exit 4,
the client listed as pending) and its NACK (exit 1, with the client's message)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from click.testing import CliRunner, Result
from google.protobuf.json_format import MessageToDict

from meshctl.cli import cli
from meshctl.localmesh import free_port
from pilot.testing.ads_client import AdsClient, make_node
from pilot.xds.typeurls import LISTENER, ROUTE
from tests.k8s.cluster import KubeCluster
from tests.k8s.test_kube_source import Namespaces, kubectl, mesh_crds, namespaces

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
__all__ = ["mesh_crds", "namespaces"]  # fixtures used here


class Client:
    """A real xDS client that ACKs, holds or NACKs each response as the test says (`mode`)."""

    def __init__(self, xds: AdsClient) -> None:
        self.xds, self.mode = xds, "ack"
        self.routes: list[Any] = []
        self.task = asyncio.create_task(self._answer())

    async def _answer(self) -> None:
        acked: dict[str, str] = {}
        while True:
            resp = await self.xds.recv(3600)
            if resp.type_url == LISTENER and ROUTE not in self.xds.subscriptions:
                names = sorted({n for r in resp.resources for n in _find(MessageToDict(r), "routeConfigName")})
                self.xds.ack(resp)
                acked[LISTENER] = resp.version_info
                self.xds.send(ROUTE, names)
                continue
            if resp.type_url == ROUTE:
                self.routes = [MessageToDict(r) for r in resp.resources]
            if self.mode == "nack":
                self.xds.send(resp.type_url, self.xds.subscriptions.get(resp.type_url, ()), nonce=resp.nonce,
                              version=acked.get(resp.type_url, ""), error="test client refuses this route")
            elif self.mode == "ack":
                self.xds.ack(resp)
                acked[resp.type_url] = resp.version_info


def _find(value: Any, key: str) -> list[Any]:
    if isinstance(value, dict):
        return [v for k, v in value.items() if k == key] + [x for v in value.values() for x in _find(v, key)]
    if isinstance(value, list):
        return [x for v in value for x in _find(v, key)]
    return []


def route_file(path: Path, ns: str, header: str) -> Path:
    doc = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
           "metadata": {"name": "reviews", "namespace": ns},
           "spec": {"hosts": [f"reviews.{ns}.svc.cluster.local"],
                    "http": [{"match": [{"headers": {header: {"exact": "1"}}}],
                              "route": [{"destination": {"host": f"reviews.{ns}.svc.cluster.local"}}]},
                             {"route": [{"destination": {"host": f"reviews.{ns}.svc.cluster.local"}}]}]}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def meshctl_up(cluster: KubeCluster, tmp: Path) -> AsyncIterator[tuple[str, str]]:
    """`meshctl up --kubeconfig` in a subprocess, ready (its /ready answers 200); stopped at the end."""
    ads, debug, hooks = (f"127.0.0.1:{free_port()}" for _ in range(3))
    log = tmp.parent / "pilot.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshctl.cli", "up", "--plaintext-only", "--kubeconfig", str(cluster.kubeconfig),
            "--config-dir", str(tmp), "--ads", ads, "--debug", debug, "--webhooks", hooks, "--log-level", "warning",
            stdout=out, stderr=out)
    try:
        for _ in range(600):
            assert proc.returncode is None, log.read_text()
            with contextlib.suppress(aiohttp.ClientError):
                async with aiohttp.ClientSession() as session, session.get(f"http://{debug}/ready") as resp:
                    if resp.status == 200:
                        break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"pilot not ready in 60 s: {log.read_text()[-2000:]}")
        yield ads, debug
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_cmd(cluster: KubeCluster, debug: str, path: Path, timeout: str) -> Result:
    argv = ["wait", "--for=applied", "-k", "-f", str(path), "--kubeconfig", str(cluster.kubeconfig),
            "--debug", debug, "--timeout", timeout, "-o", "json"]
    return await asyncio.to_thread(CliRunner().invoke, cli, argv)


async def test_wait_follows_a_kubectl_applied_route_to_the_clients_ack(
        kube_cluster: KubeCluster, mesh_crds: None, namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.make("wait")
    host = f"reviews.{ns}.svc.cluster.local"
    entry = {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
             "metadata": {"name": "reviews", "namespace": ns},
             "spec": {"hosts": [host], "location": "MESH_INTERNAL", "resolution": "STATIC",
                      "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
                      "workloadSelector": {"labels": {"app": "reviews"}}}}
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=json.dumps(entry))
    (tmp_path / "config").mkdir()
    async with meshctl_up(kube_cluster, tmp_path / "config") as (ads, debug):
        node = make_node(f"sidecar~127.0.9.9~client.{ns}~{ns}.svc.cluster.local", namespace=ns,
                         labels={"app": "client"}, workload="client")
        async with AdsClient(ads, node) as xds:
            xds.send(LISTENER)
            client = Client(xds)
            try:
                # The client holds its routes before the edit: a proxy that has not subscribed to
                # them yet is not one the route waits for (it gets the edit with its first routes).
                for _ in range(600):
                    if client.routes:
                        break
                    await asyncio.sleep(0.05)
                assert client.routes, "the client never got its route configuration"
                files = tmp_path / "kubectl"
                files.mkdir()  # outside pilot's --config-dir: the cluster is its only source
                first = route_file(files / "vs.yaml", ns, "x-first")
                await kubectl(kube_cluster, "apply", "-f", str(first))
                applied = await wait_cmd(kube_cluster, debug, first, "90s")
                assert applied.exit_code == 0, applied.output
                [obj] = json.loads(applied.output)["objects"]
                assert obj["pilot"]["generation"] == 1 and obj["state"] == "applied"
                assert [p["state"] for p in obj["pilot"]["proxies"]] == ["ACKED"], obj
                assert "x-first" in json.dumps(client.routes)  # the client holds it as wait returns

                client.mode = "hold"  # receives the next change and never answers
                second = route_file(files / "vs.yaml", ns, "x-second")
                await kubectl(kube_cluster, "apply", "-f", str(second))
                held = await wait_cmd(kube_cluster, debug, second, "5s")
                assert held.exit_code == 4, held.output
                [obj] = json.loads(held.output)["objects"]
                assert obj["pilot"]["generation"] == 2 and obj["state"] == "pending", obj
                [proxy] = obj["pilot"]["proxies"]
                assert proxy["workload"] == "client" and proxy["state"] == "PENDING", proxy

                client.mode = "nack"
                third = route_file(files / "vs.yaml", ns, "x-third")
                await kubectl(kube_cluster, "apply", "-f", str(third))
                refused = await wait_cmd(kube_cluster, debug, third, "90s")
                assert refused.exit_code == 1, refused.output
                [obj] = json.loads(refused.output)["objects"]
                assert obj["pilot"]["generation"] == 3 and obj["state"] == "failed"
                assert "RDS rejected: test client refuses this route" in obj["reason"], obj
            finally:
                client.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await client.task
