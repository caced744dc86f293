"""The CA's pure core: create roots, check a plugged-in CA, sign workload and server certificates.

Every function here takes what it needs (keys, certificates, the time) and returns new
`cryptography` objects; nothing reads a clock, a file or a setting. Costs: signing a leaf is one
signature with the CA key (ECDSA P-256: ~0.1 ms; RSA-2048: ~1 ms; RSA-4096: ~5 ms) plus building
the certificate; `check_ca_bundle` is a handful of signature checks and runs once per load.

Workload certificates follow Istio's profile: empty subject, exactly one URI SAN (the SPIFFE id,
marked critical because the subject is empty), keyUsage digitalSignature+keyEncipherment, extended
key usage serverAuth+clientAuth, not a CA, `notBefore` backdated a little for clock skew, and never
outliving the certificate that signs them.
"""

from __future__ import annotations

import ipaddress
import itertools
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from citadel.errors import CAConfigError
from citadel.identity import SpiffeId
from citadel.keys import PublicKey, SigningKey, fingerprint, same_public_key, signature_hash

DEFAULT_WORKLOAD_TTL = timedelta(hours=24)
DEFAULT_MAX_WORKLOAD_TTL = timedelta(days=90)  # Istio's MAX_WORKLOAD_CERT_TTL default
DEFAULT_ROOT_TTL = timedelta(days=3650)  # Istio's self-signed root default (10 years)
CLOCK_SKEW_BACKDATE = timedelta(minutes=2)


@dataclass(frozen=True)
class CABundle:
    """What signs leaves and what relying parties trust.

    `intermediates` runs from the signing certificate up to (excluding) the root; it is empty when
    the signing certificate is itself a root (the self-signed case). `roots` is the trust bundle;
    during a root rotation it holds the old and the new root.
    """

    signing_key: SigningKey
    signing_cert: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]

    @property
    def issuing_root(self) -> x509.Certificate:
        """The root that the signing chain ends at (first match in `roots`)."""
        top = self.intermediates[-1] if self.intermediates else self.signing_cert
        for root in self.roots:
            if _issued_by(top, root):
                return root
        raise CAConfigError(f"signing chain does not end at a trusted root (top is {top.subject.rfc4514_string()})")

    def response_chain(self, leaf: x509.Certificate) -> list[x509.Certificate]:
        """Istio's `cert_chain`: the leaf, the intermediates, the issuing root, then any other trusted roots."""
        issuing = self.issuing_root
        others = [r for r in self.roots if r is not issuing]
        return [leaf, *self.intermediates, issuing, *others]


@dataclass(frozen=True)
class WorkloadCertPolicy:
    """TTL rules: a request of 0 or less gets `default_ttl`; a longer one than `max_ttl` is capped."""

    default_ttl: timedelta = DEFAULT_WORKLOAD_TTL
    max_ttl: timedelta = DEFAULT_MAX_WORKLOAD_TTL
    backdate: timedelta = CLOCK_SKEW_BACKDATE

    def __post_init__(self) -> None:
        if self.default_ttl <= timedelta(0) or self.max_ttl <= timedelta(0):
            raise ValueError("workload certificate TTLs must be positive")
        if self.default_ttl > self.max_ttl:
            raise ValueError(f"default TTL {self.default_ttl} exceeds the maximum TTL {self.max_ttl}")

    def effective_ttl(self, requested_seconds: int) -> timedelta:
        """The TTL a request for `requested_seconds` gets."""
        if requested_seconds <= 0:
            return self.default_ttl
        return min(timedelta(seconds=requested_seconds), self.max_ttl)


def _serial() -> int:
    return secrets.randbits(127) | 1


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def create_root(key: SigningKey, trust_domain: str, ttl: timedelta, now: datetime) -> x509.Certificate:
    """A self-signed root for `trust_domain`; the CN carries the creation time so roots differ by name."""
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, f"meshctl root CA {now.strftime('%Y%m%dT%H%M%S.%fZ')}"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW_BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, signature_hash(key))
    )


