"""Istio's listener model for captured traffic: pods whose connections iptables redirects.

A sidecar whose node says ``INTERCEPTION_MODE: REDIRECT`` (`ProxyClass.captured`) never sees
an app connect to it: the pod's init rules redirect every outbound connection to 15001 and
every inbound one to 15006, keeping the original destination (SO_ORIGINAL_DST). So, as Istio
1.30 builds it (``listener_builder.go``, ``listener.go``, ``listener_inbound.go``):

- ``virtualOutbound`` (0.0.0.0:15001, ``use_original_dst``) hands each connection to the
  listener of its original destination. With none, its catch-all chain forwards to
  ``PassthroughCluster`` (an original-destination cluster: the address the app dialled) or,
  under REGISTRY_ONLY, to ``BlackHoleCluster``; a connection whose destination is 15001 itself
  is black-holed (no loop).
- Per HTTP service port P, ``0.0.0.0_P`` (``bind_to_port: false``): an HTTP connection manager
  whose routes come over RDS as the route configuration ``"P"`` (`captured_routes`).
- Per TCP/TLS service port, ``<VIP>_P`` for each service address (``0.0.0.0_P`` for a service
  without one, unless an HTTP service has that port): the filter chains of the local mesh's
  TCP/TLS listeners (`pilot.translate.tcp_routes`: destination-subnet and SNI matches, weighted
  destinations), plus ``PassthroughFilterChain`` when no chain catches everything.
- ``virtualInbound`` (0.0.0.0:15006, ``original_dst`` listener filter): per inbound port the
  chains of the explicit model's inbound listener (HTTP connection manager to
  ``inbound|P||``, PeerAuthentication TLS, RBAC and JWT filters) matched on the destination
  port, and for every other port a chain to ``InboundPassthroughCluster`` (original
  destination, connecting from 127.0.0.6, which the redirect rules never capture), under the
  workload's mTLS mode and network RBAC.

Routing semantics are the local mesh's: the same route, cluster and TCP chain generators run
on the same narrowed mesh; only the listener and route-configuration shape differ.

Cost: the outbound listeners and route configurations are memoized on the visible mesh (one
per namespace and relevant labels, shared by every class with them); the class's own
listeners and clusters are functions of a few values (`carried_value`). The HTTP port
listeners are the same objects across classes and mesh versions; a TCP/TLS listener is carried
over while its services, their VirtualServices and their destinations' services and
DestinationRules are the same objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo_pb2

from pilot.model.authz import WorkloadSecurity
from pilot.model.convert_routes import all_destinations
from pilot.model.mesh import MeshSnapshot, Service, ServicePort
from pilot.model.mtls import WorkloadMtls
from pilot.model.policy import ConnectionPool
from pilot.translate import names
from pilot.translate.captured_routes import http_ports, port_route_configs, registry_only, service_addresses
from pilot.translate.clusters import inbound_clusters_for
from pilot.translate.common import address, ads_config_source, sorted_by_name
from pilot.translate.listeners import hcm_filter, inbound_listener, trust_the_app
from pilot.translate.memo import carried_by, carried_value, memoized
from pilot.translate.mtls import secure_inbound
from pilot.translate.passthrough import PASSTHROUGH_CLUSTER
from pilot.translate.policy import apply_connection_limits
from pilot.translate.rbac import network_rbac_filters
from pilot.translate.route_policies import route_http_filters
from pilot.translate.route_source import RouteSource
from pilot.translate.scope import InboundPort, ProxyView
from pilot.translate.tcp_routes import TLS_INSPECTOR, TLS_PROTOCOLS, tcp_chains, tls_chains

ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6"  # Istio's: the redirect rules let it through over lo
OUTBOUND_BLACKHOLE_CHAIN = "virtualOutbound-blackhole"
OUTBOUND_CATCH_ALL_CHAIN = "virtualOutbound-catchall-tcp"
INBOUND_BLACKHOLE_CHAIN = "virtualInbound-blackhole"
Parts = tuple[Mapping[str, Any], ...]
L4Members = list[tuple[Service, ServicePort]]


def captured_parts(
    mesh: MeshSnapshot, seen: MeshSnapshot, view: ProxyView, security: WorkloadSecurity,
    peer: WorkloadMtls | None, route_labels: tuple[tuple[str, str], ...],
) -> tuple[Mapping[str, Any], Parts, Mapping[str, Any]]:
    """(own clusters, listener parts (shared outbound first, then own), route configurations).

    ``seen``: the mesh narrowed for the proxy (`pilot.translate.generate._seen`); ``route_labels``:
    the proxy's labels that some HTTP route's ``sourceLabels`` names.
    """
    blocked = registry_only(view.egress)
    clusters = carried_value(mesh, _own_clusters, view.inbound)
    own = carried_value(mesh, _own_listeners, view.inbound, blocked, security, peer)
    l4_keys = memoized(seen, "captured-l4-label-keys", lambda: _l4_source_label_keys(seen))
    l4_labels = tuple(sorted((k, v) for k, v in view.labels.items() if k in l4_keys))
    outbound = memoized(seen, ("captured-outbound", view.namespace, l4_labels, blocked),
                        lambda: sorted_by_name(outbound_listeners(seen, view.namespace, dict(l4_labels), blocked)))
    routes = memoized(seen, ("captured-routes", view.namespace, route_labels, blocked),
                      lambda: sorted_by_name(port_route_configs(seen, view.namespace, dict(route_labels), blocked)))
    return clusters, (outbound, own), routes


def _l4_source_label_keys(seen: MeshSnapshot) -> frozenset[str]:
    """Label keys that TCP/TLS route matches select senders by (`sourceLabels`)."""
    return frozenset(key for rule in seen.virtual_services.values() for route in (*rule.tcp, *rule.tls)
                     for match in route.matches for key, _ in match.source_labels)


# --- clusters ---------------------------------------------------------------------------------


def _own_clusters(inbound: tuple[InboundPort, ...]) -> dict[str, Any]:
    """Inbound clusters to the app, and Istio's three built-in clusters of a captured sidecar."""
    own = inbound_clusters_for(inbound)
    own[PASSTHROUGH_CLUSTER] = _original_dst_cluster(PASSTHROUGH_CLUSTER)
    own[names.INBOUND_PASSTHROUGH_CLUSTER] = inbound_passthrough = _original_dst_cluster(
        names.INBOUND_PASSTHROUGH_CLUSTER)
    # Connect from 127.0.0.6 so the redirect rules do not send the connection back to 15006.
    bind = inbound_passthrough.upstream_bind_config.source_address
    bind.address, bind.port_value = INBOUND_PASSTHROUGH_SOURCE, 0
    blackhole = own[names.BLACKHOLE_CLUSTER] = cluster_pb2.Cluster(
        name=names.BLACKHOLE_CLUSTER, type=cluster_pb2.Cluster.STATIC)
    blackhole.connect_timeout.FromSeconds(names.DEFAULT_CONNECT_TIMEOUT_SECONDS)
    return sorted_by_name(own)


