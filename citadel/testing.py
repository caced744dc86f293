"""Helpers for tests and trials: a settable clock, an Istio-style `cacerts` directory, workload CSRs.

`write_cacerts` builds what an operator would plug in (an offline root, an intermediate for this
cluster, the chain) so the plugged-in path can be exercised without external tooling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from citadel.ca import CLOCK_SKEW_BACKDATE, create_root
from citadel.files import PUBLIC_MODE, write_file_atomic, write_secret_file
from citadel.keys import KeyAlgorithm, SigningKey, cert_pem, generate_key, private_key_pem, signature_hash


@dataclass
class Clock:
    """A clock tests move by hand (whole seconds, as X.509 times); call it to read the time."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC).replace(microsecond=0))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward."""
        self.now += delta


def make_intermediate(root_key: SigningKey, root: x509.Certificate, key: SigningKey, name: str,
                      now: datetime, ttl: timedelta = timedelta(days=365)) -> x509.Certificate:
    """An intermediate CA certificate for `key`, signed by `root`."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshctl"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW_BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, signature_hash(root_key))
    )


@dataclass(frozen=True)
class PluggedCA:
    """What `write_cacerts` wrote."""

    root_key: SigningKey
    root: x509.Certificate
    ca_key: SigningKey
    ca_cert: x509.Certificate


def write_cacerts(directory: Path, trust_domain: str = "cluster.local", now: datetime | None = None,
                  algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256, *, chain_includes_root: bool = True) -> PluggedCA:
    """Write ca-cert.pem, ca-key.pem (0600), root-cert.pem and cert-chain.pem as Istio's `cacerts`."""
    now = now or datetime.now(UTC)
    directory.mkdir(parents=True, exist_ok=True)
    root_key = generate_key(algorithm)
    root = create_root(root_key, trust_domain, timedelta(days=3650), now)
    ca_key = generate_key(algorithm)
    ca_cert = make_intermediate(root_key, root, ca_key, "meshctl plugged-in intermediate", now)
    write_file_atomic(directory / "ca-cert.pem", cert_pem(ca_cert).encode(), PUBLIC_MODE)
    write_secret_file(directory / "ca-key.pem", private_key_pem(ca_key))
    write_file_atomic(directory / "root-cert.pem", cert_pem(root).encode(), PUBLIC_MODE)
    chain = cert_pem(ca_cert) + (cert_pem(root) if chain_includes_root else "")
    write_file_atomic(directory / "cert-chain.pem", chain.encode(), PUBLIC_MODE)
    return PluggedCA(root_key, root, ca_key, ca_cert)
