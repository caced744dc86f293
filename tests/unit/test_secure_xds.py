"""Authenticated xDS on one TLS port with the CSR service, over real gRPC, real TLS and real certificates.

Pilot is composed with Citadel as `meshctl up` does it (`MeshSecurity`): the CSR service answers
on the same port as ADS; ADS takes a proxy's identity from its client certificate and refuses a
Node that claims another namespace or another service account's WorkloadEntry, or a client with
no certificate; the plaintext port stays unauthenticated.
"""

from __future__ import annotations

import asyncio
import socket
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from citadel.authn import Credentials
from citadel.client import CSRClient
from citadel.csr import build_csr
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, cert_pem, generate_key, private_key_pem
from meshctl.cli import cli
from meshctl.localmesh import free_port
from meshctl.security import MeshSecurity, peer_identity_for, workload_accounts
from pilot.app import Pilot
from pilot.model.proxy import META_NAMESPACE, META_SERVICE_ACCOUNT, META_WORKLOAD
from pilot.settings import PilotSettings
from pilot.testing.ads_client import AdsClient
from pilot.xds.peers import PeerIdentity, PeerUnauthenticatedError
from pilot.xds.typeurls import CLUSTER

MESH = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cart, namespace: shop}
spec:
  hosts: [cart.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: cart}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: cart, namespace: shop}
spec: {address: 127.0.0.51, labels: {app: cart}, serviceAccount: cart, ports: {http: 9080}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: frontend, namespace: shop}
spec: {address: 127.0.0.52, labels: {app: frontend}, serviceAccount: frontend}
"""


@dataclass
class Mesh:
    pilot: Pilot
    security: MeshSecurity
    state: Path

    @property
    def tls_target(self) -> str:
        return f"127.0.0.1:{self.pilot.xds_tls_port}"

    def roots(self) -> bytes:
        return (self.state / "root-cert.pem").read_bytes()

    async def certificate(self, namespace: str, name: str) -> tuple[bytes, bytes]:
        """(key, chain) PEM for WorkloadEntry namespace/name, obtained with its token over the shared port."""
        account = workload_accounts(self.pilot.pusher.mesh)[(namespace, name)]
        token = self.security.layout.token_file(namespace, name).read_text()
        key = generate_key(KeyAlgorithm.ECDSA_P256)
        uri = SpiffeId("cluster.local", namespace, account).uri
        async with CSRClient(self.tls_target, self.roots()) as client:
            chain = await client.create_certificate(build_csr(key, [x509.UniformResourceIdentifier(uri)]), 3600,
                                                    token=token)
        return private_key_pem(key), "".join(chain[:-1]).encode()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    config = tmp_path / "config"
    config.mkdir()
    (config / "mesh.yaml").write_text(MESH)
    settings = PilotSettings(ads_port=free_port(), xds_tls_port=0, debug_port=0, config_dir=config)
    pilot = Pilot(settings)
    security = MeshSecurity(tmp_path / "state", pilot.registry)
    pilot.secure = security.serving()
    await security.start()
    try:
        async with pilot:
            security.sync_tokens(workload_accounts(pilot.pusher.mesh))
            yield Mesh(pilot, security, tmp_path / "state")
    finally:
        await security.stop()


class TlsAdsClient(AdsClient):
    """The test ADS client over TLS to pilot's authenticated port, with or without a client certificate."""

    def __init__(self, target: str, node: object, roots: bytes, cert: tuple[bytes, bytes] | None) -> None:
        super().__init__(target, node)
        key, chain = cert if cert is not None else (None, None)
        self.credentials = grpc.ssl_channel_credentials(roots, key, chain)

    async def __aenter__(self) -> TlsAdsClient:
        self._channel = grpc.aio.secure_channel(self.target, self.credentials)
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
        self._call = stub.StreamAggregatedResources(self._requests())
        self._reader = asyncio.create_task(self._read())
        return self


def node(namespace: str, workload: str, service_account: str | None = None) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    fields: dict[str, str] = {META_NAMESPACE: namespace, META_WORKLOAD: workload}
    if service_account is not None:
        fields[META_SERVICE_ACCOUNT] = service_account
    meta.update(fields)
    return base_pb2.Node(id=f"sidecar~127.0.0.52~{workload}.{namespace}~{namespace}.svc.cluster.local",
                         cluster=f"{workload}.{namespace}", metadata=meta)


async def first_response(mesh: Mesh, n: base_pb2.Node, cert: tuple[bytes, bytes] | None) -> object:
    async with TlsAdsClient(mesh.tls_target, n, mesh.roots(), cert) as client:
        client.send(CLUSTER)
        return await client.recv(timeout=10)


def errors(mesh: Mesh, reason: str) -> float:
    return mesh.pilot.registry.get_sample_value("pilot_xds_stream_errors_total", {"reason": reason}) or 0.0


async def test_csr_and_authenticated_ads_share_one_port(mesh: Mesh) -> None:
    cert = await mesh.certificate("shop", "frontend")  # the CSR service answered on the xDS port
    response = await first_response(mesh, node("shop", "frontend"), cert)
    assert response.type_url == CLUSTER  # type: ignore[attr-defined]
    (row,) = [r for r in mesh.pilot.status.syncz() if r["workload"] == "frontend"]
    assert row["namespace"] == "shop"


