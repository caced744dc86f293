"""DownstreamTlsContext for a gateway server that terminates TLS: from certificate files, from
`credentialName` secrets, or (ISTIO_MUTUAL) from the gateway's own mesh certificate.

Files: Envoy reads them itself (filename data sources) and re-reads nothing on its own: a
rotated certificate needs a config push, which any change of the Gateway triggers.
`credentialName`: the context names SDS secrets on the gateway agent's `sds-grpc` cluster, never
a file or a key: ``kubernetes://<name>`` (certificate and key) and, for MUTUAL and
OPTIONAL_MUTUAL, ``kubernetes://<name>-cacert`` (client CA bundle and CRL), Istio's names. The
agent serves them from the local secret store and pushes a rotated certificate itself; pilot
never imports citadel, so these names are the contract (tested on both sides). On Kubernetes
(`over_ads`, the mesh's `credentials_over_ads`), the same names are asked on the ADS stream
instead, as Istio's gateways do: pilot serves them from the cluster's Secrets to authenticated
routers (`pilot.xds.secrets`).
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

from pilot.model.gateway import GatewayServer, ServerTls
from pilot.translate.common import ads_config_source
from pilot.translate.mtls import mesh_common_context, sds_config

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
CREDENTIAL_PREFIX = "kubernetes://"
CA_SUFFIX = "-cacert"
# How long a new listener waits for a credentialName secret before it goes active without it: a
# missing secret then fails only its own server's handshakes (Envoy closes them) instead of
# keeping the whole port's listener warming; the secret is served as soon as it appears.
CREDENTIAL_FETCH_TIMEOUT_S = 5


def credential_secret(name: str) -> str:
    """The SDS name of `credentialName` `name` (the ``kubernetes://`` prefix is optional in the API)."""
    return name if name.startswith(CREDENTIAL_PREFIX) else CREDENTIAL_PREFIX + name


def credential_ca_secret(name: str) -> str:
    """The SDS name of the client CA bundle that goes with `credentialName` `name`."""
    return credential_secret(name) + CA_SUFFIX


def downstream_tls_context(tls: ServerTls, alpn: tuple[str, ...] = ("h2", "http/1.1"),
                           over_ads: bool = False) -> Any:
    """`over_ads`: credentialName secrets come from pilot on the ADS stream, not the gateway's agent.

    SIMPLE: serve the certificate; MUTUAL: also require a client certificate signed by the CA
    (and, when given, not revoked by the CRL and matching a pinned key or certificate hash);
    OPTIONAL_MUTUAL: verify a client certificate only when one is presented; ISTIO_MUTUAL: the
    gateway's own mesh certificate and roots from its workload agent (SDS), and a client
    certificate of the mesh required."""
    if tls.mode == "ISTIO_MUTUAL":
        context = tls_pb2.DownstreamTlsContext(common_tls_context=mesh_common_context(alpn))
        _set_versions(context.common_tls_context.tls_params, tls)
        context.require_client_certificate.value = True
        return context
    if tls.credential_names:
        return _credential_context(tls, alpn, over_ads)
    common = tls_pb2.CommonTlsContext(alpn_protocols=list(alpn))
    cert = common.tls_certificates.add()
    cert.certificate_chain.CopyFrom(base_pb2.DataSource(filename=tls.server_certificate))
    cert.private_key.CopyFrom(base_pb2.DataSource(filename=tls.private_key))
    _set_versions(common.tls_params, tls)
    context = tls_pb2.DownstreamTlsContext(common_tls_context=common)
    if tls.mode in ("MUTUAL", "OPTIONAL_MUTUAL") and tls.ca_certificates:
        validation = context.common_tls_context.validation_context  # the message holds a copy of `common`
        validation.trusted_ca.CopyFrom(base_pb2.DataSource(filename=tls.ca_certificates))
        _client_checks(validation, tls)
        if tls.ca_crl:
            validation.crl.CopyFrom(base_pb2.DataSource(filename=tls.ca_crl))
        context.require_client_certificate.value = tls.mode == "MUTUAL"
    return context


def _credential_sds_config(over_ads: bool) -> Any:
    source = ads_config_source() if over_ads else sds_config()
    source.initial_fetch_timeout.FromSeconds(CREDENTIAL_FETCH_TIMEOUT_S)
    return source


def _credential_context(tls: ServerTls, alpn: tuple[str, ...], over_ads: bool) -> Any:
    """Certificates (one per name: e.g. RSA and ECDSA) and, when clients are verified, the first
    name's CA bundle, all over SDS from the gateway's agent; SANs and pins stay in the static part."""
    common = tls_pb2.CommonTlsContext(alpn_protocols=list(alpn))
    for name in tls.credential_names:
        common.tls_certificate_sds_secret_configs.append(
            secret_pb2.SdsSecretConfig(name=credential_secret(name), sds_config=_credential_sds_config(over_ads)))
    _set_versions(common.tls_params, tls)
    context = tls_pb2.DownstreamTlsContext(common_tls_context=common)
    if tls.mode in ("MUTUAL", "OPTIONAL_MUTUAL"):
        combined = context.common_tls_context.combined_validation_context
        combined.default_validation_context.SetInParent()
        _client_checks(combined.default_validation_context, tls)
        combined.validation_context_sds_secret_config.name = credential_ca_secret(tls.credential_names[0])
        combined.validation_context_sds_secret_config.sds_config.CopyFrom(_credential_sds_config(over_ads))
        context.require_client_certificate.value = tls.mode == "MUTUAL"
    return context


def _client_checks(validation: Any, tls: ServerTls) -> None:
    """SAN matchers and pins on client certificates (the CA and CRL are set by the caller)."""
    for san in sorted(tls.subject_alt_names):
        for san_type in _SAN_TYPES:
            validation.match_typed_subject_alt_names.add(san_type=san_type, matcher=string_pb2.StringMatcher(exact=san))
    # Pins: a client certificate matching any SPKI or any hash is accepted (Envoy's and Istio's rule).
    validation.verify_certificate_spki.extend(tls.spki_pins)
    validation.verify_certificate_hash.extend(tls.hash_pins)


def _set_versions(params: Any, tls: ServerTls) -> None:
    params.tls_minimum_protocol_version = _VERSIONS[tls.min_version]
    params.tls_maximum_protocol_version = _VERSIONS[tls.max_version]
    params.cipher_suites.extend(tls.cipher_suites)


def needs_agent(server: GatewayServer) -> bool:
    """Whether the server's TLS comes over SDS from the gateway's agent (ISTIO_MUTUAL, credentialName)."""
    return server.tls is not None and (server.tls.mode == "ISTIO_MUTUAL" or bool(server.tls.credential_names))


def mesh_tls_servers(servers: list[GatewayServer], mtls: bool) -> list[GatewayServer]:
    """`servers` without the ISTIO_MUTUAL and credentialName ones unless the gateway has an agent
    (`mtls`): without its `sds-grpc` cluster Envoy would reject the whole listener."""
    return servers if mtls else [s for s in servers if not needs_agent(s)]


def transport_socket(tls: ServerTls, alpn: tuple[str, ...] = ("h2", "http/1.1"), over_ads: bool = False) -> Any:
    socket = base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET)
    socket.typed_config.Pack(downstream_tls_context(tls, alpn, over_ads))
    return socket
