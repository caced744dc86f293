"""Client TLS to upstreams (DestinationRule ``tls``): SIMPLE and MUTUAL with file paths.

DISABLE sends plaintext. ISTIO_MUTUAL uses the mesh certificates, for proxies that have them
(`pilot.translate.mtls`, applied by `pilot.translate.clusters`); from others it stays plaintext.
Without ``caCertificates`` the server is checked against the system CA bundle, as Istio does;
``insecureSkipVerify`` checks nothing.
"""

from __future__ import annotations

from typing import Any

from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

from pilot.model.policy import ClientTls

TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
_SAN = common_pb2.SubjectAltNameMatcher


def apply_upstream_tls(cluster: Any, tls: ClientTls | None, http2: bool = False) -> None:
    if tls is None or tls.mode not in ("SIMPLE", "MUTUAL"):
        return
    context = tls_pb2.UpstreamTlsContext(sni=tls.sni or "")
    common = context.common_tls_context
    if http2:
        common.alpn_protocols.append("h2")
    if tls.mode == "MUTUAL" and tls.client_certificate and tls.private_key:
        cert = common.tls_certificates.add()
        cert.certificate_chain.filename = tls.client_certificate
        cert.private_key.filename = tls.private_key
    if not tls.insecure_skip_verify:
        common.validation_context.CopyFrom(_validation(tls))
    cluster.transport_socket.name = TLS_TRANSPORT_SOCKET
    cluster.transport_socket.typed_config.Pack(context)


def _validation(tls: ClientTls) -> Any:
    out = common_pb2.CertificateValidationContext()
    if tls.ca_certificates:
        out.trusted_ca.filename = tls.ca_certificates
    else:
        out.system_root_certs.SetInParent()
    if tls.ca_crl:
        out.crl.filename = tls.ca_crl
    for san in tls.subject_alt_names:
        kind = _SAN.URI if "://" in san else _SAN.DNS
        out.match_typed_subject_alt_names.append(_SAN(san_type=kind, matcher=string_pb2.StringMatcher(exact=san)))
    return out
