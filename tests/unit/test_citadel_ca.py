"""Citadel's CA core with real X.509: roots, workload certificates, TTL rules, plugged-in CA, CSR checks.

Chains are verified twice: with cryptography's RFC 5280 verifier and with `openssl verify`.
"""

from __future__ import annotations

import os
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from citadel.authority import CertificateAuthority, expiry_warning
from citadel.ca import CABundle, WorkloadCertPolicy, check_ca_bundle, create_root, sign_workload
from citadel.csr import build_csr, check_csr_identity, parse_csr
from citadel.errors import CAConfigError, CSRError, IdentityMismatchError
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, cert_pem, generate_key, same_public_key
from citadel.store import SelfSignedStore, load_cacerts
from citadel.testing import Clock, write_cacerts

TD = "cluster.local"
ALICE = SpiffeId(TD, "default", "alice")


def verify_with_cryptography(chain: list[x509.Certificate], roots: list[x509.Certificate], now: datetime) -> None:
    """RFC 5280 path validation of a client certificate (leaf first) against `roots`."""
    verifier = PolicyBuilder().store(Store(roots)).time(now).build_client_verifier()
    verified = verifier.verify(chain[0], chain[1:])
    assert verified.chain[-1] in roots


def verify_with_openssl(tmp: Path, chain: list[x509.Certificate], roots: list[x509.Certificate]) -> None:
    """`openssl verify -CAfile roots -untrusted intermediates leaf` must print OK."""
    (tmp / "leaf.pem").write_text(cert_pem(chain[0]))
    (tmp / "roots.pem").write_text("".join(cert_pem(r) for r in roots))
    inter = [c for c in chain[1:] if c not in roots]
    args = ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp / "roots.pem")]
    if inter:
        (tmp / "inter.pem").write_text("".join(cert_pem(c) for c in inter))
        args += ["-untrusted", str(tmp / "inter.pem")]
    out = subprocess.run([*args, str(tmp / "leaf.pem")], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def new_ca(tmp: Path, algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256, clock: Clock | None = None,
           policy: WorkloadCertPolicy | None = None) -> CertificateAuthority:
    return CertificateAuthority.self_signed(tmp / "ca", policy or WorkloadCertPolicy(), trust_domain=TD,
                                            algorithm=algorithm, clock=clock or Clock())


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.ECDSA_P256, KeyAlgorithm.RSA_2048])
def test_workload_certificate_profile_and_chain(tmp_path: Path, algorithm: KeyAlgorithm) -> None:
    clock = Clock()
    ca = new_ca(tmp_path, algorithm, clock)
    key = generate_key(algorithm)
    issued = ca.sign_csr(build_csr(key, [x509.UniformResourceIdentifier(ALICE.uri)]), 0, ALICE)
    leaf = issued.leaf
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/alice")]
    assert leaf.not_valid_after_utc - clock.now == timedelta(hours=24)
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert same_public_key(leaf.public_key(), key.public_key())
    assert issued.chain[0] is leaf and issued.chain[-1] == ca.bundle.roots[0]
    root_algorithm = rsa.RSAPublicKey if algorithm is not KeyAlgorithm.ECDSA_P256 else ec.EllipticCurvePublicKey
    assert isinstance(ca.bundle.roots[0].public_key(), root_algorithm)
    verify_with_cryptography(issued.chain, list(ca.trust_bundle()), clock.now)
    verify_with_openssl(tmp_path, issued.chain, list(ca.trust_bundle()))


def test_ttl_default_request_and_cap() -> None:
    policy = WorkloadCertPolicy(default_ttl=timedelta(hours=24), max_ttl=timedelta(hours=48))
    assert policy.effective_ttl(0) == timedelta(hours=24)
    assert policy.effective_ttl(-5) == timedelta(hours=24)
    assert policy.effective_ttl(3600) == timedelta(hours=1)
    assert policy.effective_ttl(10 * 24 * 3600) == timedelta(hours=48)
    with pytest.raises(ValueError, match="exceeds the maximum"):
        WorkloadCertPolicy(default_ttl=timedelta(days=2), max_ttl=timedelta(days=1))