def _original_dst_cluster(name: str) -> Any:
    """Where the app meant to go; HTTP upstreams speak whatever the downstream spoke."""
    cluster = cluster_pb2.Cluster(
        name=name, type=cluster_pb2.Cluster.ORIGINAL_DST, lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED)
    apply_connection_limits(cluster, ConnectionPool())
    options = hpo_pb2.HttpProtocolOptions()
    options.use_downstream_protocol_config.http_protocol_options.SetInParent()
    options.use_downstream_protocol_config.http2_protocol_options.SetInParent()
    cluster.typed_extension_protocol_options[names.HTTP_PROTOCOL_OPTIONS].Pack(options)
    return cluster


# --- the class's own listeners ----------------------------------------------------------------


def _own_listeners(
    inbound: tuple[InboundPort, ...], blocked: bool, security: WorkloadSecurity, peer: WorkloadMtls | None
) -> dict[str, Any]:
    listeners = (virtual_outbound(blocked), virtual_inbound(inbound, security, peer))
    return sorted_by_name({lis.name: lis for lis in listeners})


def _tcp_filter(cluster: str) -> Any:
    flt = lc.Filter(name=names.TCP_PROXY_FILTER)
    flt.typed_config.Pack(tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster))
    return flt


def _to_port(chain: Any, port: int) -> Any:
    chain.filter_chain_match.destination_port.value = port
    return chain


