"""Gateway certificates from the local secret store, served over SDS as Istio names `credentialName` secrets.

Layout (a Kubernetes TLS Secret's keys as files): ``<root>/<namespace>/<name>/`` holds
``tls.crt`` (the chain, leaf first) and ``tls.key``, optionally ``ca.crt`` (client CA bundle for
MUTUAL) and ``ca.crl``. A generic Secret's keys ``cert``, ``key``, ``cacert`` and ``crl`` are read too. A
separate ``<name>-cacert/`` directory (``ca.crt`` or ``cacert``) holds the CA on its own, as Istio
allows; it wins over a ``ca.crt`` next to the certificate.

SDS names (Istio's): ``kubernetes://<name>`` is the `tls_certificate` (chain and key) and
``kubernetes://<name>-cacert`` the `validation_context` (CA bundle, and the CRL if given). An
agent reads its own namespace's directory only: a gateway may use the secrets of its namespace
and no other (Istio's rule).

A secret whose files cannot be read or parsed, or whose key does not match its certificate, is
left out with a warning naming the file and the reason, never its content. `scan_fingerprint`
(names, sizes, mtimes and inodes) lets the agent's poll loop re-read only after a change. Cost of
a scan: one `stat` per file; of a reload: reading and parsing each secret's PEM (a few KB each).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

log = logging.getLogger(__name__)

KUBERNETES_PREFIX = "kubernetes://"
CA_SUFFIX = "-cacert"
CERT_FILES = ("tls.crt", "cert")
KEY_FILES = ("tls.key", "key")
CA_FILES = ("ca.crt", "cacert")
CRL_FILES = ("ca.crl", "crl")
_ALL_FILES = (*CERT_FILES, *KEY_FILES, *CA_FILES, *CRL_FILES)


def resource_name(credential_name: str) -> str:
    """The SDS name of a `credentialName` (``kubernetes://`` prefix added once, as Istio does)."""
    return credential_name if credential_name.startswith(KUBERNETES_PREFIX) else KUBERNETES_PREFIX + credential_name


def ca_resource_name(credential_name: str) -> str:
    """The SDS name of a `credentialName`'s client CA bundle: ``kubernetes://<name>-cacert``."""
    return resource_name(credential_name) + CA_SUFFIX


@dataclass(frozen=True)
class CredentialError:
    """Why one secret is left out (file and reason; never the content)."""

    name: str
    reason: str


def _first(directory: Path, candidates: tuple[str, ...]) -> Path | None:
    return next((directory / f for f in candidates if (directory / f).is_file()), None)


def _public_der(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _read_certs(path: Path) -> bytes:
    data = path.read_bytes()
    if not x509.load_pem_x509_certificates(data):
        raise ValueError("holds no certificate")
    return data


def _certificate(name: str, directory: Path) -> secret_pb2.Secret | None:
    cert_file, key_file = _first(directory, CERT_FILES), _first(directory, KEY_FILES)
    if cert_file is None or key_file is None:
        return None
    chain = _read_certs(cert_file)
    key_bytes = key_file.read_bytes()
    try:
        key = load_pem_private_key(key_bytes, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{key_file.name}: not an unencrypted PEM private key") from None
    leaf = x509.load_pem_x509_certificates(chain)[0]
    if key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo) != _public_der(leaf):
        raise ValueError(f"{key_file.name}: does not match the first certificate of {cert_file.name}")
    return secret_pb2.Secret(name=resource_name(name), tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=chain),
        private_key=base_pb2.DataSource(inline_bytes=key_bytes)))


def _validation(sds_name: str, directory: Path) -> secret_pb2.Secret | None:
    ca_file = _first(directory, CA_FILES)
    if ca_file is None:
        return None
    context = common_pb2.CertificateValidationContext(trusted_ca=base_pb2.DataSource(inline_bytes=_read_certs(ca_file)))
    crl_file = _first(directory, CRL_FILES)
    if crl_file is not None:
        context.crl.CopyFrom(base_pb2.DataSource(inline_bytes=crl_file.read_bytes()))
    return secret_pb2.Secret(name=sds_name, validation_context=context)


def _directories(namespace_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in namespace_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []


def load_credentials(namespace_dir: Path) -> tuple[dict[str, secret_pb2.Secret], list[CredentialError]]:
    """Every readable secret of one namespace's directory by SDS name, and the ones left out (why)."""
    secrets: dict[str, secret_pb2.Secret] = {}
    errors: list[CredentialError] = []
    separate_ca: dict[str, secret_pb2.Secret] = {}
    for directory in _directories(namespace_dir):
        name = directory.name
        try:
            if name.endswith(CA_SUFFIX):
                ca = _validation(resource_name(name), directory)
                if ca is not None:
                    separate_ca[ca.name] = ca
                continue
            cert = _certificate(name, directory)
            if cert is not None:
                secrets[cert.name] = cert
            ca = _validation(ca_resource_name(name), directory)
            if ca is not None:
                secrets[ca.name] = ca
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            errors.append(CredentialError(name, f"{directory}: {reason}"))
    secrets.update(separate_ca)  # an explicit <name>-cacert directory wins over <name>/ca.crt
    return secrets, errors


def scan_fingerprint(namespace_dir: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What a change of any secret file changes: (path, size, mtime, inode) of each candidate file."""
    out: list[tuple[str, int, int, int]] = []
    for directory in _directories(namespace_dir):
        for path in _candidates(directory):
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _candidates(directory: Path) -> Iterator[Path]:
    for name in _ALL_FILES:
        yield directory / name
