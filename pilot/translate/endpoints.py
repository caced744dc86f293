"""ClusterLoadAssignments for every EDS cluster: service endpoints filtered by subset labels."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from envoy.config.endpoint.v3 import endpoint_pb2

from pilot.model.mesh import DestinationPolicy, Endpoint, MeshSnapshot, Service, selects
from pilot.model.mtls import DISABLE, ISTIO_TLS_MODE, PeerAuthn, endpoint_tls_mode, workload_mtls
from pilot.translate import names
from pilot.translate.clusters import discovery, subsets_of, uses_eds
from pilot.translate.common import UNIX_PREFIX, lb_endpoint
from pilot.translate.encoded import encoded_values
from pilot.translate.memo import Patched, carried
from pilot.translate.mtls import tls_endpoint_metadata


def _routable(endpoint: Endpoint) -> bool:
    """EDS takes IP addresses and pipes only; host names would make Envoy reject the update."""
    if endpoint.address.startswith(UNIX_PREFIX):
        return True
    try:
        ipaddress.ip_address(endpoint.address)
    except ValueError:
        return False
    return True


def load_assignments(mesh: MeshSnapshot, mtls: bool = False) -> dict[str, Any]:
    """Every ClusterLoadAssignment; a service's are carried over from the last mesh version while
    the service (its endpoints included) and its DestinationRule are the same objects, kept as
    encodings (`pilot.translate.encoded.Encoded`). `mtls`
    (the client has mesh certificates): endpoints that accept Istio mutual TLS are marked."""
    out: dict[str, Any] = {}
    peers = mesh.peer_authn if mtls else None
    for service in mesh.services.values():
        if discovery(service) == "EDS":
            rule = mesh.destination_rules.get(service.host)
            out.update(carried(mesh, _kept_assignments, (service, rule, peers)))
    return out


def patched_assignments(
    mesh: MeshSnapshot, old_services: Mapping[str, Service], old: Mapping[str, Any], peers: PeerAuthn | None
) -> Patched | None:
    """`sorted_by_name(load_assignments(mesh, ...))` made from `old`, that of a mesh with the same
    hosts as `old_services`, the same DestinationRules and the same `peers`: the services that are
    other objects now get their assignments again, the rest are `old`'s. None when that cannot be
    exact (a service changed its discovery type or its clusters), and the caller generates afresh.

    Cost: one identity check per service plus the changed services' assignments, instead of a
    carried lookup per service, a sort and a set of ~3,000 at mission scale.
    """
    services = mesh.services
    if services.keys() != old_services.keys():
        return None
    replacements: dict[str, Any] = {}
    for host, service in services.items():
        was = old_services[host]
        if was is service:
            continue
        kind = discovery(service)
        if kind != discovery(was):
            return None
        if kind != "EDS":
            continue
        rule = mesh.destination_rules.get(host)
        before, after = (carried(mesh, _kept_assignments, (s, rule, peers)) for s in (was, service))
        if before.keys() != after.keys():
            return None
        replacements.update(after)
    try:
        return Patched(old, replacements)
    except KeyError:  # `old` was not what these services gave: generate afresh
        return None


def service_assignments(
    service: Service, rule: DestinationPolicy | None, peers: PeerAuthn | None = None
) -> dict[str, Any]:
    """The ClusterLoadAssignments of one EDS service: one per (port, subset) cluster. Pure.

    With `peers`, an instance is marked for mutual TLS (auto mTLS) when it has a sidecar with a
    mesh identity and its PeerAuthentication does not DISABLE mutual TLS on that port."""
    out: dict[str, Any] = {}
    routable = [e for e in service.endpoints if _routable(e)]  # once per service, not per subset
    for port in service.ports:
        for subset in subsets_of(rule):
            if not uses_eds(rule, service, port.number, subset):
                continue  # PASSTHROUGH: an original-destination cluster
            labels = rule.subsets[subset].labels if rule and subset else {}
            name = names.outbound_cluster(port.number, subset, service.host)
            members = [e for e in routable if selects(labels, e.labels)]
            out[name] = _assignment(
                name,
                [
                    (
                        e.address,
                        e.ports[port.name],
                        e.weight,
                        peers is not None and _accepts_mtls(peers, e, e.ports[port.name]),
                    )
                    for e in members
                ],
            )
    return out


def _kept_assignments(
    service: Service, rule: DestinationPolicy | None, peers: PeerAuthn | None = None
) -> dict[str, Any]:
    """`service_assignments`, each kept as its encoding (`pilot.translate.encoded.encoded_values`)."""
    return encoded_values(service_assignments(service, rule, peers))


def _accepts_mtls(peers: PeerAuthn, endpoint: Endpoint, port: int) -> bool:
    if endpoint_tls_mode(endpoint.labels, endpoint.service_account) != ISTIO_TLS_MODE:
        return False
    return workload_mtls(peers, endpoint.namespace, endpoint.labels).at(port) != DISABLE


def _assignment(name: str, targets: list[tuple[str, int, int, bool]]) -> Any:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    if targets:
        cla.endpoints.add().lb_endpoints.extend(
            tls_endpoint_metadata(lb_endpoint(h, p, w)) if tls else lb_endpoint(h, p, w)
            for h, p, w, tls in sorted(targets)
        )
    return cla
