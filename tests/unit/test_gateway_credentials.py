"""Gateway credentialName: the local secret store, the agent's SDS names, and pilot's SDS references."""

from __future__ import annotations

import asyncio
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from citadel.agent import AgentSettings, WorkloadAgent
from citadel.agent import credentials as store
from citadel.agent.testing import SDSStream, names_of
from meshctl.devcerts import DevCa
from pilot import credentials as pilot_credentials
from pilot.api.base import ApiObject
from pilot.api.errors import InvalidObjectError
from pilot.model.build import build_mesh
from pilot.model.gateway import GatewayServer, ServerTls
from pilot.translate import gateway_tls
from pilot.translate.mtls import SDS_CLUSTER
from tests.unit.test_gateway import gateway, obj, server


def write_secret(root: Path, namespace: str, name: str, ca: DevCa, host: str, *,
                 with_ca: bool = False) -> x509.Certificate:
    """A Kubernetes TLS Secret's layout: `tls.crt`, `tls.key` (and `ca.crt`), issued by `ca` for `host`."""
    directory = root / namespace / name
    directory.mkdir(parents=True, exist_ok=True)
    scratch = root / ".scratch"
    scratch.mkdir(exist_ok=True)
    issued = ca.issue(scratch, name, [host])
    shutil.copy(issued.cert, directory / "tls.crt")
    shutil.copy(issued.key, directory / "tls.key")
    if with_ca:
        ca.write_ca(directory / "ca.crt")
    return x509.load_pem_x509_certificate(Path(issued.cert).read_bytes())


def unpack(resource: Any) -> secret_pb2.Secret:
    secret = secret_pb2.Secret()
    resource.Unpack(secret)
    return secret


# --- the store --------------------------------------------------------------------------------


def test_tls_secret_layout_gives_istio_sds_names(tmp_path: Path) -> None:
    ca = DevCa.create("unit credential CA")
    leaf = write_secret(tmp_path, "istio-system", "shop-cert", ca, "shop.example.com", with_ca=True)
    secrets, errors = store.load_credentials(tmp_path / "istio-system")
    assert errors == []
    assert sorted(secrets) == ["kubernetes://shop-cert", "kubernetes://shop-cert-cacert"]
    chain = secrets["kubernetes://shop-cert"].tls_certificate.certificate_chain.inline_bytes
    assert x509.load_pem_x509_certificates(chain)[0].serial_number == leaf.serial_number
    assert b"PRIVATE KEY" in secrets["kubernetes://shop-cert"].tls_certificate.private_key.inline_bytes
    assert secrets["kubernetes://shop-cert-cacert"].validation_context.trusted_ca.inline_bytes


def test_generic_keys_separate_cacert_directory_wins_and_crl(tmp_path: Path) -> None:
    ca, other_ca = DevCa.create("first CA"), DevCa.create("second CA")
    write_secret(tmp_path, "ns", "web", ca, "web.example.com", with_ca=True)
    directory = tmp_path / "ns" / "web"
    (directory / "tls.crt").rename(directory / "cert")
    (directory / "tls.key").rename(directory / "key")
    separate = tmp_path / "ns" / "web-cacert"
    separate.mkdir()
    other_ca.write_ca(separate / "cacert")
    other_ca.write_crl(separate / "crl", revoked=[])
    secrets, errors = store.load_credentials(tmp_path / "ns")
    assert errors == []
    assert sorted(secrets) == ["kubernetes://web", "kubernetes://web-cacert"]
    bundle = secrets["kubernetes://web-cacert"].validation_context
    roots = x509.load_pem_x509_certificates(bundle.trusted_ca.inline_bytes)
    assert [r.subject for r in roots] == [x509.load_pem_x509_certificate(
        (separate / "cacert").read_bytes()).subject]
    assert b"X509 CRL" in bundle.crl.inline_bytes


def test_broken_secrets_are_left_out_naming_the_file_not_the_key(tmp_path: Path) -> None:
    ca = DevCa.create("unit credential CA")
    write_secret(tmp_path, "ns", "good", ca, "good.example.com")
    write_secret(tmp_path, "ns", "mismatch", ca, "a.example.com")
    write_secret(tmp_path, "ns", "other", ca, "b.example.com")
    shutil.copy(tmp_path / "ns" / "other" / "tls.key", tmp_path / "ns" / "mismatch" / "tls.key")
    garbage = tmp_path / "ns" / "garbage"
    garbage.mkdir()
    (garbage / "tls.crt").write_text("not a certificate")
    (garbage / "tls.key").write_text("SECRET-KEY-MATERIAL")
    secrets, errors = store.load_credentials(tmp_path / "ns")
    assert sorted(secrets) == ["kubernetes://good", "kubernetes://other"]
    reasons = {e.name: e.reason for e in errors}
    assert sorted(reasons) == ["garbage", "mismatch"]
    assert "tls.key: does not match the first certificate of tls.crt" in reasons["mismatch"]
    assert all("SECRET-KEY-MATERIAL" not in r for r in reasons.values())
    assert store.load_credentials(tmp_path / "absent") == ({}, [])


