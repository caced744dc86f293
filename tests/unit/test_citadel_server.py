"""The CSR service over real gRPC and real TLS on 127.0.0.1, with real X.509 and Istio's wire messages."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from citadel.app import Citadel
from citadel.client import CSRClient
from citadel.csr import build_csr
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, certs_pem, generate_key
from citadel.proto import istio_ca_pb2 as pb
from citadel.server import METHOD
from citadel.settings import CitadelSettings
from citadel.testing import Clock, write_cacerts
from tests.unit.test_citadel_ca import verify_with_cryptography, verify_with_openssl

TD = "cluster.local"
CART = SpiffeId(TD, "shop", "cart")


def settings(tmp: Path, **kw: object) -> CitadelSettings:
    base: dict[str, object] = {"ca_dir": tmp / "ca", "grpc_port": 0, "workload_cert_ttl": timedelta(hours=24),
                               "max_workload_cert_ttl": timedelta(hours=48)}
    return CitadelSettings(**(base | kw))  # type: ignore[arg-type]


@pytest.fixture
async def citadel(tmp_path: Path) -> AsyncIterator[Citadel]:
    async with Citadel(settings(tmp_path), CollectorRegistry()) as running:
        yield running


def client_for(c: Citadel) -> CSRClient:
    return CSRClient(f"127.0.0.1:{c.port}", certs_pem(c.ca.trust_bundle()).encode())


def parse(chain: list[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in chain]


def metric(c: Citadel, name: str, **labels: str) -> float:
    return c.registry.get_sample_value(name, labels) or 0.0


def csr_for(sans: list[x509.GeneralName], algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256) -> str:
    return build_csr(generate_key(algorithm), sans)


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.ECDSA_P256, KeyAlgorithm.RSA_2048])
async def test_issues_a_workload_certificate_over_tls(citadel: Citadel, tmp_path: Path,
                                                      algorithm: KeyAlgorithm) -> None:
    token = citadel.issue_workload_token(tmp_path / "token", "shop", "cart")
    async with client_for(citadel) as client:
        chain = parse(await client.create_certificate(
            csr_for([x509.UniformResourceIdentifier(CART.uri)], algorithm), 3600, token=token))
    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [CART.uri] and len(list(san)) == 1
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == timedelta(hours=1) + citadel.ca.policy.backdate
    assert chain[-1] == citadel.ca.trust_bundle()[0]
    verify_with_cryptography(chain, list(citadel.ca.trust_bundle()), leaf.not_valid_before_utc + timedelta(minutes=5))
    verify_with_openssl(tmp_path, chain, list(citadel.ca.trust_bundle()))
    assert metric(citadel, "citadel_server_success_cert_issuance_count_total") == 1
    assert metric(citadel, "citadel_server_csr_count_total") == 1


async def test_default_and_capped_ttl_over_the_wire(citadel: Citadel, tmp_path: Path) -> None:
    token = citadel.issue_workload_token(tmp_path / "token", "shop", "cart")
    async with client_for(citadel) as client:
        default = parse(await client.create_certificate(csr_for([]), 0, token=token))[0]
        capped = parse(await client.create_certificate(csr_for([]), 30 * 24 * 3600, token=token))[0]
    backdate = citadel.ca.policy.backdate
    assert default.not_valid_after_utc - default.not_valid_before_utc == timedelta(hours=24) + backdate
    assert capped.not_valid_after_utc - capped.not_valid_before_utc == timedelta(hours=48) + backdate


async def test_csr_for_another_identity_is_permission_denied(citadel: Citadel, tmp_path: Path) -> None:
    token = citadel.issue_workload_token(tmp_path / "token", "shop", "cart")
    other: list[x509.GeneralName] = [x509.UniformResourceIdentifier(SpiffeId(TD, "shop", "payments").uri)]
    two: list[x509.GeneralName] = [x509.UniformResourceIdentifier(CART.uri),
                                   x509.UniformResourceIdentifier(SpiffeId(TD, "a", "b").uri)]
    dns: list[x509.GeneralName] = [x509.DNSName("payments.shop.svc.cluster.local")]
    async with client_for(citadel) as client:
        for sans in (other, two, dns):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.create_certificate(csr_for(sans), 0, token=token)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "not exactly the caller's identity" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.create_certificate("not a csr", 0, token=token)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert metric(citadel, "citadel_server_csr_sign_err_count_total", error="IDENTITY_MISMATCH") == 3
    assert metric(citadel, "citadel_server_csr_parsing_err_count_total") == 1
    assert metric(citadel, "citadel_server_success_cert_issuance_count_total") == 0
    assert metric(citadel, "citadel_server_csr_count_total") == 4


async def test_missing_forged_and_expired_credentials_are_unauthenticated(
        citadel: Citadel, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from citadel.tokens import TokenIssuer

    clock = Clock()
    forged = TokenIssuer(ed25519.Ed25519PrivateKey.generate()).issue("shop", "cart", timedelta(hours=1), clock.now)
    expired = citadel.token_issuer.issue("shop", "cart", timedelta(hours=1), clock.now - timedelta(hours=2))
    caplog.set_level("WARNING", logger="citadel.service")
    async with client_for(citadel) as client:
        for token in (None, forged, expired, "garbage"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.create_certificate(csr_for([]), 0, token=token)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert metric(citadel, "citadel_server_authentication_failure_count_total") == 4
    assert metric(citadel, "citadel_server_success_cert_issuance_count_total") == 0
    assert "no bearer token" in caplog.text and "not a known signing key" in caplog.text
    assert "token expired" in caplog.text
    assert forged not in caplog.text and expired not in caplog.text  # credentials never logged


async def test_wire_compatible_raw_call_with_metadata(citadel: Citadel, tmp_path: Path) -> None:
    """A client built only from Istio's method path and messages (as an Istio agent would call)."""
    token = citadel.issue_workload_token(tmp_path / "token", "shop", "cart")
    creds = grpc.ssl_channel_credentials(root_certificates=certs_pem(citadel.ca.trust_bundle()).encode())
    async with grpc.aio.secure_channel(f"127.0.0.1:{citadel.port}", creds) as channel:
        call = channel.unary_unary(METHOD, request_serializer=pb.IstioCertificateRequest.SerializeToString,
                                   response_deserializer=pb.IstioCertificateResponse.FromString)
        request = pb.IstioCertificateRequest(csr=csr_for([]), validity_duration=600)
        request.metadata.update({"WorkloadName": "cart-1", "ClusterID": "Kubernetes"})
        response = await call(request, metadata=(("authorization", f"Bearer {token}"),))
    assert len(response.cert_chain) == 2 and all(p.startswith("-----BEGIN CERTIFICATE") for p in response.cert_chain)
    assert not response.HasField("root_cert")


