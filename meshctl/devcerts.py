"""Self-signed development certificates for gateway TLS: a CA and server (or client) certificates.

For examples and tests only: keys are unencrypted files. ``python -m meshctl.devcerts DIR HOST...``
writes ``ca.pem``, ``server.pem`` and ``server.key`` for the hosts, which is what a Gateway's
``tls.serverCertificate`` / ``privateKey`` (and a client's CA bundle) need. Pure file output.
"""

from __future__ import annotations

import datetime
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=3650)
_CA_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass(frozen=True)
class DevCa:
    """A CA kept in memory that issues certificates into files."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "meshctl dev CA") -> DevCa:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            _builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def write_ca(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def write_crl(self, path: Path, revoked: list[Path]) -> Path:
        """A PEM certificate revocation list, signed by this CA, revoking the given certificate files."""
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(now + _VALIDITY)
        )
        for cert_file in revoked:
            builder = builder.add_revoked_certificate(_revoked(cert_file, now))
        path.write_bytes(builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        return path

    def issue(self, directory: Path, stem: str, hosts: list[str], *, client: bool = False) -> Issued:
        """A leaf certificate for ``hosts`` (DNS SANs) in ``<stem>.pem`` and ``<stem>.key``."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            _builder(subject, self.cert.subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        out = Issued(directory / f"{stem}.pem", directory / f"{stem}.key")
        out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return out


def _revoked(cert_file: Path, when: datetime.datetime) -> x509.RevokedCertificate:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(when).build()


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
    )


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m meshctl.devcerts DIR HOST [HOST...]", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    directory.mkdir(parents=True, exist_ok=True)
    ca = DevCa.create()
    ca.write_ca(directory / "ca.pem")
    issued = ca.issue(directory, "server", argv[1:])
    print(f"wrote {directory / 'ca.pem'}, {issued.cert}, {issued.key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
