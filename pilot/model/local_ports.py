"""Port clashes particular to the local mesh, reported as mesh warnings.

Why: a local-mesh sidecar has no iptables capture and no service VIPs, so it tells non-HTTP
services apart by port alone: one outbound listener per port on its own address (TLS services
sharing a port are told apart by SNI). Two TCP services on one port, or a TCP port that the
sidecar's own workload serves, leave a service unreachable from some sidecars; the generators
resolve that the same way every time, and this reports it instead of leaving it silent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pilot.model import mesh as m

TLS_PROTOCOLS = frozenset({"TLS", "HTTPS"})


def local_port_warnings(services: Mapping[str, m.Service]) -> list[str]:
    """Shared outbound TCP ports, and TCP ports some workload's own sidecar cannot route."""
    by_port: dict[int, list[tuple[m.Service, m.ServicePort]]] = {}
    for host in sorted(services):
        for port in services[host].ports:
            if not port.is_http:
                by_port.setdefault(port.number, []).append((services[host], port))
    out: list[str] = []
    for number, members in sorted(by_port.items()):
        tcp = [s for s, p in members if p.protocol not in TLS_PROTOCOLS]
        tls = [s for s, p in members if p.protocol in TLS_PROTOCOLS]
        if tcp and tls:
            out.append(f"port {number}: TCP {_refs(tcp)} and TLS {_refs(tls)} share it; a local-mesh sidecar "
                       f"routes that port by SNI, so the TCP services are not reachable on it")
        elif len(tcp) > 1:
            out.append(f"port {number}: TCP {_refs(tcp)} share it; a local-mesh sidecar has one outbound "
                       f"listener per TCP port, so only {tcp[0].host} is reachable on it")
    out += _inbound_clashes(services, by_port)
    return out


def _inbound_clashes(
    services: Mapping[str, m.Service], by_port: Mapping[int, list[tuple[m.Service, m.ServicePort]]]
) -> list[str]:
    if not by_port:
        return []  # no TCP port anywhere: nothing to clash with, and no walk over every endpoint
    # workload ("ns/name") -> the ports its sidecar serves inbound
    serves: dict[str, set[int]] = {}
    for service in services.values():
        for endpoint in service.endpoints:
            if endpoint.workload:
                serves.setdefault(endpoint.workload, set()).update(endpoint.ports.values())
    out = []
    for workload, ports in sorted(serves.items()):
        for number in sorted(ports & by_port.keys()):
            others = [s for s, _ in by_port[number] if all(e.workload != workload for e in s.endpoints)]
            if others:
                out.append(f"WorkloadEntry {workload} serves port {number}, so its sidecar has no outbound "
                           f"listener there: {_refs(others)} not reachable from it on that port")
    return out


def _refs(services: Iterable[m.Service]) -> str:
    return ", ".join(f"{s.host} (ServiceEntry {s.namespace}/{s.name})" for s in services)