def test_requested_ttl_above_maximum_is_capped_in_the_certificate(tmp_path: Path) -> None:
    clock = Clock()
    ca = new_ca(tmp_path, clock=clock, policy=WorkloadCertPolicy(timedelta(hours=1), timedelta(hours=2)))
    csr = build_csr(generate_key(KeyAlgorithm.ECDSA_P256), [])
    leaf = ca.sign_csr(csr, 30 * 24 * 3600, ALICE).leaf
    assert leaf.not_valid_after_utc - clock.now == timedelta(hours=2)


def test_leaf_never_outlives_its_signing_certificate(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    key = generate_key(KeyAlgorithm.ECDSA_P256)
    root = create_root(key, TD, timedelta(hours=1), now)
    bundle = CABundle(key, root, (), (root,))
    leaf = sign_workload(bundle, generate_key(KeyAlgorithm.ECDSA_P256).public_key(), ALICE, timedelta(days=1), now)
    assert leaf.not_valid_after_utc == root.not_valid_after_utc


def test_root_key_file_is_0600_and_state_reloads(tmp_path: Path) -> None:
    ca = new_ca(tmp_path)
    keys = list((tmp_path / "ca" / "roots").glob("*.key.pem"))
    assert len(keys) == 1
    assert stat.S_IMODE(keys[0].stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    exported = x509.load_pem_x509_certificates((tmp_path / "ca" / "root-cert.pem").read_bytes())
    assert exported == list(ca.trust_bundle())
    again = new_ca(tmp_path)  # second start: same root, no new key
    assert again.bundle.roots == ca.bundle.roots
    assert len(list((tmp_path / "ca" / "roots").glob("*.key.pem"))) == 1


def test_corrupt_state_names_the_file(tmp_path: Path) -> None:
    new_ca(tmp_path)
    (tmp_path / "ca" / "state.json").write_text("{nope")
    with pytest.raises(CAConfigError, match=r"state\.json: unreadable CA state"):
        SelfSignedStore(tmp_path / "ca").load()


@pytest.mark.parametrize("chain_includes_root", [True, False])
def test_plugged_in_ca_signs_under_the_operator_root(tmp_path: Path, chain_includes_root: bool) -> None:
    plugged = write_cacerts(tmp_path / "cacerts", chain_includes_root=chain_includes_root)
    clock = Clock()
    ca = CertificateAuthority.plugged(tmp_path / "cacerts", WorkloadCertPolicy(), trust_domain=TD, clock=clock)
    assert ca.bundle.intermediates == (plugged.ca_cert,)
    assert ca.trust_bundle() == (plugged.root,)
    issued = ca.sign_csr(build_csr(generate_key(KeyAlgorithm.ECDSA_P256), []), 0, ALICE)
    assert issued.chain == [issued.leaf, plugged.ca_cert, plugged.root]
    assert issued.leaf.issuer == plugged.ca_cert.subject
    verify_with_cryptography(issued.chain, [plugged.root], clock.now)
    verify_with_openssl(tmp_path, issued.chain, [plugged.root])
    assert not list((tmp_path / "ca").glob("*"))  # nothing self-signed was created


def test_plugged_in_ca_rejects_mismatched_key_and_missing_files(tmp_path: Path) -> None:
    write_cacerts(tmp_path / "a")
    write_cacerts(tmp_path / "b")
    (tmp_path / "a" / "ca-key.pem").write_bytes((tmp_path / "b" / "ca-key.pem").read_bytes())
    with pytest.raises(CAConfigError, match=r"ca-key\.pem does not match"):
        load_cacerts(tmp_path / "a", datetime.now(UTC))
    (tmp_path / "b" / "root-cert.pem").unlink()
    with pytest.raises(CAConfigError, match=r"root-cert\.pem: missing"):
        load_cacerts(tmp_path / "b", datetime.now(UTC))


def test_plugged_in_ca_rejects_chain_to_foreign_root(tmp_path: Path) -> None:
    write_cacerts(tmp_path / "a")
    write_cacerts(tmp_path / "b")
    (tmp_path / "a" / "root-cert.pem").write_bytes((tmp_path / "b" / "root-cert.pem").read_bytes())
    (tmp_path / "a" / "cert-chain.pem").write_bytes((tmp_path / "a" / "ca-cert.pem").read_bytes())
    with pytest.raises(CAConfigError, match="does not end at a trusted root"):
        load_cacerts(tmp_path / "a", datetime.now(UTC))


def test_check_ca_bundle_refuses_a_leaf_as_signing_cert(tmp_path: Path) -> None:
    ca = new_ca(tmp_path)
    key = generate_key(KeyAlgorithm.ECDSA_P256)
    leaf = ca.sign_csr(build_csr(key, []), 0, ALICE).leaf
    with pytest.raises(CAConfigError, match="not a CA certificate"):
        check_ca_bundle(CABundle(key, leaf, (leaf,), ca.bundle.roots), "test", datetime.now(UTC))


def test_csr_identity_rules() -> None:
    key = generate_key(KeyAlgorithm.ECDSA_P256)
    check_csr_identity(parse_csr(build_csr(key, [x509.UniformResourceIdentifier(ALICE.uri)])), ALICE)
    check_csr_identity(parse_csr(build_csr(key, [])), ALICE)  # no SAN: the caller's identity is used
    bob = SpiffeId(TD, "default", "bob").uri
    cases: list[list[x509.GeneralName]] = [
        [x509.UniformResourceIdentifier(bob)],
        [x509.UniformResourceIdentifier(ALICE.uri), x509.UniformResourceIdentifier(bob)],
        [x509.UniformResourceIdentifier(ALICE.uri), x509.DNSName("alice.default.svc")],
        [x509.DNSName("alice.default.svc")],
        [x509.UniformResourceIdentifier("https://example.com/alice")],
    ]
    for sans in cases:
        with pytest.raises(IdentityMismatchError, match="not exactly the caller's identity"):
            check_csr_identity(parse_csr(build_csr(key, sans)), ALICE)


def test_csr_parse_errors_name_the_field() -> None:
    with pytest.raises(CSRError, match="field csr: not a PEM certificate request"):
        parse_csr("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(CSRError, match="field csr: longer than"):
        parse_csr("x" * 70000)


def test_spiffe_id_parse_is_strict() -> None:
    assert SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b") == SpiffeId(TD, "a", "b")
    for bad in ("spiffe://cluster.local/ns/a", "https://cluster.local/ns/a/sa/b",
                "spiffe://cluster.local/ns/a/sa/b/c", "spiffe://cluster.local/ns/A_/sa/b"):
        with pytest.raises(ValueError, match=r"identity|namespace"):
            SpiffeId.parse(bad)


def test_expiry_warning_long_before_expiry() -> None:
    now = datetime.now(UTC)
    key = generate_key(KeyAlgorithm.ECDSA_P256)
    root = create_root(key, TD, timedelta(days=100), now)
    assert expiry_warning(root, "root", now + timedelta(days=50), 0.2) is None
    warning = expiry_warning(root, "root", now + timedelta(days=85), 0.2)
    assert warning is not None and "less than 20% of its lifetime left" in warning
    assert "EXPIRED" in (expiry_warning(root, "root", now + timedelta(days=101), 0.2) or "")


def test_ca_check_expiry_logs_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    ca = CertificateAuthority.self_signed(tmp_path / "ca", WorkloadCertPolicy(), trust_domain=TD,
                                          root_ttl=timedelta(days=10), clock=clock)
    assert ca.check_expiry() == []
    clock.advance(timedelta(days=9))
    with caplog.at_level("WARNING", logger="citadel.authority"):
        assert len(ca.check_expiry()) == 1
    assert "CA root certificate expires in" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_no_private_key_in_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("DEBUG"):
        new_ca(tmp_path)
    assert "PRIVATE KEY" not in caplog.text
    assert os.path.exists(tmp_path / "ca" / "state.json")


def test_layering_core_without_grpc_and_pilot_without_citadel() -> None:
    """The pure core imports no gRPC (only `server`/`client` do); nothing in pilot imports citadel."""
    import sys

    code = ("import sys, citadel.authority, citadel.service, citadel.rotation, citadel.tokens; "
            "sys.exit(1 if 'grpc' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
    pilot = Path(__file__).resolve().parents[2] / "pilot"
    offenders = [str(p) for p in pilot.rglob("*.py")
                 if any(line.lstrip().startswith(("import citadel", "from citadel"))
                        for line in p.read_text().splitlines())]
    assert offenders == []
