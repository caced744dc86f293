"""ClusterLoadAssignments for every EDS cluster: service endpoints filtered by subset labels."""

from __future__ import annotations

import ipaddress
from typing import Any

from envoy.config.endpoint.v3 import endpoint_pb2

from pilot.model.mesh import DestinationPolicy, Endpoint, MeshSnapshot, Service, selects
from pilot.translate import names
from pilot.translate.clusters import discovery, subsets_of, uses_eds
from pilot.translate.common import UNIX_PREFIX, lb_endpoint
from pilot.translate.memo import carried


def _routable(endpoint: Endpoint) -> bool:
    """EDS takes IP addresses and pipes only; host names would make Envoy reject the update."""
    if endpoint.address.startswith(UNIX_PREFIX):
        return True
    try:
        ipaddress.ip_address(endpoint.address)
    except ValueError:
        return False
    return True


def load_assignments(mesh: MeshSnapshot) -> dict[str, Any]:
    """Every ClusterLoadAssignment; a service's are carried over from the last mesh version while
    the service (its endpoints included) and its DestinationRule are the same objects."""
    out: dict[str, Any] = {}
    for service in mesh.services.values():
        if discovery(service) == "EDS":
            out.update(carried(mesh, service_assignments, (service, mesh.destination_rules.get(service.host))))
    return out


def service_assignments(service: Service, rule: DestinationPolicy | None) -> dict[str, Any]:
    """The ClusterLoadAssignments of one EDS service: one per (port, subset) cluster. Pure."""
    out: dict[str, Any] = {}
    routable = [e for e in service.endpoints if _routable(e)]  # once per service, not per subset
    for port in service.ports:
        for subset in subsets_of(rule):
            if not uses_eds(rule, service, port.number, subset):
                continue  # PASSTHROUGH: an original-destination cluster
            labels = rule.subsets[subset].labels if rule and subset else {}
            name = names.outbound_cluster(port.number, subset, service.host)
            members = [e for e in routable if selects(labels, e.labels)]
            out[name] = _assignment(name, [(e.address, e.ports[port.name], e.weight) for e in members])
    return out


def _assignment(name: str, targets: list[tuple[str, int, int]]) -> Any:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    if targets:
        cla.endpoints.add().lb_endpoints.extend(lb_endpoint(h, p, w) for h, p, w in sorted(targets))
    return cla
