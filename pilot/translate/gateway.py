"""Listeners of a gateway (router) proxy: one per server port of the Gateways selecting it.

- HTTP servers of a port share one listener and RDS config ``http.<port>``;
- HTTPS servers get one filter chain each, matched by SNI (the server's hosts), terminating TLS
  with the server's certificate files and routing with RDS ``https.<port>.<name>.<gw>.<ns>``;
- TLS (passthrough) servers get one filter chain per VirtualService ``tls`` SNI match, proxying
  the encrypted stream; TCP servers proxy to the first matching ``tcp`` route.

AuthorizationPolicies and RequestAuthentications apply to the gateway workload as to a sidecar
(selected by its namespace and labels, root-namespace policies mesh-wide), as Istio applies them
to ingress gateways: every HTTP connection manager gets the JWT and RBAC HTTP filters before the
router, TCP and passthrough chains the RBAC network filters before ``tcp_proxy``. Ports in rules
are the gateway's listener ports. Cost: one policy lookup per router class and build.

Listeners bind on the server's ``bind`` address if set, else the proxy's own address. Pure.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from pilot.model import gateway as gw
from pilot.model.authz import WorkloadSecurity, workload_security
from pilot.model.hosts import host_intersection
from pilot.model.mesh import L4Match, L4Route, MeshSnapshot
from pilot.translate import names
from pilot.translate.common import address, ads_config_source
from pilot.translate.gateway_routes import (
    bound_hosts,
    gateway_route_config,
    http_route_name,
    https_route_name,
    source_for,
)
from pilot.translate.gateway_tls import TLS_INSPECTOR, mesh_tls_servers, transport_socket
from pilot.translate.jwt import jwt_filter
from pilot.translate.listeners import hcm_filter
from pilot.translate.rbac import http_rbac_filters, network_rbac_filters
from pilot.translate.scope import ProxyView
from pilot.translate.tcp_routes import tcp_proxy_filter

Resources = dict[str, Any]


def gateway_resources(mesh: MeshSnapshot, view: ProxyView) -> tuple[Resources, Resources]:
    """(listeners, route configs) for a router proxy, each keyed by name."""
    selected = [g for g in mesh.scoping.gateways if g.selects(view.labels)]
    security = workload_security(mesh.security, mesh.scoping.root_namespace, view.namespace, view.labels)
    listeners: Resources = {}
    routes: Resources = {}
    for port, all_servers, _conflicts in gw.servers_by_port(selected):
        servers = mesh_tls_servers(all_servers, view.mtls)
        if not servers:
            continue
        bind = servers[0].bind or view.bind_address
        listener = listener_pb2.Listener(name=names.listener(bind, port), address=address(bind, port))
        kind = servers[0].protocol
        if kind == gw.HTTP:
            name = http_route_name(port)
            routes[name] = gateway_route_config(mesh, view, name, servers, port)
            listener.filter_chains.append(lc.FilterChain(filters=[_rds_filter(name, port, security)]))
        elif kind == gw.TCP:
            listener.filter_chains.extend(_tcp_chains(mesh, view, servers[0], port, security))
        else:
            listener.listener_filters.append(_tls_inspector())
            listener.filter_chains.extend(_sni_chains(mesh, view, servers, port, routes, security))
        if listener.filter_chains:
            listeners[listener.name] = listener
    return listeners, routes


def _rds_filter(route_name: str, port: int, security: WorkloadSecurity) -> Any:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=f"gateway_{port}", strip_any_host_port=True,
                                        server_name=names.SERVER_NAME)
    jwt = jwt_filter(security.jwt)
    hcm.http_filters.extend([*([jwt] if jwt is not None else []), *http_rbac_filters(security)])
    # Istio's gateways: the client's address goes into X-Forwarded-For, and as no address is
    # internal, a client's x-envoy-* control headers are removed.
    hcm.use_remote_address.value = True
    hcm.rds.route_config_name = route_name
    hcm.rds.config_source.CopyFrom(ads_config_source())
    return hcm_filter(hcm)


def _tls_inspector() -> Any:
    flt = lc.ListenerFilter(name=TLS_INSPECTOR)
    flt.typed_config.Pack(tls_inspector_pb2.TlsInspector())
    return flt


def _sni_chains(
    mesh: MeshSnapshot, view: ProxyView, servers: list[gw.GatewayServer], port: int, routes: Resources,
    security: WorkloadSecurity,
) -> list[Any]:
    """HTTPS and passthrough chains; SNI names already taken by an earlier chain are left out."""
    chains: list[Any] = []
    taken: set[str] = set()
    for server in servers:
        if server.protocol == gw.HTTPS and server.tls is not None:
            name = https_route_name(server)
            routes[name] = gateway_route_config(mesh, view, name, [server], port)
            chain = lc.FilterChain(filters=[_rds_filter(name, port, security)],
                                   transport_socket=transport_socket(server.tls, over_ads=mesh.credentials_over_ads))
            chain.filter_chain_match.server_names.extend(sorted(server.sni_names))
            chains.append(chain)
            taken |= server.sni_names
        elif server.protocol == gw.TLS:
            chains += _passthrough_chains(mesh, view, server, port, taken, security)
    return chains


def _l4_routes(
    mesh: MeshSnapshot, view: ProxyView, server: gw.GatewayServer, port: int, tls: bool
) -> Iterator[tuple[L4Route, L4Match | None]]:
    """(route, match) of the bound VirtualServices' tcp or tls entries that apply here, oldest first."""
    for bound in bound_hosts(mesh, view.namespace, [server]).values():
        for rule, gateway in bound:
            source = source_for(view.namespace, view.labels, gateway)
            for route in rule.tls if tls else rule.tcp:
                if not route.matches and source.accepts(rule.gateways, (), (), None):
                    yield route, None
                for match in route.matches:
                    if match.port in (None, port) and source.accepts_l4(rule, match):
                        yield route, match


