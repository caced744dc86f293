"""Gateway `credentialName` on Kubernetes: pilot serves the Secret's certificate over ADS (SDS).

A real API server, `meshctl up --kubeconfig` (pilot, the CA with TokenReview, authenticated xDS)
and real gateway Envoys (`meshctl proxy run --gateway`, each identified by a projected-style
service-account token of its namespace, audience `istio-ca`). A `kubernetes.io/tls` Secret, a
Gateway naming it and a VirtualService answering directly are applied with kubectl. Checked: a
TLS client gets exactly the Secret's certificate; replacing the Secret rotates it without a
restart; a router of another namespace and a router whose service account may not list Secrets
do not get it (refusals logged, no key in the log); a deleted Secret leaves the listener in
place, and a gateway (re)starting afterwards gets no certificate: that server's handshakes fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509

from meshctl.devcerts import DevCa, Issued
from meshctl.localmesh import free_port
from tests.e2e.conftest import random_block
from tests.k8s.cluster import KubeCluster
from tests.k8s.pilots import get_json, install_crds, until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300), pytest.mark.asyncio(loop_scope="module")]

HOST = "shop.example.com"
MESH_NS = "istio-system"  # pilot's certificate names istiod.istio-system.svc, which gateways check
GUARD = 20.0  # seconds a single network step may take (a guard, not an assertion)


@dataclass
class Proc:
    """A child process with its log; stopped with SIGTERM (then SIGKILL) and reaped."""

    proc: asyncio.subprocess.Process
    log: Path

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


async def spawn(log: Path, *args: str) -> Proc:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshctl.cli", *args, stdin=asyncio.subprocess.DEVNULL, stdout=out,
            stderr=asyncio.subprocess.STDOUT, env={**os.environ})
    return Proc(proc, log)


@dataclass
class Edge:
    cluster: KubeCluster
    tmp: Path
    token: str
    gw_ns: str
    other_ns: str
    port: int
    label: str
    state: Path
    xds_tls: str
    debug: str
    pilot: Proc
    ca: DevCa
    first: Issued
    procs: list[Proc]

    def kubectl(self, *args: str, stdin: str | None = None) -> Any:
        return asyncio.to_thread(self.cluster.kubectl, *args, stdin=stdin)

    async def gateway(self, ns: str, account: str, address: str, name: str) -> Proc:
        """`meshctl proxy run --gateway` as `ns`/`account`, LIVE (its Envoy got its config)."""
        token = (await self.kubectl("-n", ns, "create", "token", account, "--audience", "istio-ca")).stdout.strip()
        token_file = self.tmp / f"{name}.token"
        token_file.write_text(token)
        proc = await spawn(self.tmp / f"{name}.log", "proxy", "run", "--gateway", "--workload", f"{ns}/{name}",
                           "--address", address, "--label", f"istio={self.label}", "--service-account", account,
                           "--pilot", self.xds_tls, "--debug", self.debug, "--state-dir", str(self.state),
                           "--token-file", str(token_file), "--ready-timeout", "90", "--log-level", "warning")
        self.procs.append(proc)

        async def live() -> bool:
            if proc.proc.returncode is not None:
                pytest.fail(f"gateway {ns}/{name} exited: {proc.text()[-3000:]}")
            return "Envoy LIVE" in proc.text()

        await until(f"gateway {ns}/{name} LIVE", live, 120)
        return proc


def tls_secret(ns: str, name: str, issued: Issued) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                       "metadata": {"name": name, "namespace": ns},
                       "stringData": {"tls.crt": issued.cert.read_text(), "tls.key": issued.key.read_text()}})


def config(ns: str, port: int, label: str) -> str:
    docs = [
        {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "edge", "namespace": ns},
         "spec": {"selector": {"istio": label}, "servers": [
             {"port": {"number": port, "name": "https", "protocol": "HTTPS"}, "hosts": [HOST],
              "tls": {"mode": "SIMPLE", "credentialName": "shop-cert"}}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
         "metadata": {"name": "shop", "namespace": ns},
         "spec": {"hosts": [HOST], "gateways": ["edge"],
                  "http": [{"directResponse": {"status": 200, "body": {"string": "shop"}}}]}},
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


def rbac(ns: str, account: str) -> str:
    """Istio's gateway Role: its service account may read the Secrets of its namespace."""
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "gw-secrets", "namespace": ns},
         "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "watch", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "gw-secrets", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "gw-secrets"},
         "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}]}]})


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def edge(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edge]:
    cluster, token = kube_cluster, os.urandom(3).hex()
    tmp = tmp_path_factory.mktemp("gateway-secrets")
    gw_ns, other_ns = f"gw-{token}", f"other-{token}"
    await asyncio.to_thread(install_crds, cluster)
    created_mesh_ns = cluster.kubectl("get", "namespace", MESH_NS, check=False).returncode != 0
    namespaces = ([MESH_NS] if created_mesh_ns else []) + [gw_ns, other_ns]
    procs: list[Proc] = []
    try:
        for ns in namespaces:
            cluster.kubectl("create", "namespace", ns)
        for ns in (gw_ns, other_ns):
            cluster.kubectl("-n", ns, "create", "serviceaccount", "ingress")
            cluster.kubectl("apply", "-f", "-", stdin=rbac(ns, "ingress"))
        cluster.kubectl("-n", gw_ns, "create", "serviceaccount", "norbac")  # no Role: may not read Secrets
        ca = DevCa.create("k8s credentialName CA")
        ca.write_ca(tmp / "ca.pem")
        first = ca.issue(tmp, "shop-1", [HOST])
        cluster.kubectl("apply", "-f", "-", stdin=tls_secret(gw_ns, "shop-cert", first))
        port, label = free_port(), f"gw-{token}"
        cluster.kubectl("apply", "-f", "-", stdin=config(gw_ns, port, label))

        state, xds_tls, debug = tmp / "state", f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        pilot = await spawn(tmp / "pilot.log", "up", "--state-dir", str(state), "--xds-tls", xds_tls,
                            "--webhooks", f"127.0.0.1:{free_port()}", "--kubeconfig", str(cluster.kubeconfig),
                            "--mesh-namespace", MESH_NS, "--ads", f"127.0.0.1:{free_port()}", "--debug", debug,
                            "--log-level", "info")
        procs.append(pilot)

        async def serving() -> bool:
            if pilot.proc.returncode is not None:
                pytest.fail(f"meshctl up exited: {pilot.text()[-3000:]}")
            return await get_json(f"http://{debug}/debug/syncz") is not None

        await until("pilot serving", serving, 90)
        yield Edge(cluster, tmp, token, gw_ns, other_ns, port, label, state, xds_tls, debug, pilot, ca, first, procs)
    finally:
        for proc in reversed(procs):
            await proc.stop()
        for ns in reversed(namespaces):
            cluster.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=false", check=False)