def self_signed_bundle(key: SigningKey, root: x509.Certificate, trusted: Sequence[x509.Certificate]) -> CABundle:
    """The bundle of a self-signed CA: `root` signs, `trusted` (which must include it) is the bundle."""
    return CABundle(signing_key=key, signing_cert=root, intermediates=(), roots=tuple(trusted))


def check_ca_bundle(bundle: CABundle, source: str, now: datetime) -> None:
    """Refuse a CA that cannot work: key/cert mismatch, not a CA, broken chain, expired signing cert.

    `source` names where the bundle came from (a directory) in the error message.
    """
    if not same_public_key(bundle.signing_key.public_key(), bundle.signing_cert.public_key()):
        raise CAConfigError(f"{source}: ca-key.pem does not match the public key of ca-cert.pem")
    if not _is_ca(bundle.signing_cert):
        raise CAConfigError(f"{source}: ca-cert.pem is not a CA certificate (basicConstraints CA:TRUE missing)")
    if bundle.signing_cert.not_valid_after_utc <= now:
        raise CAConfigError(f"{source}: ca-cert.pem expired at {bundle.signing_cert.not_valid_after_utc.isoformat()}")
    if not bundle.roots:
        raise CAConfigError(f"{source}: root-cert.pem holds no certificate")
    if bundle.intermediates and bundle.intermediates[0] != bundle.signing_cert:
        raise CAConfigError(f"{source}: cert-chain.pem must start with ca-cert.pem")
    chain = list(bundle.intermediates) or [bundle.signing_cert]
    for child, parent in itertools.pairwise(chain):
        if not _issued_by(child, parent):
            raise CAConfigError(f"{source}: cert-chain.pem is broken: {child.subject.rfc4514_string()} "
                                f"is not signed by {parent.subject.rfc4514_string()}")
    bundle.issuing_root  # noqa: B018 - raises CAConfigError when the chain ends at no trusted root


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _key_usage(*, cert_sign: bool = False, key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=key_encipherment,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False)


def _leaf_builder(bundle: CABundle, public_key: PublicKey, ttl: timedelta, now: datetime,
                  backdate: timedelta) -> x509.CertificateBuilder:
    not_after = min(now + ttl, bundle.signing_cert.not_valid_after_utc)
    issuer_ski = x509.SubjectKeyIdentifier.from_public_key(bundle.signing_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(bundle.signing_cert.subject)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(now - backdate)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(key_encipherment=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
    )


def sign_workload(bundle: CABundle, public_key: PublicKey, identity: SpiffeId, ttl: timedelta,
                  now: datetime, backdate: timedelta = CLOCK_SKEW_BACKDATE) -> x509.Certificate:
    """A workload certificate for `identity` over `public_key`, valid `ttl` from `now` (capped by the CA)."""
    builder = _leaf_builder(bundle, public_key, ttl, now, backdate).add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True)
    return builder.sign(bundle.signing_key, signature_hash(bundle.signing_key))


def sign_server(bundle: CABundle, public_key: PublicKey, dns_names: Sequence[str], ips: Sequence[str],
                ttl: timedelta, now: datetime) -> x509.Certificate:
    """A serving certificate for the control plane (CSR service, later xDS) with DNS and IP SANs."""
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if not names:
        raise ValueError("a server certificate needs at least one DNS name or IP address")
    builder = _leaf_builder(bundle, public_key, ttl, now, CLOCK_SKEW_BACKDATE).add_extension(
        x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(bundle.signing_key, signature_hash(bundle.signing_key))


def describe(cert: x509.Certificate) -> str:
    """A log-safe one-line description: subject, short fingerprint, expiry."""
    return (f"{cert.subject.rfc4514_string() or '<empty subject>'} sha256:{fingerprint(cert)[:16]} "
            f"expires {cert.not_valid_after_utc.isoformat()}")
