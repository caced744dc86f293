"""The agent's pure core: a fresh key and CSR, checking the CA's answer, when to renew, backoff.

Nothing here does I/O or reads a clock: callers pass the time and the random source. The private
key lives in a `WorkloadCredential` in memory only; `key_pem` serializes it for the one consumer
allowed to have it (the workload's Envoy, over SDS on a Unix socket). Costs: an ECDSA P-256 key
and CSR take well under a millisecond; RSA-2048 about 50 ms, RSA-4096 about a second (the agent
runs key generation in a worker thread).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from citadel.csr import build_csr
from citadel.errors import CitadelError
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, SigningKey, certs_pem, fingerprint, generate_key, same_public_key


class CertificateResponseError(CitadelError):
    """The CA's answer cannot be used: not PEM, wrong identity, wrong key, no root (names what is wrong)."""


@dataclass(frozen=True)
class WorkloadCredential:
    """A key and the certificate the CA issued for it, with the trust bundle the CA sent along.

    `chain` is the leaf and its intermediates (what a TLS peer is shown); `roots` is the trust
    bundle (every root the CA trusts now: two during a root rotation).
    """

    key: SigningKey = field(repr=False)
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    received_at: datetime

    @property
    def leaf(self) -> x509.Certificate:
        """The workload certificate."""
        return self.chain[0]

    @property
    def not_after(self) -> datetime:
        """When the workload certificate expires."""
        return self.leaf.not_valid_after_utc

    def describe(self) -> str:
        """Log-safe: serial, expiry and the roots' short fingerprints (never the key)."""
        roots = ",".join(fingerprint(r)[:12] for r in self.roots)
        return f"serial {self.leaf.serial_number:x} expires {self.not_after.isoformat()} roots [{roots}]"

    def chain_pem(self) -> bytes:
        """The leaf and intermediates as PEM (Envoy's `certificate_chain`)."""
        return certs_pem(self.chain).encode("ascii")

    def roots_pem(self) -> bytes:
        """The trust bundle as PEM (Envoy's `trusted_ca`)."""
        return certs_pem(self.roots).encode("ascii")

    def key_pem(self) -> bytes:
        """The private key as PKCS#8 PEM, for SDS only; never write or log it."""
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


def new_request(identity: SpiffeId, algorithm: KeyAlgorithm) -> tuple[SigningKey, str]:
    """A fresh key (one per certificate, as Istio's agent does) and a CSR asking for `identity` only."""
    key = generate_key(algorithm)
    return key, build_csr(key, [x509.UniformResourceIdentifier(identity.uri)])


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def accept_response(identity: SpiffeId, key: SigningKey, cert_chain: list[str], now: datetime) -> WorkloadCredential:
    """Check the CA's `cert_chain` (leaf first, roots last) against what was asked; split chain and roots.

    The leaf must carry exactly the URI SAN `identity` and the public key of `key`, and still be
    valid; roots are the self-signed certificates (at least one), in fingerprint order.
    """
    try:
        certs = [x509.load_pem_x509_certificate(pem.encode("ascii")) for pem in cert_chain]
    except (ValueError, UnicodeEncodeError) as exc:
        raise CertificateResponseError(f"field cert_chain: not PEM certificates ({exc})") from None
    if not certs:
        raise CertificateResponseError("field cert_chain: empty")
    leaf = certs[0]
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [str(name.value) for name in san]
    except x509.ExtensionNotFound:
        uris = []
    if uris != [identity.uri]:
        raise CertificateResponseError(f"field cert_chain: the leaf's SANs {uris} are not [{identity.uri}]")
    if not same_public_key(leaf.public_key(), key.public_key()):
        raise CertificateResponseError("field cert_chain: the leaf is not for the key this agent generated")
    if leaf.not_valid_after_utc <= now:
        raise CertificateResponseError(f"field cert_chain: the leaf expired at {leaf.not_valid_after_utc.isoformat()}")
    rest = certs[1:]
    # Sorted, so a bundle that only changed order (the issuing root first) is the same secret.
    roots = tuple(sorted((c for c in rest if _is_self_signed(c)), key=fingerprint))
    if not roots:
        raise CertificateResponseError("field cert_chain: no root certificate (the chain must end at the mesh root)")
    intermediates = tuple(c for c in rest if not _is_self_signed(c))
    return WorkloadCredential(key, (leaf, *intermediates), roots, now)


def renewal_delay(credential: WorkloadCredential, now: datetime, fraction: float, jitter: float,
                  rng: random.Random) -> timedelta:
    """Time from `now` until renewal: `fraction` (+/- `jitter` of it) of the lifetime left at receipt.

    Measured from when the certificate arrived, not from its `notBefore`: the CA backdates that for
    clock skew, which would eat short TTLs. Never negative.
    """
    lifetime = credential.not_after - credential.received_at
    factor = fraction * (1 + rng.uniform(-jitter, jitter))
    due = credential.received_at + lifetime * factor
    return max(due - now, timedelta(0))


@dataclass
class Backoff:
    """Exponential backoff with jitter: `initial`, doubling to `maximum`, each delay in [d/2, d]."""

    initial: timedelta
    maximum: timedelta
    failures: int = 0

    def next_delay(self, rng: random.Random) -> timedelta:
        """The delay before the next attempt after one more failure."""
        base: timedelta = min(self.initial * (2 ** min(self.failures, 30)), self.maximum)
        self.failures += 1
        return base * rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        """After a success."""
        self.failures = 0


def same_roots(a: tuple[x509.Certificate, ...], b: tuple[x509.Certificate, ...]) -> bool:
    """Whether two trust bundles hold the same roots (order ignored)."""
    return {fingerprint(c) for c in a} == {fingerprint(c) for c in b}
