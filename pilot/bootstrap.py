"""The Envoy bootstrap for a sidecar or gateway: who it is, where pilot is, its fixed listeners.

Everything else (clusters, listeners, routes) arrives over ADS, so the bootstrap is small and
the same for every proxy of a workload.

With a workload agent (`sds_socket`), the bootstrap also holds Istio's `sds-grpc` cluster (the
agent's SDS over a Unix socket), whose secrets `default` (the workload's key and certificate) and
`ROOTCA` (the mesh roots) any TLS context may name; with `pilot_tls`, the xDS cluster itself
uses them: mutual TLS to pilot's authenticated port, pilot's certificate checked for `pilot_san`.
The names are Istio's and are repeated here, not imported (pilot imports no CA code).

`sidecar_bootstrap` is a pure function of its spec and builds protobuf messages, never text
templates; `render` turns the result into YAML or JSON.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    backoff_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.overload.v3 import overload_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.resource_monitors.downstream_connections.v3 import downstream_connections_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, duration_pb2, json_format, message, struct_pb2, wrappers_pb2

from pilot.model.proxy import (
    META_BIND_ADDRESS,
    META_INSTANCE_IPS,
    META_LABELS,
    META_NAMESPACE,
    META_SERVICE_ACCOUNT,
    META_WORKLOAD,
    META_WORKLOAD_CERTS,
    ProxyKind,
)
from pilot.runtime_limits import ENVOY_RE2_MAX_PROGRAM_SIZE

ADMIN_PORT = 15000
HEALTH_PORT = 15021
STATS_PORT = 15090
# Names of static resources; pilot must never send an xDS resource with one of these names.
XDS_CLUSTER = "xds-grpc"
ADMIN_CLUSTER = "envoy-admin"
HEALTH_LISTENER = "health"
STATS_LISTENER = "prometheus-stats"
# The workload agent's SDS (Istio's names): the cluster, the workload's certificate, the mesh roots.
SDS_CLUSTER = "sds-grpc"
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"
# The name pilot's serving certificate carries and sidecars check (istiod's in Istio).
PILOT_SAN = "istiod.istio-system.svc"
MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path, with its NUL
HEALTH_PATH = "/healthz/ready"
STATS_PATH = "/stats/prometheus"

_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

Format = Literal["yaml", "json"]


class BootstrapError(ValueError):
    """A BootstrapSpec field cannot produce a working bootstrap; the message names the field."""


@dataclass(frozen=True)
class BootstrapSpec:
    """Who the proxy is and where pilot is: the only inputs of a bootstrap.

    `address` is the workload's loopback address; the proxy binds its admin, health and stats
    listeners there, so many sidecars share one machine without port clashes.
    """

    namespace: str
    workload: str
    address: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    service_account: str = "default"
    kind: ProxyKind = ProxyKind.SIDECAR
    pilot_host: str = "127.0.0.1"
    pilot_port: int = 15010
    cluster_domain: str = "cluster.local"
    # How long Envoy waits for its first CDS/LDS before going LIVE without them.
    initial_fetch_timeout_s: float = 15.0
    # The workload agent's SDS socket: adds the `sds-grpc` cluster (secrets `default`, `ROOTCA`).
    sds_socket: str | None = None
    # Mutual TLS to pilot (its authenticated port) with the agent's `default` and `ROOTCA`.
    pilot_tls: bool = False
    pilot_san: str = PILOT_SAN
    # The ADS variant the proxy speaks: incremental (delta), Istio's default since 1.22, or state
    # of the world (Istio's `ISTIO_DELTA_XDS=false`). See `_dynamic_resources`.
    delta_xds: bool = True

    def __post_init__(self) -> None:
        for name in ("namespace", "workload"):
            if not _NAME_RE.match(getattr(self, name)):
                raise BootstrapError(f"{name} {getattr(self, name)!r} must be a DNS label (a-z, 0-9, '-')")
        try:
            ip = ipaddress.ip_address(self.address)
        except ValueError as exc:
            raise BootstrapError(f"address {self.address!r} is not an IP address") from exc
        if not ip.is_loopback:
            raise BootstrapError(f"address {self.address!r} must be loopback: admin binds to it")
        if not self.pilot_host or not 0 < self.pilot_port < 65536:
            raise BootstrapError(f"pilot {self.pilot_host}:{self.pilot_port} is not a valid host:port")
        if self.initial_fetch_timeout_s < 0:
            raise BootstrapError("initial_fetch_timeout_s must not be negative")
        if self.sds_socket is not None and not 0 < len(self.sds_socket.encode()) <= MAX_SOCKET_PATH:
            raise BootstrapError(f"sds_socket {self.sds_socket!r} must be a Unix socket path of 1 to "
                                 f"{MAX_SOCKET_PATH} bytes")
        if self.pilot_tls and self.sds_socket is None:
            raise BootstrapError("pilot_tls needs sds_socket: the client certificate comes from the workload agent")
        if self.pilot_tls and not self.pilot_san:
            raise BootstrapError("pilot_san must name pilot's certificate when pilot_tls is set")
        object.__setattr__(self, "kind", ProxyKind(self.kind))
        object.__setattr__(self, "labels", MappingProxyType({str(k): str(v) for k, v in self.labels.items()}))

    @property
    def node_id(self) -> str:
        """Istio's `<kind>~<ip>~<workload>.<namespace>~<namespace>.svc.<domain>`."""
        dns = f"{self.namespace}.svc.{self.cluster_domain}"
        return f"{self.kind.value}~{self.address}~{self.workload}.{self.namespace}~{dns}"

    @property
    def node_cluster(self) -> str:
        return f"{self.workload}.{self.namespace}"