def test_fingerprint_changes_when_a_file_is_replaced(tmp_path: Path) -> None:
    ca = DevCa.create("unit credential CA")
    write_secret(tmp_path, "ns", "web", ca, "web.example.com")
    before = store.scan_fingerprint(tmp_path / "ns")
    assert before == store.scan_fingerprint(tmp_path / "ns")
    write_secret(tmp_path, "ns", "web", ca, "web.example.com")
    assert store.scan_fingerprint(tmp_path / "ns") != before


def test_pilot_and_agent_agree_on_names() -> None:
    for name in ("shop-cert", "kubernetes://shop-cert"):
        assert gateway_tls.credential_secret(name) == store.resource_name(name) == "kubernetes://shop-cert"
        assert gateway_tls.credential_ca_secret(name) == store.ca_resource_name(name) == "kubernetes://shop-cert-cacert"


# --- the agent's SDS --------------------------------------------------------------------------


async def test_gateway_agent_serves_its_namespace_secrets_and_pushes_rotations(tmp_path: Path) -> None:
    ca = DevCa.create("unit credential CA")
    secrets = tmp_path / "secrets"
    first = write_secret(secrets, "istio-system", "shop-cert", ca, "shop.example.com")
    write_secret(secrets, "default", "foreign", ca, "foreign.example.com")  # another namespace: never served
    sockets = Path(tmp_path / "s")
    settings = AgentSettings(
        namespace="istio-system", service_account="ingress", ca_address="127.0.0.1:1",
        ca_root_file=tmp_path / "none.pem", token_file=tmp_path / "none.token", sds_socket=sockets / "sds.sock",
        credential_dir=secrets, credential_poll=timedelta(milliseconds=50), backoff_initial=timedelta(seconds=30),
        backoff_max=timedelta(seconds=60))
    async with WorkloadAgent(settings, CollectorRegistry()) as agent:
        assert sorted(agent.store.current) == ["kubernetes://shop-cert"]  # no mesh certificate needed for these
        async with SDSStream(settings.sds_socket) as stream:
            await stream.subscribe("kubernetes://shop-cert", "kubernetes://foreign")
            response = await stream.read()
            assert names_of(response) == ["kubernetes://shop-cert"]
            served = unpack(response.resources[0]).tls_certificate.certificate_chain.inline_bytes
            assert x509.load_pem_x509_certificates(served)[0].serial_number == first.serial_number
            await stream.ack(response, "kubernetes://shop-cert", "kubernetes://foreign")
            # Rotation: new files are picked up by the poll loop and pushed on the open stream.
            second = write_secret(secrets, "istio-system", "shop-cert", ca, "shop.example.com")
            pushed = await stream.read()
            chain = unpack(pushed.resources[0]).tls_certificate.certificate_chain.inline_bytes
            assert second.serial_number != first.serial_number
            assert x509.load_pem_x509_certificates(chain)[0].serial_number == second.serial_number
            # Removing the secret stops serving it (Envoy keeps the last one it has).
            shutil.rmtree(secrets / "istio-system" / "shop-cert")
            for _ in range(100):
                if not agent.store.current:
                    break
                await asyncio.sleep(0.05)
            assert "kubernetes://shop-cert" not in agent.store.current


def test_agent_settings_reject_a_zero_poll(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="credential_poll"):
        AgentSettings(namespace="ns", service_account="sa", ca_root_file=tmp_path / "r", token_file=tmp_path / "t",
                      sds_socket=tmp_path / "s", credential_poll=timedelta(0))


# --- pilot: validation, model, translation --------------------------------------------------------


def _issues(spec_servers: list[dict[str, Any]]) -> list[str]:
    with pytest.raises(InvalidObjectError) as err:
        obj("Gateway", "bad", {"selector": {}, "servers": spec_servers})
    return [str(i) for i in err.value.issues]


def test_credential_name_validation() -> None:
    found = _issues([server(443, "HTTPS", ["*"], mode="SIMPLE", credentialName="Bad_Name")])
    assert any(i.startswith("spec.servers[0].tls.credentialName: 'Bad_Name' is not a secret name") for i in found)
    found = _issues([server(443, "HTTPS", ["*"], mode="ISTIO_MUTUAL", credentialName="x")])
    assert "spec.servers[0].tls.credentialName: ISTIO_MUTUAL TLS cannot have an associated credentialName" in found
    ok: ApiObject = gateway(server(443, "HTTPS", ["*"], mode="MUTUAL", credentialName="kubernetes://shop.cert"))
    assert list(ok.warnings) == []


