"""Captured model: one RouteConfiguration per HTTP service port, named by the port (``"8080"``).

iptables hands a pod's connection to the listener of its original destination port, so the
port is known before any header is read; the route configuration of that port holds only the
virtual hosts of services with an HTTP port of that number (Istio's
``buildSidecarOutboundHTTPRouteConfig``). Domains are Istio's for sidecars: the host, its
Kubernetes short forms (``reviews``, ``reviews.default``, ``reviews.default.svc`` within the
proxy's namespace; the last two elsewhere), the absolute host (``reviews.default.svc.cluster.local.``,
Istio 1.27 on) and the service's addresses, all without a port:
``ignore_port_in_host_matching`` makes ``Host: reviews:9080`` match ``reviews``. A domain is
claimed once per configuration (full names and addresses before short forms). The last virtual
host catches the rest: ``allow_any`` to the original destination, or ``block_all`` (502) under
REGISTRY_ONLY.

Cost: the routes of a virtual host are the very objects the local mesh's route configuration
uses (`pilot.translate.routes`, memoized per mesh and carried across versions); a port's
configuration is carried over while its virtual hosts are the same objects, so a VirtualService
edit builds (and the serializer encodes) only the configurations of its hosts' ports.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from envoy.config.route.v3 import route_pb2

from pilot.model.mesh import MeshSnapshot, Service, ServicePort
from pilot.model.scoping import REGISTRY_ONLY, EgressScope
from pilot.translate import names
from pilot.translate.http_routes import allow_large_direct_bodies
from pilot.translate.memo import carried_by, carried_value, memoized
from pilot.translate.passthrough import passthrough_vhost
from pilot.translate.route_source import RouteSource
from pilot.translate.routes import service_vhost, vhost_routes
from pilot.translate.visibility import block_all_vhost

Members = tuple[tuple[Service, ServicePort], ...]


def http_ports(mesh: MeshSnapshot) -> dict[int, Members]:
    """HTTP service ports by number (the sidecar's own ports excluded), services in host order.

    Once per mesh: every class seeing this mesh shares the result.
    """
    def compute() -> dict[int, Members]:
        found: dict[int, list[tuple[Service, ServicePort]]] = {}
        for service in mesh.services.values():
            for port in service.http_ports:
                if port.number not in names.RESERVED_PORTS:
                    found.setdefault(port.number, []).append((service, port))
        return {number: tuple(found[number]) for number in sorted(found)}

    return memoized(mesh, "captured-http-ports", compute)


def registry_only(egress: EgressScope | None) -> bool:
    """The proxy's Sidecar says REGISTRY_ONLY: unknown destinations are refused, not passed through."""
    return egress is not None and egress.outbound_policy == REGISTRY_ONLY


def port_route_configs(
    mesh: MeshSnapshot, namespace: str, labels: Mapping[str, str], blocked: bool
) -> dict[str, Any]:
    """Every HTTP port's RouteConfiguration for a sidecar in ``namespace`` with ``labels`` (only
    the labels some route's ``sourceLabels`` names matter; the caller narrows them to keep
    classes sharing). ``blocked``: REGISTRY_ONLY."""
    source = RouteSource(namespace, labels)
    catch_all = carried_value(mesh, _catch_all, blocked)
    out: dict[str, Any] = {}
    for number, members in http_ports(mesh).items():
        claimed = carried_by(mesh, _DOMAINS_TAG, tuple(s for s, _ in members), (namespace, mesh.cluster_domain, number),
                             lambda: _claimed_domains(mesh, members, namespace))  # noqa: B023 (called at once)
        vhosts = tuple(_vhost(mesh, service, port, source, claimed[service.host]) for service, port in members)
        out[names.port_route(number)] = carried_by(
            mesh, _CONFIG_TAG, (*vhosts, catch_all), (number,),
            lambda: _config(number, vhosts, catch_all))  # noqa: B023 (called at once)
    return out


_DOMAINS_TAG = "captured-domains"
_VHOST_TAG = "captured-vhost"
_CONFIG_TAG = "captured-port-routes"


def _vhost(mesh: MeshSnapshot, service: Service, port: ServicePort, source: RouteSource,
           domains: tuple[str, ...]) -> Any:
    routes = vhost_routes(mesh, service, port, source)
    name = names.virtual_host(service.host, port.number)
    return carried_by(mesh, _VHOST_TAG, (routes,), (name, domains),
                      lambda: service_vhost(name, domains, routes))


def _config(number: int, vhosts: tuple[Any, ...], catch_all: Any) -> Any:
    config = route_pb2.RouteConfiguration(name=names.port_route(number), ignore_port_in_host_matching=True)
    config.validate_clusters.value = False
    config.virtual_hosts.extend(vhosts)
    config.virtual_hosts.append(catch_all)
    return allow_large_direct_bodies(config)


def _catch_all(blocked: bool) -> Any:
    """Istio's last virtual host: ``allow_any`` to PassthroughCluster (here an original-destination
    cluster), or ``block_all`` answering 502 under REGISTRY_ONLY."""
    return block_all_vhost() if blocked else passthrough_vhost()


def service_addresses(service: Service) -> tuple[str, ...]:
    """The service's single-address VIPs (CIDR ranges and 0.0.0.0 name no one destination)."""
    found = []
    for text in service.addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if not ip.is_unspecified:
            found.append(str(ip))
    return tuple(found)


def _claimed_domains(mesh: MeshSnapshot, members: Members, namespace: str) -> dict[str, tuple[str, ...]]:
    """Each service's domains on this port: full names and addresses first, then short forms,
    each claimed by the first service (host order) that wants it; sorted."""
    wanted = {svc.host: _domains(svc, namespace, mesh.cluster_domain) for svc, _ in members}
    taken: set[str] = set()
    claimed: dict[str, list[str]] = {host: [] for host in wanted}
    for tier in (0, 1):
        for host in sorted(wanted):
            for domain in wanted[host][tier]:
                if domain.lower() not in taken:
                    taken.add(domain.lower())
                    claimed[host].append(domain)
    return {host: tuple(sorted(found)) for host, found in claimed.items()}


def _domains(service: Service, namespace: str, cluster_domain: str) -> tuple[list[str], list[str]]:
    """(full name and addresses, short forms) as Istio generates them for a sidecar."""
    full = [*names.host_domains(service.host), *(f"[{a}]" if ":" in a else a for a in service_addresses(service))]
    short: list[str] = []
    suffix = f".svc.{cluster_domain}"
    if service.host.endswith(suffix):
        name, _, ns = service.host[: -len(suffix)].partition(".")
        if name and ns and "." not in ns:
            short = [f"{name}.{ns}", f"{name}.{ns}.svc"] + ([name] if ns == namespace else [])
    return full, short
