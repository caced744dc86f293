"""Ingress gateway with real Envoy: routing by host and path over HTTP, HTTPS with file certificates.

One mesh for the module: a gateway (router) Envoy in istio-system and two backends (api, web)
in default, each behind its own sidecar, all on a random 127.a.b.0/24 block.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from meshctl.devcerts import DevCa
from meshctl.localmesh import LocalMesh, free_port, http_session
from pilot.settings import PilotSettings
from tests.e2e.conftest import random_block, service_entry, workload_entry

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

HTTP_PORT, REDIRECT_PORT, HTTPS_PORT, MTLS_PORT = 18080, 18081, 18443, 19443
HASH_PORT, SPKI_PORT, CRL_PORT = 19444, 19445, 19446

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: {http}, name: http, protocol: HTTP}}
    hosts: ["*/shop.example.com", "default/api.example.com"]
  - port: {{number: {redirect}, name: http-redirect, protocol: HTTP}}
    hosts: ["*/shop.example.com"]
    tls: {{httpsRedirect: true}}
  - port: {{number: {https}, name: https, protocol: HTTPS}}
    hosts: ["*/shop.example.com"]
    tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}}}
  - port: {{number: {mtls}, name: https-mtls, protocol: HTTPS}}
    hosts: ["*/shop.example.com"]
    tls: {{mode: MUTUAL, serverCertificate: {cert}, privateKey: {key}, caCertificates: {ca}}}
  - port: {{number: {hash_port}, name: https-hash, protocol: HTTPS}}
    hosts: ["*/shop.example.com"]
    tls: {{mode: MUTUAL, serverCertificate: {cert}, privateKey: {key}, caCertificates: {ca},
           verifyCertificateHash: ["{client_hash}"]}}
  - port: {{number: {spki_port}, name: https-spki, protocol: HTTPS}}
    hosts: ["*/shop.example.com"]
    tls: {{mode: MUTUAL, serverCertificate: {cert}, privateKey: {key}, caCertificates: {ca},
           verifyCertificateSpki: ["{other_spki}"]}}
  - port: {{number: {crl_port}, name: https-crl, protocol: HTTPS}}
    hosts: ["*/shop.example.com"]
    tls: {{mode: MUTUAL, serverCertificate: {cert}, privateKey: {key}, caCertificates: {ca}, caCrl: {crl}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: ingress, namespace: istio-system}}
spec: {{address: {block}.10, labels: {{istio: ingressgateway}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop, namespace: default}}
spec:
  hosts: [shop.example.com, api.example.com]
  gateways: [istio-system/ingress]
  http:
  - match: [{{uri: {{prefix: /api}}}}, {{authority: {{exact: api.example.com}}}}]
    route: [{{destination: {{host: api}}}}]
  - route: [{{destination: {{host: web}}}}]
"""

def _fingerprint(cert_file: Path) -> str:
    """Hex SHA-256 of a certificate (Istio's verifyCertificateHash)."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()


def _spki_pin(cert_file: Path) -> str:
    """Base64 SHA-256 of a certificate's public key (Istio's verifyCertificateSpki)."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@dataclass
class Ingress:
    mesh: LocalMesh
    address: str
    ca_file: Path

    def url(self, port: int, path: str = "/", scheme: str = "http") -> str:
        return f"{scheme}://{self.address}:{port}{path}"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def ingress(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Ingress]:
    config_dir = tmp_path_factory.mktemp("gateway-config")
    certs = tmp_path_factory.mktemp("gateway-certs")
    ca = DevCa.create("e2e gateway CA")
    issued = ca.issue(certs, "shop", ["shop.example.com"])
    client = ca.issue(certs, "client", ["client.example.com"], client=True)
    other = ca.issue(certs, "other", ["other.example.com"], client=True)
    ca_file = ca.write_ca(certs / "ca.pem")
    block = random_block()
    ports = {"http": HTTP_PORT, "redirect": REDIRECT_PORT, "https": HTTPS_PORT, "mtls": MTLS_PORT,
             "hash_port": HASH_PORT, "spki_port": SPKI_PORT, "crl_port": CRL_PORT}
    text = CONFIG.format(**ports, cert=issued.cert, key=issued.key, ca=ca_file, block=block,
                         client_hash=_fingerprint(client.cert), other_spki=_spki_pin(other.cert),
                         crl=ca.write_crl(certs / "crl.pem", revoked=[other.cert]))
    for i, name in enumerate(("api", "web")):
        text += service_entry(name, 8000) + workload_entry(name, f"{block}.{11 + i}", port=free_port())
    (config_dir / "mesh.yaml").write_text(text)
    settings = PilotSettings(ads_port=free_port(), debug_port=0, config_dir=config_dir, debounce_ms=50)
    async with LocalMesh(settings) as mesh:
        for name in ("api", "web"):
            await mesh.start_app("default", name)
        await asyncio.gather(
            mesh.start_gateway("istio-system", "ingress"),
            mesh.start_sidecar("default", "api"),
            mesh.start_sidecar("default", "web"),
        )
        await mesh.wait_synced()
        yield Ingress(mesh, f"{block}.10", ca_file)