def _tls_server(tls: ServerTls) -> GatewayServer:
    return GatewayServer(gateway="istio-system/gw", index=0, port=443, port_name="https", protocol="HTTPS",
                         hosts=(("*", "*"),), tls=tls)


def test_simple_context_names_sds_secrets_never_files() -> None:
    mesh = build_mesh([gateway(server(443, "HTTPS", ["*"], mode="SIMPLE", credentialName="shop-cert",
                                      serverCertificate="/ignored.pem", privateKey="/ignored.key"))])
    tls = mesh.scoping.gateways[0].servers[0].tls
    assert tls is not None
    context = json_format.MessageToDict(gateway_tls.downstream_tls_context(tls))
    common = context["commonTlsContext"]
    assert [c["name"] for c in common["tlsCertificateSdsSecretConfigs"]] == ["kubernetes://shop-cert"]
    sds = common["tlsCertificateSdsSecretConfigs"][0]["sdsConfig"]["apiConfigSource"]["grpcServices"][0]
    assert sds["envoyGrpc"]["clusterName"] == SDS_CLUSTER
    assert "ignored" not in str(context) and "tlsCertificates" not in common
    assert "combinedValidationContext" not in common and "requireClientCertificate" not in context


def test_mutual_context_takes_the_cacert_secret_and_keeps_pins() -> None:
    tls = ServerTls(mode="MUTUAL", server_certificate="", private_key="", credential_names=("shop-cert", "ecdsa"),
                    subject_alt_names=("client.example.com",), hash_pins=("ab" * 32,))
    context = json_format.MessageToDict(gateway_tls.downstream_tls_context(tls))
    common = context["commonTlsContext"]
    assert [c["name"] for c in common["tlsCertificateSdsSecretConfigs"]] == ["kubernetes://shop-cert",
                                                                             "kubernetes://ecdsa"]
    combined = common["combinedValidationContext"]
    assert combined["validationContextSdsSecretConfig"]["name"] == "kubernetes://shop-cert-cacert"
    assert combined["defaultValidationContext"]["verifyCertificateHash"] == ["ab" * 32]
    assert context["requireClientCertificate"] is True
    optional = json_format.MessageToDict(gateway_tls.downstream_tls_context(
        ServerTls(mode="OPTIONAL_MUTUAL", server_certificate="", private_key="", credential_names=("c",))))
    assert optional["requireClientCertificate"] is False  # verified only when presented
    assert optional["commonTlsContext"]["combinedValidationContext"]["validationContextSdsSecretConfig"]["name"] == \
        "kubernetes://c-cacert"


def test_credential_servers_need_the_gateway_agent() -> None:
    with_secret = _tls_server(ServerTls(mode="SIMPLE", server_certificate="", private_key="",
                                        credential_names=("c",)))
    with_files = _tls_server(ServerTls(mode="SIMPLE", server_certificate="/c.pem", private_key="/k.pem"))
    assert gateway_tls.mesh_tls_servers([with_secret, with_files], mtls=False) == [with_files]
    assert gateway_tls.mesh_tls_servers([with_secret, with_files], mtls=True) == [with_secret, with_files]


# --- pilot: which secrets exist (warnings in /debug/configz) ----------------------------------------


def test_pilot_names_missing_secrets_of_the_gateway_namespace(tmp_path: Path) -> None:
    ca = DevCa.create("unit credential CA")
    write_secret(tmp_path, "edge", "present", ca, "a.example.com")
    write_secret(tmp_path, "other", "elsewhere", ca, "b.example.com")  # another namespace does not count
    write_secret(tmp_path, "edge", "mutual", ca, "c.example.com")
    mesh = build_mesh([gateway(
        server(443, "HTTPS", ["a.example.com"], mode="SIMPLE", credentialName="present"),
        server(444, "HTTPS", ["b.example.com"], mode="SIMPLE", credentialName="elsewhere"),
        server(445, "HTTPS", ["c.example.com"], mode="MUTUAL", credentialName="kubernetes://mutual"))])
    available = pilot_credentials.scan(tmp_path)
    warned = pilot_credentials.with_credential_warnings(mesh, available).warnings
    assert [w for w in warned if "credentialName" in w] == [
        "Gateway edge/gw: servers[1] credentialName: no secret elsewhere in namespace edge of the secret store; "
        "its TLS handshakes fail until the secret exists",
        "Gateway edge/gw: servers[2] credentialName: no secret mutual-cacert (or ca.crt in mutual) in namespace "
        "edge of the secret store; its TLS handshakes fail until the secret exists"]
    ca.write_ca(tmp_path / "edge" / "mutual" / "ca.crt")
    warned = pilot_credentials.with_credential_warnings(mesh, pilot_credentials.scan(tmp_path)).warnings
    assert [w for w in warned if "credentialName" in w][1:] == []
    assert pilot_credentials.with_credential_warnings(mesh, None) is mesh  # no store known: nothing checked