def virtual_outbound(blocked: bool) -> Any:
    """0.0.0.0:15001: hands connections to their destination's listener, else passes through."""
    listener = listener_pb2.Listener(
        name=names.VIRTUAL_OUTBOUND, address=address(names.WILDCARD_ADDRESS, names.OUTBOUND_PORT),
        traffic_direction=base_pb2.OUTBOUND)
    listener.use_original_dst.value = True
    catch_all = names.BLACKHOLE_CLUSTER if blocked else PASSTHROUGH_CLUSTER
    listener.filter_chains.extend([
        _to_port(lc.FilterChain(name=OUTBOUND_BLACKHOLE_CHAIN, filters=[_tcp_filter(names.BLACKHOLE_CLUSTER)]),
                 names.OUTBOUND_PORT),
        lc.FilterChain(name=OUTBOUND_CATCH_ALL_CHAIN, filters=[_tcp_filter(catch_all)]),
    ])
    return listener


def virtual_inbound(
    inbound: tuple[InboundPort, ...], security: WorkloadSecurity, peer: WorkloadMtls | None
) -> Any:
    """0.0.0.0:15006: the explicit model's inbound chains, each matched on its port, then passthrough."""
    listener = listener_pb2.Listener(
        name=names.VIRTUAL_INBOUND, address=address(names.WILDCARD_ADDRESS, names.INBOUND_CAPTURE_PORT),
        traffic_direction=base_pb2.INBOUND)
    listener.continue_on_listener_filters_timeout = True  # server-first protocols are not held up
    listener.filter_chains.append(_to_port(lc.FilterChain(
        name=INBOUND_BLACKHOLE_CHAIN, filters=[_tcp_filter(names.BLACKHOLE_CLUSTER)]), names.INBOUND_CAPTURE_PORT))
    sources = [(p.port, _secured(inbound_listener(names.WILDCARD_ADDRESS, p, security), p.http, p.port, peer))
               for p in inbound]
    for port, source in sources:
        for chain in source.filter_chains:
            chain.name = names.listener(names.WILDCARD_ADDRESS, port)
            listener.filter_chains.append(_to_port(chain, port))
    passthrough = _secured(_inbound_passthrough(security), False, None, peer)
    for chain in passthrough.filter_chains:
        chain.name = names.VIRTUAL_INBOUND
        listener.filter_chains.append(chain)
    original_dst = listener.listener_filters.add(name=ORIGINAL_DST_FILTER)
    original_dst.typed_config.Pack(original_dst_pb2.OriginalDst())
    if any(ch.filter_chain_match.transport_protocol for ch in listener.filter_chains):
        inspector = listener.listener_filters.add(name=TLS_INSPECTOR)
        inspector.typed_config.Pack(tls_inspector_pb2.TlsInspector())
    return listener


def _secured(plain: Any, http: bool, port: int | None, peer: WorkloadMtls | None) -> Any:
    """`plain` under the workload's PeerAuthentication mode for `port` (None: its default mode)."""
    if peer is None:
        return plain
    return secure_inbound(plain, http, peer.at(port) if port is not None else peer.mode)


def _inbound_passthrough(security: WorkloadSecurity) -> Any:
    """A connection to a port no service declares: to the app as addressed, under network RBAC."""
    listener = listener_pb2.Listener(name=names.VIRTUAL_INBOUND)
    listener.filter_chains.add(filters=[*network_rbac_filters(security),
                                        _tcp_filter(names.INBOUND_PASSTHROUGH_CLUSTER)])
    return listener


# --- outbound listeners shared by the classes that see the same mesh --------------------------