def _passthrough_chains(
    mesh: MeshSnapshot, view: ProxyView, server: gw.GatewayServer, port: int, taken: set[str],
    security: WorkloadSecurity,
) -> list[Any]:
    """One chain per tls match: its SNI names that the server's hosts allow, proxied as they are."""
    chains = []
    for route, match in _l4_routes(mesh, view, server, port, tls=True):
        snis = {s for s in (match.sni_hosts if match else ()) if server_allows(server, s)} - taken
        proxy = _tcp_filter(mesh, route, port, f"gateway_{port}_tls")
        if snis and proxy is not None:
            taken.update(snis)
            chain = lc.FilterChain(filters=[*network_rbac_filters(security), proxy])
            chain.filter_chain_match.server_names.extend(sorted(snis))
            chains.append(chain)
    return chains


def server_allows(server: gw.GatewayServer, sni: str) -> bool:
    """Whether an SNI name lies within one of the server's hosts."""
    return any(host_intersection(host, sni) == sni for _, host in server.hosts)


def _tcp_chains(
    mesh: MeshSnapshot, view: ProxyView, server: gw.GatewayServer, port: int, security: WorkloadSecurity
) -> list[Any]:
    """The first tcp route (oldest VirtualService first) that applies to this port and gateway."""
    for route, _match in _l4_routes(mesh, view, server, port, tls=False):
        proxy = _tcp_filter(mesh, route, port, f"gateway_{port}_tcp")
        if proxy is not None:
            chain = lc.FilterChain(filters=[*network_rbac_filters(security), proxy])
            if server.tls is not None:
                chain.transport_socket.CopyFrom(
                    transport_socket(server.tls, alpn=(), over_ads=mesh.credentials_over_ads))
            return [chain]
    return []


def _tcp_filter(mesh: MeshSnapshot, route: L4Route, port: int, stat_prefix: str) -> Any | None:
    """A tcp_proxy to the route's (weighted) destinations; None if it has none with weight."""
    return tcp_proxy_filter(mesh, route.destinations, port, stat_prefix)