def client_context(e: Edge) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(e.tmp / "ca.pem"))


async def served(address: str, port: int, ctx: ssl.SSLContext) -> tuple[x509.Certificate, str]:
    """One new TLS connection: the certificate the gateway presented and the response body."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address, port, ssl=ctx, server_hostname=HOST),
                                            GUARD)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        response = (await asyncio.wait_for(reader.read(), GUARD)).decode()
    finally:
        writer.close()
    return x509.load_der_x509_certificate(der), response.partition("\r\n\r\n")[2]


async def handshake_fails(address: str, port: int, ctx: ssl.SSLContext) -> bool:
    """The TCP connection is accepted (the listener is there) but no TLS session comes up."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), GUARD)
    except OSError:
        return False  # no listener at all
    writer.close()
    try:
        await served(address, port, ctx)
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return True
    return False


def serial_of(issued: Issued) -> int:
    return x509.load_pem_x509_certificate(issued.cert.read_bytes()).serial_number


async def listeners(address: str) -> list[str]:
    dump = await get_json(f"http://{address}:15000/config_dump?resource=dynamic_listeners")
    return [c["active_state"]["listener"]["name"] for c in (dump or {}).get("configs", []) if "active_state" in c]


async def test_gateway_serves_rotates_and_refuses_the_secret(edge: Edge) -> None:
    e, ctx = edge, client_context(edge)
    block = random_block()
    gateway, other, norbac = f"{block}.10", f"{block}.11", f"{block}.12"

    # The gateway of the Secret's namespace serves exactly the Secret's certificate.
    first_gateway = await e.gateway(e.gw_ns, "ingress", gateway, "ingress")

    async def serves(issued: Issued) -> bool:
        try:
            cert, body = await served(gateway, e.port, ctx)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
            return False
        return cert.serial_number == serial_of(issued) and body == "shop"

    await until("the Secret's certificate served", lambda: serves(e.first), 60)

    # Replacing the Secret rotates the certificate on the running gateway: no restart, no Gateway change.
    second = e.ca.issue(e.tmp, "shop-2", [HOST])
    await e.kubectl("apply", "-f", "-", stdin=tls_secret(e.gw_ns, "shop-cert", second))
    await until("the rotated certificate served", lambda: serves(second), 60)

    # A router of another namespace selected by the same Gateway, and a router of the Secret's
    # namespace whose service account may not list Secrets: neither gets the certificate.
    await e.gateway(e.other_ns, "ingress", other, "ingress")
    await e.gateway(e.gw_ns, "norbac", norbac, "norbac")
    for address in (other, norbac):
        await until(f"the listener on {address}", lambda a=address: _has_listener(a, e.port), 60)  # type: ignore[misc]
        assert await handshake_fails(address, e.port, ctx), address
    log = e.pilot.text()
    assert f"asked for kubernetes://shop-cert: no such Secret in namespace {e.other_ns}" in log
    assert f"SDS: refused secret kubernetes://shop-cert to router~{norbac}~norbac.{e.gw_ns}" in log
    assert f"system:serviceaccount:{e.gw_ns}:norbac may not list secrets in namespace {e.gw_ns}" in log
    for issued in (e.first, second):
        key = "".join(issued.key.read_text().splitlines()[1:-1])
        assert key[:40] not in log  # pilot never logs a key
    assert await serves(second)  # the entitled gateway is unaffected

    # Deleting the Secret: Istio's behaviour over SotW. The listener stays; a gateway that
    # (re)connects gets no certificate for the name, so that server's handshakes fail.
    await e.kubectl("-n", e.gw_ns, "delete", "secret", "shop-cert")

    async def reported() -> bool:
        configz = await get_json(f"http://{e.debug}/debug/configz")
        return f"no secret shop-cert in namespace {e.gw_ns}" in json.dumps(configz)

    await until("the missing Secret reported", reported, 60)
    await first_gateway.stop()
    await e.gateway(e.gw_ns, "ingress", gateway, "ingress-again")
    assert f"{gateway}_{e.port}" in await listeners(gateway)
    assert await handshake_fails(gateway, e.port, ctx)

    # The Secret comes back: the running gateway serves it without a restart.
    await e.kubectl("apply", "-f", "-", stdin=tls_secret(e.gw_ns, "shop-cert", e.first))
    await until("the re-created Secret served", lambda: serves(e.first), 60)


async def _has_listener(address: str, port: int) -> bool:
    return f"{address}_{port}" in await listeners(address)