async def test_server_certificate_is_issued_by_the_mesh_ca_for_its_address(citadel: Citadel) -> None:
    """TLS to 127.0.0.1 without a name override succeeds only if the serving cert has the IP SAN."""
    serving = x509.load_pem_x509_certificates(citadel.serving.chain_pem)[0]
    san = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert serving.issuer == citadel.ca.bundle.signing_cert.subject
    untrusted = generate_key(KeyAlgorithm.ECDSA_P256)
    from citadel.ca import create_root
    foreign = create_root(untrusted, TD, timedelta(days=1), serving.not_valid_before_utc)
    async with CSRClient(f"127.0.0.1:{citadel.port}", certs_pem([foreign]).encode()) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.create_certificate(csr_for([]), 0, token="x", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # TLS handshake refused: not our mesh root


async def test_rotation_while_serving(citadel: Citadel, tmp_path: Path) -> None:
    token = citadel.issue_workload_token(tmp_path / "token", "shop", "cart")
    old_root = citadel.ca.trust_bundle()[0]
    citadel.ca.introduce_root()
    citadel.ca.activate_root()
    new_root = citadel.ca.bundle.signing_cert
    # a client trusting only the new root reaches the server (serving cert re-issued, no restart)
    async with CSRClient(f"127.0.0.1:{citadel.port}", certs_pem([new_root]).encode()) as client:
        chain = parse(await client.create_certificate(csr_for([]), 0, token=token))
    assert chain[0].issuer == new_root.subject
    assert chain[1:] == [new_root, old_root]  # issuing root, then the rest of the bundle
    verify_with_openssl(tmp_path, chain[:2], [new_root])


async def test_plugged_in_ca_over_grpc(tmp_path: Path) -> None:
    plugged = write_cacerts(tmp_path / "cacerts")
    registry = CollectorRegistry()
    async with Citadel(settings(tmp_path, cacerts_dir=tmp_path / "cacerts"), registry) as citadel:
        token = citadel.issue_workload_token(tmp_path / "token", "shop", "cart")
        async with CSRClient(f"127.0.0.1:{citadel.port}", certs_pem([plugged.root]).encode()) as client:
            chain = parse(await client.create_certificate(csr_for([]), 0, token=token))
    assert chain[1:] == [plugged.ca_cert, plugged.root]
    verify_with_openssl(tmp_path, chain, [plugged.root])
    expiry = registry.get_sample_value("citadel_server_root_cert_expiry_timestamp")
    assert expiry == plugged.root.not_valid_after_utc.timestamp()
    assert registry.get_sample_value("citadel_server_cert_chain_expiry_timestamp") == \
        plugged.ca_cert.not_valid_after_utc.timestamp()
    assert (registry.get_sample_value("citadel_server_root_cert_expiry_seconds") or 0) > 0


def test_background_checks_reload_and_count_failures(tmp_path: Path) -> None:
    write_cacerts(tmp_path / "cacerts")
    citadel = Citadel(settings(tmp_path, cacerts_dir=tmp_path / "cacerts"), CollectorRegistry())
    replacement = write_cacerts(tmp_path / "cacerts")
    citadel.check_once()
    assert citadel.ca.trust_bundle() == (replacement.root,)
    (tmp_path / "cacerts" / "ca-cert.pem").write_text("torn write")
    citadel.check_once()
    assert citadel.registry.get_sample_value("citadel_task_failures_total", {"task": "reload"}) == 1
    assert citadel.ca.trust_bundle() == (replacement.root,)  # the last good CA keeps signing
    assert stat.S_IMODE((tmp_path / "ca" / "token-signing-key.pem").stat().st_mode) == 0o600


def test_background_checks_rotate_a_self_signed_root(tmp_path: Path) -> None:
    clock = Clock()
    citadel = Citadel(settings(tmp_path, root_ttl=timedelta(days=10), root_propagation=timedelta(hours=1)),
                      CollectorRegistry(), clock=clock)
    first = citadel.ca.bundle.signing_cert
    clock.advance(timedelta(days=8, hours=1))
    citadel.check_once()
    assert len(citadel.ca.trust_bundle()) == 2 and citadel.ca.bundle.signing_cert == first
    clock.advance(timedelta(hours=1))
    citadel.check_once()
    assert citadel.ca.bundle.signing_cert != first
    expiry = citadel.registry.get_sample_value("citadel_server_root_cert_expiry_timestamp")
    assert expiry == citadel.ca.bundle.signing_cert.not_valid_after_utc.timestamp()


async def test_expired_ca_answers_internal_and_counts(tmp_path: Path) -> None:
    clock = Clock()
    citadel = Citadel(settings(tmp_path, root_ttl=timedelta(hours=1), workload_cert_ttl=timedelta(minutes=5)),
                      CollectorRegistry(), clock=clock)
    async with citadel:
        token = citadel.issue_workload_token(tmp_path / "token", "shop", "cart", ttl=timedelta(days=1))
        clock.advance(timedelta(hours=2))  # the root (and so the CA) has expired
        async with client_for(citadel) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.create_certificate(csr_for([]), 0, token=token)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert metric(citadel, "citadel_server_csr_sign_err_count_total", error="CERT_GEN_ERROR") == 1
