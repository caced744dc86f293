"""Checking a CSR against its authenticated caller (pure).

The CA takes only the public key from a CSR. The identity comes from the caller; a CSR may omit the
SAN extension, but if it carries one it must be exactly one URI SAN equal to the caller's SPIFFE id
(a CSR asking for anything else is an attempt to obtain another identity and is refused). The CSR's
subject is ignored (issued certificates have an empty subject, as Istio's). Cost: one signature
verification of the CSR (ECDSA ~0.1 ms, RSA ~0.05 ms).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from citadel.errors import CSRError, IdentityMismatchError
from citadel.identity import SpiffeId
from citadel.keys import PublicKey

MAX_CSR_BYTES = 64 * 1024
_CURVES = (ec.SECP256R1, ec.SECP384R1)
_RSA_BITS = (2048, 8192)


def parse_csr(pem: str) -> x509.CertificateSigningRequest:
    """A PEM PKCS#10 request with a valid self-signature, or CSRError naming the field `csr`."""
    if len(pem) > MAX_CSR_BYTES:
        raise CSRError(f"field csr: longer than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(pem.encode("utf-8", errors="replace"))
        valid = csr.is_signature_valid
    except ValueError as exc:
        raise CSRError(f"field csr: not a PEM certificate request ({exc})") from None
    if not valid:
        raise CSRError("field csr: the request's signature does not match its public key")
    return csr


def csr_public_key(csr: x509.CertificateSigningRequest) -> PublicKey:
    """The CSR's key if it is ECDSA P-256/P-384 or RSA 2048..8192 bits; CSRError otherwise."""
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _CURVES):
        return key
    if isinstance(key, rsa.RSAPublicKey) and _RSA_BITS[0] <= key.key_size <= _RSA_BITS[1]:
        return key
    raise CSRError(f"field csr: public key {type(key).__name__} is not ECDSA P-256/P-384 or RSA 2048..8192")


def requested_uris(csr: x509.CertificateSigningRequest) -> list[str]:
    """Every SAN the CSR asks for, as text (`URI:...`, `DNS:...`, ...); empty without a SAN extension."""
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = []
    for name in sans:
        kind = "URI" if isinstance(name, x509.UniformResourceIdentifier) else type(name).__name__
        out.append(f"{kind}:{name.value}")
    return out


def check_csr_identity(csr: x509.CertificateSigningRequest, caller: SpiffeId) -> None:
    """Refuse a CSR whose SANs are anything but [URI:<caller's SPIFFE id>] (or absent)."""
    requested = requested_uris(csr)
    if requested and requested != [f"URI:{caller.uri}"]:
        raise IdentityMismatchError(f"field csr: SANs {requested} are not exactly the caller's identity {caller.uri}")


def build_csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, sans: list[x509.GeneralName]) -> str:
    """A PEM CSR over `key` asking for `sans` (what an agent sends; tests use it to ask for other names)."""
    from cryptography.hazmat.primitives import hashes, serialization

    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode("ascii")