def outbound_listeners(mesh: MeshSnapshot, namespace: str, labels: Mapping[str, str], blocked: bool) -> dict[str, Any]:
    """``0.0.0.0_P`` per HTTP port and ``<VIP>_P`` (or ``0.0.0.0_P``) per TCP/TLS port, by name."""
    http = http_ports(mesh)
    out = {names.listener(names.WILDCARD_ADDRESS, p): carried_value(mesh, http_port_listener, p) for p in http}
    source = RouteSource(namespace, labels)
    sender = (namespace, tuple(sorted(labels.items())), blocked)
    for (bind, port), members in _l4_listeners(mesh).items():
        if bind == names.WILDCARD_ADDRESS and port in http:
            continue  # an HTTP service has the port; TCP services without an address lose it (as in Istio)
        out[names.listener(bind, port)] = carried_by(
            mesh, _L4_TAG, _l4_reads(mesh, members), (bind, port, *sender),
            lambda: _l4_listener(mesh, bind, port, members, source, blocked))  # noqa: B023 (called at once)
    return out


_L4_TAG = "captured-l4-listener"


def _l4_reads(mesh: MeshSnapshot, members: L4Members) -> tuple[Any, ...]:
    """Every model object a TCP/TLS listener reads: its services, their VirtualServices, and the
    service and DestinationRule of each host they may send to (cluster names, idle timeouts)."""
    hosts: set[str] = set()
    rules = []
    for service, _ in members:
        rule = mesh.virtual_services.get(service.host)
        rules.append(rule)
        hosts |= {service.host, *(d.host for d in (all_destinations(rule) if rule else ()))}
    seen = tuple(x for h in sorted(hosts) for x in (mesh.services.get(h), mesh.destination_rules.get(h)))
    return (*(s for s, _ in members), *rules, *seen)


def _l4_listener(
    mesh: MeshSnapshot, bind: str, port: int, members: L4Members, source: RouteSource, blocked: bool
) -> Any:
    tls = [x for x in members if x[1].protocol in TLS_PROTOCOLS]
    chains = tls_chains(mesh, tls, port, source) if tls else tcp_chains(mesh, members[0][0], port, source)
    if all(ch.filter_chain_match.ByteSize() for ch in chains):  # nothing catches the rest
        chains.append(lc.FilterChain(name=names.PASSTHROUGH_FILTER_CHAIN, filters=[
            _tcp_filter(names.BLACKHOLE_CLUSTER if blocked else PASSTHROUGH_CLUSTER)]))
    listener = _bindless(bind, port, chains)
    if tls:
        listener.listener_filters.add(name=TLS_INSPECTOR).typed_config.Pack(tls_inspector_pb2.TlsInspector())
    return listener


def _bindless(bind: str, port: int, chains: list[Any]) -> Any:
    listener = listener_pb2.Listener(name=names.listener(bind, port), address=address(bind, port),
                                     traffic_direction=base_pb2.OUTBOUND)
    listener.bind_to_port.value = False  # reached only through virtualOutbound's hand-off
    listener.filter_chains.extend(chains)
    return listener


def http_port_listener(port: int) -> Any:
    """An HTTP connection manager whose routes are the route configuration named ``port``."""
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=f"outbound_{names.listener(names.WILDCARD_ADDRESS, port)}")
    trust_the_app(hcm, names.WILDCARD_ADDRESS)
    hcm.rds.route_config_name = names.port_route(port)
    hcm.rds.config_source.CopyFrom(ads_config_source())
    hcm.http_filters.extend(route_http_filters())  # CORS and fault, before the router
    chain = lc.FilterChain(name=names.listener(names.WILDCARD_ADDRESS, port), filters=[hcm_filter(hcm)])
    return _bindless(names.WILDCARD_ADDRESS, port, [chain])


def _l4_listeners(mesh: MeshSnapshot) -> dict[tuple[str, int], L4Members]:
    """Non-HTTP service ports by (listener address, port): each address of a service, or 0.0.0.0
    for one without; services in host order. Once per mesh."""
    def compute() -> dict[tuple[str, int], L4Members]:
        found: dict[tuple[str, int], L4Members] = {}
        for service in mesh.services.values():
            binds = service_addresses(service) or (names.WILDCARD_ADDRESS,)
            for port in service.ports:
                if port.is_http or port.number in names.RESERVED_PORTS:
                    continue
                for bind in binds:
                    found.setdefault((bind, port.number), []).append((service, port))
        return dict(sorted(found.items()))

    return memoized(mesh, "captured-l4-listeners", compute)
