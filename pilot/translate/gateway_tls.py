"""DownstreamTlsContext for a gateway server that terminates TLS, from certificate files.

Envoy reads the files itself (filename data sources) and re-reads nothing on its own: a
rotated certificate needs a config push, which any change of the Gateway triggers.
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

from pilot.model.gateway import GatewayServer, ServerTls
from pilot.translate.mtls import mesh_common_context

TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
_VERSIONS = {
    "TLS_AUTO": common_pb2.TlsParameters.TLS_AUTO,
    "TLSV1_0": common_pb2.TlsParameters.TLSv1_0,
    "TLSV1_1": common_pb2.TlsParameters.TLSv1_1,
    "TLSV1_2": common_pb2.TlsParameters.TLSv1_2,
    "TLSV1_3": common_pb2.TlsParameters.TLSv1_3,
}
_SAN_TYPES = (
    common_pb2.SubjectAltNameMatcher.DNS,
    common_pb2.SubjectAltNameMatcher.URI,
)


def downstream_tls_context(tls: ServerTls, alpn: tuple[str, ...] = ("h2", "http/1.1")) -> Any:
    """SIMPLE: serve the certificate; MUTUAL: also require a client certificate signed by the CA
    (and, when given, not revoked by the CRL and matching a pinned key or certificate hash);
    OPTIONAL_MUTUAL: verify a client certificate only when one is presented; ISTIO_MUTUAL: the
    gateway's own mesh certificate and roots from its workload agent (SDS), and a client
    certificate of the mesh required."""
    if tls.mode == "ISTIO_MUTUAL":
        context = tls_pb2.DownstreamTlsContext(common_tls_context=mesh_common_context(alpn))
        _set_versions(context.common_tls_context.tls_params, tls)
        context.require_client_certificate.value = True
        return context
    common = tls_pb2.CommonTlsContext(alpn_protocols=list(alpn))
    cert = common.tls_certificates.add()
    cert.certificate_chain.CopyFrom(base_pb2.DataSource(filename=tls.server_certificate))
    cert.private_key.CopyFrom(base_pb2.DataSource(filename=tls.private_key))
    _set_versions(common.tls_params, tls)
    context = tls_pb2.DownstreamTlsContext(common_tls_context=common)
    if tls.mode in ("MUTUAL", "OPTIONAL_MUTUAL") and tls.ca_certificates:
        validation = context.common_tls_context.validation_context  # the message holds a copy of `common`
        validation.trusted_ca.CopyFrom(base_pb2.DataSource(filename=tls.ca_certificates))
        for san in sorted(tls.subject_alt_names):
            for san_type in _SAN_TYPES:
                validation.match_typed_subject_alt_names.add(
                    san_type=san_type, matcher=string_pb2.StringMatcher(exact=san)
                )
        if tls.ca_crl:
            validation.crl.CopyFrom(base_pb2.DataSource(filename=tls.ca_crl))
        # Pins: a client certificate matching any SPKI or any hash is accepted (Envoy's and Istio's rule).
        validation.verify_certificate_spki.extend(tls.spki_pins)
        validation.verify_certificate_hash.extend(tls.hash_pins)
        context.require_client_certificate.value = tls.mode == "MUTUAL"
    return context


def _set_versions(params: Any, tls: ServerTls) -> None:
    params.tls_minimum_protocol_version = _VERSIONS[tls.min_version]
    params.tls_maximum_protocol_version = _VERSIONS[tls.max_version]
    params.cipher_suites.extend(tls.cipher_suites)


def mesh_tls_servers(servers: list[GatewayServer], mtls: bool) -> list[GatewayServer]:
    """`servers` without the ISTIO_MUTUAL ones unless the gateway has mesh certificates (`mtls`):
    without its agent's `sds-grpc` cluster Envoy would reject the whole listener."""
    return servers if mtls else [s for s in servers if s.tls is None or s.tls.mode != "ISTIO_MUTUAL"]


def transport_socket(tls: ServerTls, alpn: tuple[str, ...] = ("h2", "http/1.1")) -> Any:
    socket = base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET)
    socket.typed_config.Pack(downstream_tls_context(tls, alpn))
    return socket
