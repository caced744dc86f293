"""Key generation and PEM (de)serialization for CA and workload keys.

ECDSA P-256 is the default (Istio's default for workloads; signing costs well under a millisecond);
RSA 2048/4096 are options for environments that require RSA (RSA-4096 key generation takes about a
second, signing with it a few milliseconds).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from citadel.errors import CAConfigError

SigningKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class KeyAlgorithm(StrEnum):
    """Key types the CA can create for its roots (and tests/agents for workloads)."""

    ECDSA_P256 = "ecdsa-p256"
    RSA_2048 = "rsa-2048"
    RSA_4096 = "rsa-4096"


def generate_key(algorithm: KeyAlgorithm) -> SigningKey:
    """A fresh private key of `algorithm`."""
    if algorithm is KeyAlgorithm.ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    size = 2048 if algorithm is KeyAlgorithm.RSA_2048 else 4096
    return rsa.generate_private_key(public_exponent=65537, key_size=size)


def signature_hash(key: SigningKey) -> hashes.SHA256 | hashes.SHA384:
    """SHA-256 for P-256 and RSA, SHA-384 for P-384 and larger curves."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def private_key_pem(key: SigningKey | ed25519.Ed25519PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (the file holding it is 0600)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_signing_key(data: bytes, source: str) -> SigningKey:
    """Load an EC or RSA private key from PEM; `source` names the file in errors (never the content)."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CAConfigError(f"{source}: not an unencrypted PEM private key ({type(exc).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAConfigError(f"{source}: key type {type(key).__name__} is not supported (use ECDSA or RSA)")
    return key


def cert_pem(cert: x509.Certificate) -> str:
    """One certificate as PEM text."""
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def certs_pem(certs: tuple[x509.Certificate, ...] | list[x509.Certificate]) -> str:
    """Certificates concatenated as PEM text (a bundle)."""
    return "".join(cert_pem(c) for c in certs)


def load_certs(data: bytes, source: str) -> list[x509.Certificate]:
    """All PEM certificates in `data` (possibly none); `source` names the file in errors."""
    if not data.strip():
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CAConfigError(f"{source}: not a PEM certificate bundle ({exc})") from None


def fingerprint(cert: x509.Certificate) -> str:
    """Hex SHA-256 of the DER certificate; names roots in the CA directory and in logs."""
    return cert.fingerprint(hashes.SHA256()).hex()


def same_public_key(a: PublicKey | object, b: PublicKey | object) -> bool:
    """Whether two public keys are the same key (compared by their DER encoding)."""
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if not isinstance(a, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return False
    if not isinstance(b, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return False
    return a.public_bytes(enc, fmt) == b.public_bytes(enc, fmt)
