"""Mesh TLS contexts: Istio mutual TLS between sidecars, with certificates from the workload agent.

Only for proxies whose class says ``mtls`` (their bootstrap has the ``sds-grpc`` cluster to a
workload agent): every context names the agent's secrets ``default`` (the workload certificate
and key) and ``ROOTCA`` (the mesh roots) over SDS, so Envoy picks up renewed certificates and
new roots without a config push. Pilot never sees a private key and does not import citadel;
the names are the contract (Istio's, too).

- Inbound (`secure_inbound`): per port, the workload's PeerAuthentication mode. STRICT: one
  chain that requires a client certificate chained to the mesh roots; PERMISSIVE: a TLS
  inspector and two chains, mutual TLS for clients offering Istio's ALPN values and plaintext
  for ``raw_buffer`` (TCP ports also pass other TLS through to the app); DISABLE: the plaintext
  chain alone. HTTP chains forward the caller's
  identity in ``X-Forwarded-Client-Cert`` (APPEND_FORWARD with subject, URI and DNS, as Istio's
  sidecar inbound does).
- Outbound (`apply_mesh_tls`): a DestinationRule ``ISTIO_MUTUAL`` sets the cluster's transport
  socket; with no DestinationRule TLS at all (auto mTLS), Istio's transport-socket matches pick
  mutual TLS for endpoints labelled ``tlsMode: istio`` in their ``envoy.transport_socket_match``
  metadata (`tls_endpoint_metadata`) and plaintext for the others. Either way the client checks
  the server's SPIFFE identity against the destination's service accounts.

Cost: a few messages per cluster and inbound port, built once per mesh version and shared.
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import struct_pb2

from pilot.model.mtls import DISABLE, ISTIO_TLS_MODE, STRICT
from pilot.translate import names

SDS_CLUSTER = "sds-grpc"  # the bootstrap's cluster to the workload agent's Unix socket
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"
TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
RAW_BUFFER = "envoy.transport_sockets.raw_buffer"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
TRANSPORT_SOCKET_MATCH = "envoy.transport_socket_match"  # endpoint metadata key Envoy matches on
# What Istio's clients offer, and what its inbound mutual-TLS chains accept.
CLIENT_ALPN = ("istio-peer-exchange", "istio")
MESH_ALPNS = ("istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2")
SERVER_HTTP_ALPN = ("h2", "http/1.1")


def sds_config() -> Any:
    """The agent, over gRPC on `SDS_CLUSTER`; ``initial_fetch_timeout`` 0: wait for it."""
    source = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.ApiVersion.V3)
    api = source.api_config_source
    api.api_type = config_source_pb2.ApiConfigSource.GRPC
    api.transport_api_version = config_source_pb2.ApiVersion.V3
    api.set_node_on_first_message_only = True
    api.grpc_services.add().envoy_grpc.cluster_name = SDS_CLUSTER
    source.initial_fetch_timeout.FromSeconds(0)
    return source


def mesh_common_context(alpn: tuple[str, ...], sans: tuple[str, ...] = ()) -> Any:
    """Our certificate and the mesh roots from the agent; peers must present one of `sans` (URI)."""
    common = tls_pb2.CommonTlsContext(alpn_protocols=list(alpn))
    common.tls_certificate_sds_secret_configs.append(
        secret_pb2.SdsSecretConfig(name=WORKLOAD_SECRET, sds_config=sds_config())
    )
    combined = common.combined_validation_context
    combined.default_validation_context.SetInParent()
    for san in sorted(sans):
        combined.default_validation_context.match_typed_subject_alt_names.add(
            san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=string_pb2.StringMatcher(exact=san)
        )
    combined.validation_context_sds_secret_config.name = ROOT_SECRET
    combined.validation_context_sds_secret_config.sds_config.CopyFrom(sds_config())
    return common


def upstream_socket(sni: str, sans: tuple[str, ...], http2: bool) -> Any:
    """The client side of Istio mutual TLS to one cluster."""
    alpn = (*CLIENT_ALPN, "h2") if http2 else CLIENT_ALPN
    context = tls_pb2.UpstreamTlsContext(sni=sni, common_tls_context=mesh_common_context(alpn, sans))
    socket = base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET)
    socket.typed_config.Pack(context)
    return socket


def downstream_socket(alpn: tuple[str, ...]) -> Any:
    """The server side: a client certificate chained to the mesh roots is required."""
    context = tls_pb2.DownstreamTlsContext(common_tls_context=mesh_common_context(alpn))
    context.require_client_certificate.value = True
    socket = base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET)
    socket.typed_config.Pack(context)
    return socket


def sni(port: int, subset: str, host: str) -> str:
    """Istio's SNI for mesh traffic: ``outbound_.<port>_.<subset>_.<host>``."""
    return f"outbound_.{port}_.{subset}_.{host}"