def parse_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split `host:port` (or `[v6]:port`); raise BootstrapError naming the text if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "" if default_port is None else str(default_port)
    host = host.removeprefix("[").removesuffix("]")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise BootstrapError(f"{text!r} is not host:port")
    return host, int(port)


def sidecar_bootstrap(spec: BootstrapSpec) -> bootstrap_pb2.Bootstrap:
    """The complete bootstrap for `spec`; pure and deterministic (same spec, same bytes)."""
    return bootstrap_pb2.Bootstrap(
        node=_node(spec),
        admin=bootstrap_pb2.Admin(address=_socket(spec.address, ADMIN_PORT)),
        dynamic_resources=_dynamic_resources(spec),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(
            clusters=[_xds_cluster(spec), _admin_cluster(spec), *_sds_clusters(spec)],
            listeners=[
                _http_listener(spec, HEALTH_LISTENER, HEALTH_PORT, _health_route()),
                _http_listener(spec, STATS_LISTENER, STATS_PORT, _stats_route()),
            ],
        ),
        overload_manager=_overload_manager(),
        layered_runtime=layered_runtime(),
    )


def layered_runtime() -> bootstrap_pb2.LayeredRuntime:
    """Envoy runtime values pilot's validation relies on, as one static layer (plus admin's).

    `re2.max_program_size.error_level`: Envoy refuses a regex whose RE2 program is larger (100
    by default); Istio's bootstrap raises it to 32768, so Istio users' regexes load here too, and
    pilot's own check (`pilot.api.route_common.regex_problem`) applies the same number.
    """
    static = struct_pb2.Struct()
    static.update({"re2.max_program_size.error_level": ENVOY_RE2_MAX_PROGRAM_SIZE})
    return bootstrap_pb2.LayeredRuntime(layers=[
        bootstrap_pb2.RuntimeLayer(name="meshctl", static_layer=static),
        bootstrap_pb2.RuntimeLayer(name="admin", admin_layer=bootstrap_pb2.RuntimeLayer.AdminLayer()),
    ])


# Envoy's "global downstream connections" monitor, at the largest value (as Istio sets it): no
# limit is imposed, but Envoy stops warning at every start that none is configured.
MAX_DOWNSTREAM_CONNECTIONS = 2**31 - 1


def _overload_manager() -> overload_pb2.OverloadManager:
    config = downstream_connections_pb2.DownstreamConnectionsConfig(
        max_active_downstream_connections=MAX_DOWNSTREAM_CONNECTIONS)
    return overload_pb2.OverloadManager(resource_monitors=[overload_pb2.ResourceMonitor(
        name="envoy.resource_monitors.global_downstream_max_connections", typed_config=_any(config))])


