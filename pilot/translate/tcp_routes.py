"""Outbound TCP and TLS listeners: VirtualService ``tcp`` and ``tls`` routes for sidecars.

Local-mesh convention (there is no iptables capture and no service VIP to tell services apart):
every non-HTTP service port P gets an outbound listener on ``<sidecar address>:P``.

- TCP ports: one service per port (the first host in name order); the listener's filter chains
  follow the service's ``tcp`` routes in order: a match with ``destinationSubnets`` becomes a
  chain matching those destination addresses, the first match without subnets becomes the
  catch-all chain; without one, the service's own cluster is the catch-all.
- TLS and HTTPS ports: a ``tls_inspector`` reads the SNI and one filter chain per ``sniHosts``
  entry of the ``tls`` routes forwards the still-encrypted connection; a service with no route
  for its own host name is reached by SNI equal to its host. Unmatched SNI is refused.

Ports the sidecar already uses (its inbound ports and 15000-15090) get no outbound listener.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from pilot.model import mesh as m
from pilot.translate import names
from pilot.translate.common import address
from pilot.translate.http_routes import destination_cluster, destination_port
from pilot.translate.memo import memoized
from pilot.translate.route_source import RouteSource
from pilot.translate.scope import ProxyView

TLS_PROTOCOLS = frozenset({"TLS", "HTTPS"})
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
Members = list[tuple[m.Service, m.ServicePort]]
# (destination subnets, SNI host or "") -> chain: the key Envoy requires to be unique.
ChainKey = tuple[tuple[str, ...], str]


def outbound_l4_listeners(mesh: m.MeshSnapshot, view: ProxyView) -> dict[str, Any]:
    """One listener per non-HTTP service port the proxy can bind, keyed by name."""
    ports = memoized(mesh, "l4-ports", lambda: _l4_ports(mesh))  # once per mesh, not per class
    if not ports:
        return {}
    source = RouteSource(view.namespace, view.labels)
    taken = {p.port for p in view.inbound} | names.RESERVED_PORTS
    out: dict[str, Any] = {}
    for number, members in ports:
        if number in taken:
            continue
        tls = [x for x in members if x[1].protocol in TLS_PROTOCOLS]
        chains = tls_chains(mesh, tls, number, source) if tls else tcp_chains(mesh, members[0][0], number, source)
        if chains:
            listener = _listener(view.bind_address, number, chains, tls=bool(tls))
            out[listener.name] = listener
    return out


def _l4_ports(mesh: m.MeshSnapshot) -> list[tuple[int, Members]]:
    """Non-HTTP service ports by number, with the services that have them, in port order."""
    by_port: dict[int, Members] = {}
    for service in mesh.services.values():
        for port in service.ports:
            if not port.is_http:
                by_port.setdefault(port.number, []).append((service, port))
    return sorted(by_port.items())


def _listener(bind: str, port: int, chains: list[Any], tls: bool) -> Any:
    listener = listener_pb2.Listener(name=names.listener(bind, port), address=address(bind, port))
    listener.filter_chains.extend(chains)
    if tls:
        inspector = listener.listener_filters.add(name=TLS_INSPECTOR)
        inspector.typed_config.Pack(tls_inspector_pb2.TlsInspector())
    return listener


def tcp_proxy_filter(
    mesh: m.MeshSnapshot, destinations: Sequence[m.RouteDestination], port: int, stat_prefix: str = ""
) -> Any | None:
    """A tcp_proxy to the (weighted) destinations; None if none has weight.

    Its idle timeout is the destinations' DestinationRule `connectionPool.tcp.idleTimeout`
    when they agree (Istio's; Envoy's default is one hour). `stat_prefix` defaults to the
    first cluster's name.
    """
    weights: dict[str, int] = {}
    for dest in destinations:
        if dest.weight > 0:
            name = destination_cluster(mesh, dest, port)
            weights[name] = weights.get(name, 0) + dest.weight
    if not weights:
        return None
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix or min(weights))
    if len(weights) == 1:
        proxy.cluster = next(iter(weights))
    for name, weight in sorted(weights.items()) if len(weights) > 1 else ():
        proxy.weighted_clusters.clusters.add(name=name, weight=weight)
    idle = {_idle_timeout(mesh, dest, port) for dest in destinations if dest.weight > 0}
    if len(idle) == 1 and (timeout := idle.pop()) is not None:
        proxy.idle_timeout.FromTimedelta(timeout)
    flt = lc.Filter(name=names.TCP_PROXY_FILTER)
    flt.typed_config.Pack(proxy)
    return flt


def _idle_timeout(mesh: m.MeshSnapshot, dest: m.RouteDestination, port: int) -> timedelta | None:
    rule = mesh.destination_rules.get(dest.host)
    if rule is None:
        return None
    pool = rule.policy_for(destination_port(mesh, dest, port), dest.subset).connection_pool
    return pool.tcp_idle_timeout if pool is not None else None


def _proxy(mesh: m.MeshSnapshot, destinations: Sequence[m.RouteDestination], port: int) -> Any:
    found = tcp_proxy_filter(mesh, destinations, port)
    if found is None:  # validation gives every tcp/tls route a destination with weight
        raise ValueError(f"port {port}: a TCP route without a weighted destination")
    return found


def _chain(key: ChainKey, proxy: Any) -> Any:
    subnets, sni = key
    chain = lc.FilterChain(filters=[proxy])
    for subnet in subnets:
        ip, _, length = subnet.partition("/")
        cidr = chain.filter_chain_match.prefix_ranges.add(address_prefix=ip)
        cidr.prefix_len.value = int(length) if length else (128 if ":" in ip else 32)
    if sni:
        chain.filter_chain_match.server_names.append(sni)
    return chain


def _applicable(
    rule: m.RoutingRule, routes: tuple[m.L4Route, ...], port: int, source: RouteSource
) -> Iterator[tuple[m.L4Route, m.L4Match | None]]:
    """(route, match) pairs that apply to ``port`` and ``source``, in rule order; None: no matches."""
    for route in routes:
        if not route.matches:
            if source.accepts(rule.gateways, (), (), None):
                yield route, None
            continue
        for match in route.matches:
            if match.port in (None, port) and source.accepts_l4(rule, match):
                yield route, match


def tcp_chains(mesh: m.MeshSnapshot, service: m.Service, port: int, source: RouteSource) -> list[Any]:
    chains: dict[ChainKey, Any] = {}
    rule = mesh.virtual_services.get(service.host)
    for route, match in _applicable(rule, rule.tcp, port, source) if rule else ():
        key: ChainKey = (tuple(sorted(match.destination_subnets)) if match else (), "")
        chains.setdefault(key, _chain(key, _proxy(mesh, route.destinations, port)))
        if not key[0]:
            break  # first catch-all wins; later routes are unreachable
    default = m.RouteDestination(host=service.host, port=port)
    chains.setdefault(((), ""), _chain(((), ""), _proxy(mesh, (default,), port)))
    return [chains[k] for k in sorted(chains)]


def tls_chains(mesh: m.MeshSnapshot, members: Members, port: int, source: RouteSource) -> list[Any]:
    chains: dict[ChainKey, Any] = {}
    for service, _ in sorted(members, key=lambda x: x[0].host):
        rule = mesh.virtual_services.get(service.host)
        for route, match in _applicable(rule, rule.tls, port, source) if rule else ():
            subnets = tuple(sorted(match.destination_subnets)) if match else ()
            for sni in match.sni_hosts if match else ():
                key = (subnets, sni)
                chains.setdefault(key, _chain(key, _proxy(mesh, route.destinations, port)))
        default = m.RouteDestination(host=service.host, port=port)
        key = ((), service.host)
        chains.setdefault(key, _chain(key, _proxy(mesh, (default,), port)))
    return [chains[k] for k in sorted(chains)]
