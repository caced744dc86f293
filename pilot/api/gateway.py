"""Gateway: the ports, protocols, hosts and TLS a router proxy (ingress gateway) exposes.

Validation follows Istio's: at least one server, each with a port protocol and at least one
``[namespace/]dnsName`` host; HTTPS and TLS servers need ``tls``; certificate files are required
for SIMPLE (and a CA bundle for MUTUAL) unless a ``credentialName`` is given (a Secret name,
``kubernetes://`` prefix optional; served from the local secret store by the gateway's agent:
see `citadel.agent.credentials`); port names are unique across servers.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from enum import StrEnum
from typing import Literal

from pydantic import Field

from pilot.api.base import ApiObject, IstioModel
from pilot.api.common import Port
from pilot.api.errors import FieldIssue
from pilot.api.hosts import GatewayHost
from pilot.api.service_entry import HTTP_PROTOCOLS

# Server protocols served with an HTTP connection manager (plus HTTPS once TLS is terminated).
HTTP_SERVER_PROTOCOLS = HTTP_PROTOCOLS
TLS_PROTOCOLS = frozenset({"HTTPS", "TLS"})


class ServerTLSMode(StrEnum):
    PASSTHROUGH = "PASSTHROUGH"  # Istio's default (enum zero value)
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    AUTO_PASSTHROUGH = "AUTO_PASSTHROUGH"
    ISTIO_MUTUAL = "ISTIO_MUTUAL"
    OPTIONAL_MUTUAL = "OPTIONAL_MUTUAL"


class TLSProtocolVersion(StrEnum):
    TLS_AUTO = "TLS_AUTO"
    TLSV1_0 = "TLSV1_0"
    TLSV1_1 = "TLSV1_1"
    TLSV1_2 = "TLSV1_2"
    TLSV1_3 = "TLSV1_3"


# credentialName: a Kubernetes Secret name (DNS-1123 subdomain), optionally with Istio's `kubernetes://` prefix.
CREDENTIAL_PREFIX = "kubernetes://"
_SECRET_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_HASH = re.compile(r"[0-9A-Fa-f]{64}|[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){31}")


def _is_spki_pin(value: str) -> bool:
    try:
        return len(base64.b64decode(value, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


class ServerTLSSettings(IstioModel):
    https_redirect: bool = False
    mode: ServerTLSMode = ServerTLSMode.PASSTHROUGH
    server_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    ca_crl: str | None = None
    credential_name: str | None = None
    credential_names: tuple[str, ...] = ()
    tls_certificates: tuple[dict[str, str], ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    verify_certificate_spki: tuple[str, ...] = ()
    verify_certificate_hash: tuple[str, ...] = ()
    min_protocol_version: TLSProtocolVersion = TLSProtocolVersion.TLS_AUTO
    max_protocol_version: TLSProtocolVersion = TLSProtocolVersion.TLS_AUTO
    cipher_suites: tuple[str, ...] = ()

    @property
    def terminates(self) -> bool:
        """Whether the gateway itself terminates TLS (as opposed to passing it through)."""
        return self.mode in (ServerTLSMode.SIMPLE, ServerTLSMode.MUTUAL, ServerTLSMode.OPTIONAL_MUTUAL)

    def problems(self, path: str) -> Iterator[FieldIssue]:
        credentials = [("credentialName", self.credential_name)] if self.credential_name else []
        credentials += [(f"credentialNames[{i}]", n) for i, n in enumerate(self.credential_names)]
        for field, name in credentials:
            if not _SECRET_NAME.fullmatch(name.removeprefix(CREDENTIAL_PREFIX)):
                yield FieldIssue(f"{path}.{field}", f"{name!r} is not a secret name ([kubernetes://]name: lower-case "
                                                    "letters, digits, '-' and '.', at most 253 characters)")
        if self.mode == ServerTLSMode.ISTIO_MUTUAL and credentials:
            yield FieldIssue(f"{path}.credentialName", "ISTIO_MUTUAL TLS cannot have an associated credentialName")
        if not self.terminates or credentials:
            return
        mode = self.mode.value
        if not self.server_certificate:
            yield FieldIssue(f"{path}.serverCertificate", f"{mode} TLS requires a server certificate")
        if not self.private_key:
            yield FieldIssue(f"{path}.privateKey", f"{mode} TLS requires a private key")
        if self.mode != ServerTLSMode.SIMPLE and not self.ca_certificates:
            yield FieldIssue(f"{path}.caCertificates", f"{mode} TLS requires a client CA bundle")
        for i, value in enumerate(self.verify_certificate_hash):
            if not _HASH.fullmatch(value):
                yield FieldIssue(f"{path}.verifyCertificateHash[{i}]",
                                 f"{value!r} is not a hex SHA-256 fingerprint (64 hex digits, colons allowed)")
        for i, value in enumerate(self.verify_certificate_spki):
            if not _is_spki_pin(value):
                yield FieldIssue(f"{path}.verifyCertificateSpki[{i}]",
                                 f"{value!r} is not a base64 SHA-256 hash of a public key (44 characters)")

    def advisories(self, path: str) -> Iterator[FieldIssue]:
        if self.terminates and (self.credential_name or self.credential_names) and self.server_certificate:
            yield FieldIssue(f"{path}.serverCertificate",
                             "credentialName is given: the certificate files are ignored (Istio's precedence)")
        client_checks = {"caCrl": self.ca_crl, "verifyCertificateSpki": self.verify_certificate_spki,
                         "verifyCertificateHash": self.verify_certificate_hash}
        if self.mode not in (ServerTLSMode.MUTUAL, ServerTLSMode.OPTIONAL_MUTUAL):
            for name in (n for n, value in client_checks.items() if value):
                yield FieldIssue(f"{path}.{name}",
                                 "checks client certificates: MUTUAL and OPTIONAL_MUTUAL only; ignored")


def _redirect_only(tls: ServerTLSSettings) -> bool:
    return tls.https_redirect and tls.mode == ServerTLSMode.PASSTHROUGH and not tls.server_certificate


class Server(IstioModel):
    port: Port
    hosts: tuple[GatewayHost, ...] = ()
    bind: str | None = None
    default_endpoint: str | None = None
    tls: ServerTLSSettings | None = None
    name: str | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.hosts:
            yield FieldIssue(f"{path}.hosts", "at least one host is required")
        protocol = self.port.protocol
        if protocol is None:
            yield FieldIssue(f"{path}.port.protocol", "required for a Gateway server")
        elif protocol in TLS_PROTOCOLS and self.tls is None:
            yield FieldIssue(f"{path}.tls", f"required for protocol {protocol}")
        elif protocol not in TLS_PROTOCOLS and self.tls is not None and not _redirect_only(self.tls):
            yield FieldIssue(
                f"{path}.tls", f"a plain-text {protocol} server may only set httpsRedirect (use HTTPS to terminate TLS)"
            )


class GatewaySpec(IstioModel):
    selector: dict[str, str] = Field(default_factory=dict)
    servers: tuple[Server, ...] = ()

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.servers:
            yield FieldIssue(f"{path}.servers", "a gateway needs at least one server")
        names: set[str] = set()
        for i, server in enumerate(self.servers):
            name = server.port.name
            if name and name in names:
                yield FieldIssue(f"{path}.servers[{i}].port.name", f"duplicate port name {name!r} among servers")
            names.add(name)


class Gateway(ApiObject):
    KIND = "Gateway"
    kind: Literal["Gateway"]
    spec: GatewaySpec