def render(bootstrap: bootstrap_pb2.Bootstrap, fmt: Format = "yaml") -> str:
    """Envoy-readable text of a bootstrap, with proto field names as Envoy's docs spell them."""
    data = json.loads(json_format.MessageToJson(bootstrap, preserving_proto_field_name=True))
    # Struct is a protobuf map and iterates in hash order; sort it so equal specs give equal text.
    node = data.get("node", {})
    if "metadata" in node:
        node["metadata"] = _sorted_tree(node["metadata"])
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    raise BootstrapError(f"format {fmt!r} is not yaml or json")


def _sorted_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted_tree(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_tree(item) for item in value]
    return value


def _node(spec: BootstrapSpec) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            META_NAMESPACE: spec.namespace,
            META_WORKLOAD: spec.workload,
            META_LABELS: dict(sorted(spec.labels.items())),
            META_SERVICE_ACCOUNT: spec.service_account,
            META_INSTANCE_IPS: spec.address,
            META_BIND_ADDRESS: spec.address,
        }
    )
    if spec.sds_socket is not None:  # the agent serves `default`/`ROOTCA`: pilot may generate mesh TLS
        metadata.update({META_WORKLOAD_CERTS: "true"})
    return base_pb2.Node(id=spec.node_id, cluster=spec.node_cluster, metadata=metadata)


def _dynamic_resources(spec: BootstrapSpec) -> bootstrap_pb2.Bootstrap.DynamicResources:
    """ADS over one gRPC stream; a short backoff so a restarted pilot is found again quickly.

    Delta by default, as Istio since 1.22: a change sends each proxy only the resources that
    changed, and its ACKs name nothing. In state of the world an Envoy's EDS ACK repeats every
    ClusterLoadAssignment name it watches: 148 KB per proxy at 1,000 services, read back from
    every proxy after each endpoint change (`benchmarks/README.md`).
    """
    grpc = grpc_service_pb2.GrpcService(
        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(
            cluster_name=XDS_CLUSTER,
            retry_policy=base_pb2.RetryPolicy(
                retry_back_off=backoff_pb2.BackoffStrategy(
                    base_interval=_ms(200),
                    max_interval=_ms(2000),
                ),
            ),
        ),
    )
    source = config_source_pb2.ApiConfigSource
    ads = source(
        api_type=source.DELTA_GRPC if spec.delta_xds else source.GRPC,
        transport_api_version=config_source_pb2.V3,
        grpc_services=[grpc],
        set_node_on_first_message_only=True,
    )
    return bootstrap_pb2.Bootstrap.DynamicResources(
        ads_config=ads,
        cds_config=_ads_source(spec),
        lds_config=_ads_source(spec),
    )


def _ads_source(spec: BootstrapSpec) -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
        initial_fetch_timeout=_ms(round(spec.initial_fetch_timeout_s * 1000)),
    )


def _xds_cluster(spec: BootstrapSpec) -> cluster_pb2.Cluster:
    """Pilot over HTTP/2 with TCP and HTTP/2 keepalives, so a dead peer is noticed in seconds."""
    keepalive = protocol_pb2.KeepaliveSettings(interval=_ms(30_000), timeout=_ms(10_000))
    protocol = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions(connection_keepalive=keepalive),
        ),
    )
    cluster = _static_cluster(XDS_CLUSTER, spec.pilot_host, spec.pilot_port)
    if not _is_ip(spec.pilot_host):
        cluster.type = cluster_pb2.Cluster.STRICT_DNS
        cluster.dns_lookup_family = cluster_pb2.Cluster.V4_PREFERRED
    cluster.typed_extension_protocol_options[_HTTP_PROTOCOL_OPTIONS].CopyFrom(_any(protocol))
    cluster.upstream_connection_options.tcp_keepalive.CopyFrom(
        address_pb2.TcpKeepalive(
            keepalive_probes=_u32(3),
            keepalive_time=_u32(30),
            keepalive_interval=_u32(10),
        ),
    )
    if spec.pilot_tls:
        cluster.transport_socket.CopyFrom(base_pb2.TransportSocket(
            name="envoy.transport_sockets.tls", typed_config=_any(_pilot_tls_context(spec))))
    return cluster