def apply_mesh_tls(cluster: Any, mode: str | None, sni_name: str, sans: tuple[str, ...], http2: bool) -> None:
    """`mode` ISTIO_MUTUAL: always mutual TLS; None (auto mTLS): mutual TLS to endpoints marked
    ``tlsMode: istio``, plaintext to the rest; anything else: the DestinationRule decided."""
    if mode == "ISTIO_MUTUAL":
        cluster.transport_socket.CopyFrom(upstream_socket(sni_name, sans, http2))
    elif mode is None:
        mtls = cluster.transport_socket_matches.add(name=f"tlsMode-{ISTIO_TLS_MODE}")
        mtls.match.fields["tlsMode"].string_value = ISTIO_TLS_MODE
        mtls.transport_socket.CopyFrom(upstream_socket(sni_name, sans, http2))
        plain = cluster.transport_socket_matches.add(name="tlsMode-disabled")
        plain.match.SetInParent()
        plain.transport_socket.name = RAW_BUFFER
        plain.transport_socket.typed_config.Pack(raw_buffer_pb2.RawBuffer())


def tls_endpoint_metadata(lb_endpoint: Any) -> Any:
    """Mark an endpoint as a sidecar that accepts Istio mutual TLS (auto mTLS picks TLS for it)."""
    meta = struct_pb2.Struct()
    meta.fields["tlsMode"].string_value = ISTIO_TLS_MODE
    lb_endpoint.metadata.filter_metadata[TRANSPORT_SOCKET_MATCH].CopyFrom(meta)
    return lb_endpoint


def secure_inbound(plain: Any, http: bool, mode: str) -> Any:
    """The inbound listener `plain` (one plaintext chain) under PeerAuthentication `mode`."""
    listener = listener_pb2.Listener()
    listener.CopyFrom(plain)
    chain = listener.filter_chains[0]
    if http:
        _forward_client_cert(chain)
    if mode == DISABLE:
        return listener
    del listener.filter_chains[:]
    tls_chain = lc.FilterChain(
        filters=list(chain.filters), transport_socket=downstream_socket(SERVER_HTTP_ALPN if http else CLIENT_ALPN)
    )
    tls_chain.filter_chain_match.transport_protocol = "tls"
    inspector = listener.listener_filters.add(name=TLS_INSPECTOR)
    inspector.typed_config.Pack(tls_inspector_pb2.TlsInspector())
    listener.continue_on_listener_filters_timeout = True  # a server-first protocol still gets through
    if mode == STRICT:
        listener.filter_chains.append(tls_chain)
        return listener
    # PERMISSIVE
    tls_chain.filter_chain_match.application_protocols.extend(MESH_ALPNS)
    plain_chain = lc.FilterChain(filters=list(chain.filters))
    plain_chain.filter_chain_match.transport_protocol = "raw_buffer"
    listener.filter_chains.extend([tls_chain, plain_chain])
    if not http:
        # TLS that is not Istio's (the app terminates it): passed through to the app, as Istio does,
        # under the same network filters (RBAC included). On HTTP ports such TLS matches no chain.
        passthrough = lc.FilterChain(filters=list(chain.filters))
        passthrough.filter_chain_match.transport_protocol = "tls"
        listener.filter_chains.append(passthrough)
    return listener


def _forward_client_cert(chain: Any) -> None:
    """Istio's sidecar inbound XFCC: append the caller's subject, URI and DNS SANs, forward the rest."""
    for flt in chain.filters:
        if flt.name != names.HCM_FILTER:
            continue
        hcm = hcm_pb2.HttpConnectionManager()
        flt.typed_config.Unpack(hcm)
        hcm.forward_client_cert_details = hcm_pb2.HttpConnectionManager.APPEND_FORWARD
        details = hcm.set_current_client_cert_details
        details.subject.value = True
        details.uri = True
        details.dns = True
        flt.typed_config.Pack(hcm)
