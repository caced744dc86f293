"""Clusters: one per (service host, port, subset) outbound, and one per inbound port."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import protocol_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo_pb2

from pilot.model.mesh import MeshSnapshot, Service, ServicePort, TrafficPolicy
from pilot.translate import names
from pilot.translate.common import ads_config_source, lb_endpoint
from pilot.translate.scope import InboundPort, ProxyView

Cluster = cluster_pb2.Cluster
_LB_POLICIES = {
    "ROUND_ROBIN": Cluster.ROUND_ROBIN,
    "LEAST_REQUEST": Cluster.LEAST_REQUEST,
    "LEAST_CONN": Cluster.LEAST_REQUEST,  # Istio's deprecated alias
    "RANDOM": Cluster.RANDOM,
}
DNS_RESOLUTIONS = frozenset({"DNS", "DNS_ROUND_ROBIN"})


def discovery(service: Service) -> str:
    """How a service's clusters find endpoints: "EDS", "DNS" or "ORIGINAL_DST".

    Resolution NONE with selected or inline endpoints uses EDS: a local mesh has no iptables,
    so there is no original destination to pass through to.
    """
    if service.resolution in DNS_RESOLUTIONS:
        return "DNS"
    if service.resolution == "NONE" and service.selector is None and not service.endpoints:
        return "ORIGINAL_DST"
    return "EDS"


def subsets_of(mesh: MeshSnapshot, host: str) -> list[str]:
    """ "" for the whole service, then each DestinationRule subset name in order."""
    rule = mesh.destination_rules.get(host)
    return ["", *(rule.subsets if rule else ())]


def outbound_clusters(mesh: MeshSnapshot) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for service in mesh.services.values():
        rule = mesh.destination_rules.get(service.host)
        for port in service.ports:
            for subset in subsets_of(mesh, service.host):
                policy = rule.policy_for(port.number, subset) if rule else TrafficPolicy()
                name = names.outbound_cluster(port.number, subset, service.host)
                out[name] = _outbound_cluster(name, service, port, policy)
    return out


def _outbound_cluster(name: str, service: Service, port: ServicePort, policy: TrafficPolicy) -> Any:
    cluster = Cluster(name=name)
    kind = discovery(service)
    if kind == "EDS":
        cluster.type = Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(ads_config_source())
        cluster.eds_cluster_config.service_name = name
    elif kind == "DNS":
        cluster.type = Cluster.STRICT_DNS if service.resolution == "DNS" else Cluster.LOGICAL_DNS
        cluster.load_assignment.CopyFrom(_dns_assignment(name, service, port))
    else:
        cluster.type = Cluster.ORIGINAL_DST
        cluster.lb_policy = Cluster.CLUSTER_PROVIDED
    _apply_policy(cluster, policy, port)
    return cluster


def _dns_assignment(name: str, service: Service, port: ServicePort) -> Any:
    """Endpoints given by name for Envoy to resolve: the inline endpoints, else the host itself."""
    targets = [(e.address, e.ports[port.name], e.weight) for e in service.endpoints]
    targets = targets or [(service.host, port.target_port or port.number, 1)]
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    cla.endpoints.add().lb_endpoints.extend(lb_endpoint(h, p, w) for h, p, w in sorted(targets))
    return cla


def _apply_policy(cluster: Any, policy: TrafficPolicy, port: ServicePort) -> None:
    timeout = policy.connect_timeout or timedelta(seconds=names.DEFAULT_CONNECT_TIMEOUT_SECONDS)
    cluster.connect_timeout.FromTimedelta(timeout)
    if policy.lb_policy in _LB_POLICIES and cluster.type != Cluster.ORIGINAL_DST:
        cluster.lb_policy = _LB_POLICIES[policy.lb_policy]
    limits = {
        "max_connections": policy.max_connections,
        "max_pending_requests": policy.max_pending_requests,
        "max_requests": policy.max_requests,
        "max_retries": policy.max_retries,
    }
    if any(v is not None for v in limits.values()):
        thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds()
        for field, value in limits.items():
            if value is not None:
                getattr(thresholds, field).value = value
        cluster.circuit_breakers.thresholds.append(thresholds)
    if port.is_http:
        _set_http_options(cluster, port.is_http2, policy.max_requests_per_connection)


def _set_http_options(cluster: Any, http2: bool, max_requests_per_connection: int | None = None) -> None:
    options = hpo_pb2.HttpProtocolOptions()
    explicit = options.explicit_http_config
    if http2:
        explicit.http2_protocol_options.CopyFrom(protocol_pb2.Http2ProtocolOptions())
    else:
        explicit.http_protocol_options.CopyFrom(protocol_pb2.Http1ProtocolOptions())
    if max_requests_per_connection:
        options.common_http_protocol_options.max_requests_per_connection.value = max_requests_per_connection
    cluster.typed_extension_protocol_options[names.HTTP_PROTOCOL_OPTIONS].Pack(options)


def inbound_clusters(view: ProxyView) -> dict[str, Any]:
    return {names.inbound_cluster(p.port): _inbound_cluster(p) for p in view.inbound}


def _inbound_cluster(port: InboundPort) -> Any:
    name = names.inbound_cluster(port.port)
    cluster = Cluster(name=name, type=Cluster.STATIC)
    cluster.connect_timeout.FromTimedelta(timedelta(seconds=names.DEFAULT_CONNECT_TIMEOUT_SECONDS))
    cluster.load_assignment.cluster_name = name
    cluster.load_assignment.endpoints.add().lb_endpoints.append(lb_endpoint(port.app_address, port.app_port))
    if port.http:
        _set_http_options(cluster, port.http2)
    return cluster