def sds_secret(name: str) -> secret_pb2.SdsSecretConfig:
    """A secret from the workload agent: gRPC SDS on the `sds-grpc` cluster, waiting for it without a timeout."""
    source = config_source_pb2.ApiConfigSource(
        api_type=config_source_pb2.ApiConfigSource.GRPC,
        transport_api_version=config_source_pb2.V3,
        set_node_on_first_message_only=True,
        grpc_services=[grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=SDS_CLUSTER))],
    )
    return secret_pb2.SdsSecretConfig(name=name, sds_config=config_source_pb2.ConfigSource(
        api_config_source=source, resource_api_version=config_source_pb2.V3, initial_fetch_timeout=_ms(0)))


def _pilot_tls_context(spec: BootstrapSpec) -> tls_pb2.UpstreamTlsContext:
    """Client side of mutual TLS to pilot: our `default`, pilot's certificate checked against `ROOTCA` + its SAN."""
    san = common_pb2.SubjectAltNameMatcher(san_type=common_pb2.SubjectAltNameMatcher.DNS,
                                           matcher=string_pb2.StringMatcher(exact=spec.pilot_san))
    validation = tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
        default_validation_context=common_pb2.CertificateValidationContext(match_typed_subject_alt_names=[san]),
        validation_context_sds_secret_config=sds_secret(ROOT_SECRET),
    )
    return tls_pb2.UpstreamTlsContext(
        sni=spec.pilot_san,
        common_tls_context=tls_pb2.CommonTlsContext(
            alpn_protocols=["h2"],
            tls_certificate_sds_secret_configs=[sds_secret(WORKLOAD_SECRET)],
            combined_validation_context=validation,
        ),
    )


def _sds_clusters(spec: BootstrapSpec) -> list[cluster_pb2.Cluster]:
    """The agent's SDS over HTTP/2 on its Unix socket (none without an agent)."""
    if spec.sds_socket is None:
        return []
    protocol = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions(),
        ),
    )
    endpoint = endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
        address=address_pb2.Address(pipe=address_pb2.Pipe(path=spec.sds_socket))))
    cluster = cluster_pb2.Cluster(
        name=SDS_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=_ms(1000),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=SDS_CLUSTER,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])],
        ),
    )
    cluster.typed_extension_protocol_options[_HTTP_PROTOCOL_OPTIONS].CopyFrom(_any(protocol))
    return [cluster]


def _admin_cluster(spec: BootstrapSpec) -> cluster_pb2.Cluster:
    """Envoy's own admin, reached by the health and stats listeners without exposing all of it."""
    return _static_cluster(ADMIN_CLUSTER, spec.address, ADMIN_PORT)


def _static_cluster(name: str, host: str, port: int) -> cluster_pb2.Cluster:
    endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=_socket(host, port)),
    )
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=_ms(1000),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])],
        ),
    )


def _health_route() -> route_components_pb2.Route:
    """`/healthz/ready` asks admin `/ready`, so it answers 200 only while Envoy is LIVE."""
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(path=HEALTH_PATH),
        route=route_components_pb2.RouteAction(cluster=ADMIN_CLUSTER, prefix_rewrite="/ready"),
    )


def _stats_route() -> route_components_pb2.Route:
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=STATS_PATH),
        route=route_components_pb2.RouteAction(cluster=ADMIN_CLUSTER),
    )


def _http_listener(
    spec: BootstrapSpec, name: str, port: int, route: route_components_pb2.Route
) -> listener_pb2.Listener:
    """A plain-HTTP listener on the workload's address serving one route; other paths get 404."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        route_config=route_pb2.RouteConfiguration(
            name=name,
            virtual_hosts=[route_components_pb2.VirtualHost(name=name, domains=["*"], routes=[route])],
        ),
        http_filters=[
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())),
        ],
    )
    network_filter = listener_components_pb2.Filter(
        name="envoy.filters.network.http_connection_manager",
        typed_config=_any(hcm),
    )
    return listener_pb2.Listener(
        name=name,
        address=_socket(spec.address, port),
        filter_chains=[listener_components_pb2.FilterChain(filters=[network_filter])],
    )


def _socket(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def _any(msg: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


def _ms(millis: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=millis // 1000, nanos=(millis % 1000) * 1_000_000)


def _u32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