async def answer(session: aiohttp.ClientSession, url: str, host: str) -> tuple[int, str]:
    async with session.get(url, headers={"Host": host}, allow_redirects=False) as resp:
        body = await resp.json(content_type=None) if resp.status == 200 else {}
        return resp.status, body.get("name", "") if isinstance(body, dict) else ""


async def test_gateway_routes_by_host_and_path_to_two_backends(ingress: Ingress) -> None:
    async with http_session() as session:
        assert await answer(session, ingress.url(HTTP_PORT, "/api/items"), "shop.example.com") == (200, "api")
        assert await answer(session, ingress.url(HTTP_PORT, "/"), "shop.example.com") == (200, "web")
        assert await answer(session, ingress.url(HTTP_PORT, "/"), f"shop.example.com:{HTTP_PORT}") == (200, "web")
        assert await answer(session, ingress.url(HTTP_PORT, "/"), "api.example.com") == (200, "api")
        # A host no server exposes has no virtual host: Envoy answers 404.
        assert (await answer(session, ingress.url(HTTP_PORT, "/"), "other.example.com"))[0] == 404
        # httpsRedirect: a plain-HTTP request is sent to https.
        async with session.get(
            ingress.url(REDIRECT_PORT, "/x"), headers={"Host": "shop.example.com"}, allow_redirects=False
        ) as resp:
            assert resp.status == 301
            assert resp.headers["location"].startswith("https://shop.example.com")


async def test_gateway_answers_as_istio_envoy_and_sends_the_attempt_count(ingress: Ingress) -> None:
    """Istio's default proxy headers on a gateway: ``server: istio-envoy`` on the answer, and the
    backend sees ``x-envoy-attempt-count``."""
    async with http_session() as session, session.get(
        ingress.url(HTTP_PORT, "/"), headers={"Host": "shop.example.com"}
    ) as resp:
        assert resp.status == 200 and resp.headers["server"] == "istio-envoy"
        body = await resp.json(content_type=None)
    assert body["name"] == "web" and body["headers"]["x-envoy-attempt-count"] == "1"


async def test_https_server_presents_file_certificate_by_sni(ingress: Ingress) -> None:
    trusted = ssl.create_default_context(cafile=str(ingress.ca_file))
    url = ingress.url(HTTPS_PORT, "/api/secure", scheme="https")
    async with http_session() as session:
        async with session.get(
            url, headers={"Host": "shop.example.com"}, ssl=trusted, server_hostname="shop.example.com"
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["name"] == "api"
        # Without the CA the certificate does not verify: it really is the file's self-signed chain.
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with session.get(url, ssl=ssl.create_default_context(), server_hostname="shop.example.com"):
                pass
        # An SNI name no server lists matches no filter chain: the handshake fails.
        with pytest.raises(aiohttp.ClientError):
            async with session.get(url, ssl=trusted, server_hostname="other.example.com"):
                pass


async def test_mutual_tls_server_requires_a_client_certificate_from_its_ca(ingress: Ingress) -> None:
    url = ingress.url(MTLS_PORT, "/", scheme="https")
    with_cert = ssl.create_default_context(cafile=str(ingress.ca_file))
    certs = ingress.ca_file.parent
    with_cert.load_cert_chain(certs / "client.pem", certs / "client.key")
    async with http_session() as session:
        host = {"Host": "shop.example.com"}
        async with session.get(url, headers=host, ssl=with_cert, server_hostname="shop.example.com") as resp:
            assert resp.status == 200
            assert (await resp.json())["name"] == "web"
        without = ssl.create_default_context(cafile=str(ingress.ca_file))
        with pytest.raises(aiohttp.ClientError):
            async with session.get(url, headers=host, ssl=without, server_hostname="shop.example.com") as resp:
                await resp.read()


@pytest.mark.parametrize(("port", "accepted"), [(HASH_PORT, "client"), (SPKI_PORT, "other"), (CRL_PORT, "client")],
                         ids=["certificate-hash", "spki", "crl"])
async def test_mutual_tls_pins_and_revocation_decide_which_client_certificates_pass(
    ingress: Ingress, port: int, accepted: str,
) -> None:
    """Both clients hold certificates from the server's CA; the pin (or the CRL, which revokes
    `other`) lets exactly one of them in."""
    certs = ingress.ca_file.parent
    results = {}
    async with http_session() as session:
        for name in ("client", "other"):
            context = ssl.create_default_context(cafile=str(ingress.ca_file))
            context.load_cert_chain(certs / f"{name}.pem", certs / f"{name}.key")
            try:
                async with session.get(ingress.url(port, "/", scheme="https"), headers={"Host": "shop.example.com"},
                                       ssl=context, server_hostname="shop.example.com") as resp:
                    results[name] = resp.status
            except aiohttp.ClientError:
                results[name] = 0  # the handshake was refused
    assert results == {name: 200 if name == accepted else 0 for name in ("client", "other")}