async def test_tokens_are_private_files_per_workload(mesh: Mesh) -> None:
    tokens = mesh.security.layout.tokens
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o700
    assert stat.S_IMODE((tokens / "shop").stat().st_mode) == 0o700
    files = sorted(p.name for p in (tokens / "shop").iterdir())
    assert files == ["cart.token", "frontend.token"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tokens / "shop").iterdir())
    assert stat.S_IMODE(mesh.state.stat().st_mode) == 0o700


async def test_a_node_claiming_another_service_accounts_workload_is_refused(mesh: Mesh) -> None:
    cert = await mesh.certificate("shop", "frontend")  # identity shop/frontend
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await first_response(mesh, node("shop", "cart"), cert)  # cart runs as service account cart
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "WorkloadEntry runs as service account 'cart'" in str(caught.value.details())
    assert "spiffe://cluster.local/ns/shop/sa/frontend" in str(caught.value.details())
    assert errors(mesh, "identity_mismatch") == 1
    assert not [r for r in mesh.pilot.status.syncz() if r["workload"] == "cart"]


async def test_a_node_claiming_another_namespace_or_account_is_refused(mesh: Mesh) -> None:
    cert = await mesh.certificate("shop", "frontend")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await first_response(mesh, node("billing", "frontend"), cert)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "claims namespace 'billing'" in str(caught.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await first_response(mesh, node("shop", "frontend", service_account="cart"), cert)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "claims service account 'cart'" in str(caught.value.details())
    assert errors(mesh, "identity_mismatch") == 2


async def test_a_client_without_a_certificate_is_refused_but_may_ask_for_one(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await first_response(mesh, node("shop", "frontend"), None)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "requires a client certificate" in str(caught.value.details())
    assert errors(mesh, "unauthenticated") == 1
    await mesh.certificate("shop", "cart")  # the same port, no client certificate: the CSR service answers


async def test_a_certificate_from_another_ca_fails_the_handshake(mesh: Mesh, tmp_path: Path) -> None:
    other = MeshSecurity(tmp_path / "other", CollectorRegistry())  # another mesh's CA, same trust domain
    key = generate_key(KeyAlgorithm.ECDSA_P256)
    identity = SpiffeId("cluster.local", "shop", "frontend")
    foreign = other.citadel.ca.sign_csr(build_csr(key, [x509.UniformResourceIdentifier(identity.uri)]), 3600,
                                        identity)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await first_response(mesh, node("shop", "frontend"), (private_key_pem(key), cert_pem(foreign.leaf).encode()))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not mesh.pilot.status.syncz()


async def test_the_plaintext_port_stays_unauthenticated(mesh: Mesh) -> None:
    async with AdsClient(mesh.pilot.ads_address, node("shop", "cart")) as client:
        client.send(CLUSTER)
        assert (await client.recv(timeout=10)).type_url == CLUSTER


def test_peer_identity_needs_one_spiffe_uri_of_the_trust_domain(tmp_path: Path) -> None:
    hook = peer_identity_for("cluster.local")
    with pytest.raises(PeerUnauthenticatedError, match="no client certificate"):
        hook(None)
    security = MeshSecurity(tmp_path / "state", CollectorRegistry())
    # Pilot's own serving certificate is from the mesh CA but names no workload.
    server = x509.load_pem_x509_certificate(security.citadel.serving.chain_pem)
    with pytest.raises(PeerUnauthenticatedError, match="0 URI SANs"):
        hook(server.public_bytes(Encoding.DER))
    key = generate_key(KeyAlgorithm.ECDSA_P256)
    cart = SpiffeId("cluster.local", "shop", "cart")
    leaf = security.citadel.ca.sign_csr(build_csr(key, [x509.UniformResourceIdentifier(cart.uri)]), 3600, cart).leaf
    assert hook(leaf.public_bytes(Encoding.DER)) == PeerIdentity("shop", "cart", cart.uri)
    with pytest.raises(PeerUnauthenticatedError, match=r"is not of trust domain 'example\.org'"):
        peer_identity_for("example.org")(leaf.public_bytes(Encoding.DER))


def test_tokens_follow_the_workload_entries(tmp_path: Path) -> None:
    security = MeshSecurity(tmp_path / "state", CollectorRegistry())
    layout = security.layout
    verifier = security.citadel.authenticators[0]
    assert security.sync_tokens({("shop", "cart"): "cart", ("shop", "web"): "default"}) == 2
    assert security.sync_tokens({("shop", "cart"): "cart", ("shop", "web"): "default"}) == 0  # nothing changed
    first = layout.token_file("shop", "cart").read_text()
    # The entry's service account changes: a new token naming the new one.
    assert security.sync_tokens({("shop", "cart"): "checkout", ("shop", "web"): "default"}) == 1
    token = layout.token_file("shop", "cart").read_text()
    assert token != first
    caller = asyncio.run(verifier.authenticate(Credentials(token, "test")))
    assert caller.identity == SpiffeId("cluster.local", "shop", "checkout")
    # The entry goes: so does its token.
    assert security.sync_tokens({("shop", "web"): "default"}) == 0
    assert not layout.token_file("shop", "cart").exists() and layout.token_file("shop", "web").exists()


def test_up_on_a_taken_authenticated_port_fails_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(MESH)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        result = CliRunner().invoke(cli, [
            "up", "--config-dir", str(tmp_path), "--ads", f"127.0.0.1:{free_port()}", "--xds-tls", taken,
            "--debug", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: cannot listen for authenticated xDS on {taken}: address already in use "
        "(another pilot running? pick a free one with --xds-tls)")
