"""Route configurations of a gateway: one virtual host per host a bound VirtualService claims.

A VirtualService reaches a gateway server when its ``gateways`` name the Gateway, it is
exported to the gateway proxy's namespace, and one of its hosts lies within a server host
that admits the VirtualService's namespace (``ns/host``, ``./host``, ``*/host``). Several
VirtualServices for one host are merged, oldest first, as Istio merges them on gateways.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2

from pilot.model.gateway import GatewayServer
from pilot.model.mesh import MeshSnapshot, RoutingRule
from pilot.translate import names
from pilot.translate.http_routes import allow_large_direct_bodies, virtual_service_routes
from pilot.translate.route_source import RouteSource
from pilot.translate.scope import ProxyView
from pilot.translate.visibility import visible_rules

Bound = list[tuple[RoutingRule, str]]  # (VirtualService, the Gateway it reaches the server through)


def http_route_name(port: int) -> str:
    """Istio's RDS name for the plain-HTTP servers of a port."""
    return f"http.{port}"


def https_route_name(server: GatewayServer) -> str:
    """Istio's RDS name for one HTTPS server: ``https.<port>.<port name>.<gateway>.<namespace>``."""
    namespace, _, name = server.gateway.partition("/")
    return f"https.{server.port}.{server.port_name}.{name}.{namespace}"


def bound_hosts(mesh: MeshSnapshot, namespace: str, servers: list[GatewayServer]) -> dict[str, Bound]:
    """Served host -> the VirtualServices routing it on these servers, oldest first."""
    found: dict[str, Bound] = {}
    for server in servers:
        for exported in visible_rules(mesh, namespace, server.gateway):
            rule = exported.value
            for host in rule.hosts:
                served = server.admits(rule.namespace, host)
                if served is None:
                    continue
                bound = found.setdefault(served, [])
                if (rule, server.gateway) not in bound:
                    bound.append((rule, server.gateway))
    return found


def source_for(namespace: str, labels: Mapping[str, str], gateway: str) -> RouteSource:
    """Who sends through a gateway, for VirtualService matches (``gateways``, ``sourceLabels``)."""
    return RouteSource(namespace=namespace, labels=dict(labels), gateways=frozenset({gateway}))


def gateway_route_config(
    mesh: MeshSnapshot, view: ProxyView, name: str, servers: list[GatewayServer], port: int
) -> Any:
    """RouteConfiguration ``name``: virtual hosts sorted by name; none means every request gets 404."""
    config = route_pb2.RouteConfiguration(name=name)
    ns = view.namespace
    redirected = set(bound_hosts(mesh, ns, [s for s in servers if s.https_redirect]))
    for host, bound in sorted(bound_hosts(mesh, ns, servers).items()):
        routes = [
            r
            for rule, gateway in bound
            for r in virtual_service_routes(mesh, rule, port, source_for(ns, view.labels, gateway))
        ]
        if not routes:
            continue
        vhost = rc.VirtualHost(name=names.virtual_host(host, port), domains=[host], routes=routes,
                               include_request_attempt_count=True)
        if host in redirected:
            # Istio's httpsRedirect: Envoy answers plain-HTTP requests with a 301 to https.
            vhost.require_tls = rc.VirtualHost.ALL
        config.virtual_hosts.append(vhost)
    return allow_large_direct_bodies(config)
