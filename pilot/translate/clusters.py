"""Clusters: one per (service host, port, subset) outbound, and one per inbound port."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from pilot.model.mesh import DNS_RESOLUTIONS, DestinationPolicy, MeshSnapshot, Service, ServicePort
from pilot.model.mtls import ISTIO_TLS_MODE, endpoint_tls_mode, spiffe_uri
from pilot.model.policy import NO_POLICY, ConnectionPool, TrafficPolicy
from pilot.translate import names
from pilot.translate.common import ads_config_source, lb_endpoint
from pilot.translate.encoded import encoded_values
from pilot.translate.memo import carried
from pilot.translate.mtls import apply_mesh_tls, sni
from pilot.translate.policy import apply_connection_limits, apply_traffic_policy, set_http_options
from pilot.translate.scope import InboundPort

Cluster = cluster_pb2.Cluster


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


def uses_eds(rule: DestinationPolicy | None, service: Service, port: int, subset: str) -> bool:
    """Whether cluster (port, subset) of ``service`` (under DestinationRule ``rule``) waits for a
    ClusterLoadAssignment.

    A PASSTHROUGH load balancer makes a cluster original-destination, which takes no EDS.
    """
    if discovery(service) != "EDS":
        return False
    lb = rule.policy_for(port, subset).load_balancer if rule is not None else None
    return lb is None or lb.simple != "PASSTHROUGH"


def subsets_of(rule: DestinationPolicy | None) -> list[str]:
    """ "" for the whole service, then each DestinationRule subset name in order."""
    return ["", *(rule.subsets if rule else ())]


def outbound_clusters(mesh: MeshSnapshot, mtls: bool = False) -> dict[str, Any]:
    """Every outbound cluster; a service's are carried over from the last mesh version while
    the service and its DestinationRule are unchanged (the same objects), kept as encodings
    (`pilot.translate.encoded.Encoded`). `mtls`: for a proxy with mesh certificates
    (`pilot.translate.mtls`), checking servers against `trust_domain`."""
    out: dict[str, Any] = {}
    domain = mesh.trust_domain if mtls else None
    for service in mesh.services.values():
        out.update(carried(mesh, _kept_clusters, (service, mesh.destination_rules.get(service.host)), domain))
    return out


def _kept_clusters(service: Service, rule: DestinationPolicy | None, trust_domain: str | None) -> dict[str, Any]:
    """`service_clusters`, each kept as its encoding (`pilot.translate.encoded.encoded_values`)."""
    return encoded_values(service_clusters(service, rule, trust_domain))


def service_clusters(
    service: Service, rule: DestinationPolicy | None, trust_domain: str | None = None
) -> dict[str, Any]:
    """The outbound clusters of one service: one per (port, subset). Pure. With `trust_domain`
    (the client has mesh certificates), ISTIO_MUTUAL and auto mTLS apply."""
    out: dict[str, Any] = {}
    sans = service_identities(service, trust_domain) if trust_domain is not None else ()
    for port in service.ports:
        for subset in subsets_of(rule):
            policy = rule.policy_for(port.number, subset) if rule else NO_POLICY
            name = names.outbound_cluster(port.number, subset, service.host)
            out[name] = cluster = _outbound_cluster(name, service, port, policy)
            if trust_domain is not None:
                _mesh_tls(cluster, service, port, subset, policy, sans)
    return out


def service_identities(service: Service, trust_domain: str) -> tuple[str, ...]:
    """The SPIFFE ids a client accepts from the service's instances: their service accounts."""
    return tuple(sorted({spiffe_uri(trust_domain, e.namespace, e.service_account)
                         for e in service.endpoints if e.service_account}))


def _mesh_tls(
    cluster: Any, service: Service, port: ServicePort, subset: str, policy: TrafficPolicy, sans: tuple[str, ...]
) -> None:
    """DestinationRule ISTIO_MUTUAL, or auto mTLS when the rule sets no TLS and some instance has a
    sidecar (EDS marks which ones: `pilot.translate.endpoints`)."""
    mode = policy.tls.mode if policy.tls is not None else None
    auto = mode is None and discovery(service) == "EDS" and any(
        endpoint_tls_mode(e.labels, e.service_account) == ISTIO_TLS_MODE for e in service.endpoints)
    if mode == "ISTIO_MUTUAL" or auto:
        pool = policy.connection_pool or ConnectionPool()
        upgrade = pool.h2_upgrade_policy == "UPGRADE" and not pool.use_client_protocol
        http2 = port.is_http and (port.is_http2 or upgrade)  # as `apply_traffic_policy` decides
        apply_mesh_tls(cluster, mode, sni(port.number, subset, service.host), sans, http2)


def _outbound_cluster(name: str, service: Service, port: ServicePort, policy: TrafficPolicy) -> Any:
    cluster = Cluster(name=name)
    kind = discovery(service)
    if kind == "EDS":
        cluster.type = Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(ads_config_source())
        cluster.eds_cluster_config.service_name = name
    elif kind == "DNS":
        cluster.type = Cluster.STRICT_DNS if service.resolution == "DNS" else Cluster.LOGICAL_DNS
        # Istio (IPv4 proxies, no dual stack): A records only; Envoy's AUTO would try AAAA first.
        cluster.dns_lookup_family = Cluster.V4_ONLY
        cluster.load_assignment.CopyFrom(_dns_assignment(name, service, port))
    else:
        cluster.type = Cluster.ORIGINAL_DST
        cluster.lb_policy = Cluster.CLUSTER_PROVIDED
    apply_traffic_policy(cluster, policy, port)
    return cluster


def _dns_assignment(name: str, service: Service, port: ServicePort) -> Any:
    """Endpoints given by name for Envoy to resolve: the inline endpoints, else the host itself."""
    targets = [(e.address, e.ports[port.name], e.weight) for e in service.endpoints]
    targets = targets or [(service.host, port.target_port or port.number, 1)]
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    cla.endpoints.add().lb_endpoints.extend(lb_endpoint(h, p, w) for h, p, w in sorted(targets))
    return cla


def inbound_clusters_for(inbound: tuple[InboundPort, ...]) -> dict[str, Any]:
    """One static cluster per inbound port, to the local app: a function of the ports alone."""
    return {names.inbound_cluster(p.port): _inbound_cluster(p) for p in inbound}


def _inbound_cluster(port: InboundPort) -> Any:
    name = names.inbound_cluster(port.port)
    cluster = Cluster(name=name, type=Cluster.STATIC)
    apply_connection_limits(cluster, ConnectionPool())
    cluster.load_assignment.cluster_name = name
    cluster.load_assignment.endpoints.add().lb_endpoints.append(lb_endpoint(port.app_address, port.app_port))
    if port.http:
        set_http_options(cluster, port.http2)
    return cluster
