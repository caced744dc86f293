"""The outbound RouteConfiguration: one virtual host per (service host, HTTP port).

Domains are what an app may put in its Host header: ``host:port`` always, the bare host for
the service's lowest HTTP port, the same two for the absolute host (``reviews.default.svc.cluster.local.``,
Istio 1.27 on), and Kubernetes short forms (``reviews``, ``reviews.default``) for
``*.svc.<cluster domain>`` hosts. A domain may appear only once in a route config (Envoy
rejects duplicates), so full host names are claimed first and a short form that would
collide is left out. Every virtual host sends the attempt count upstream
(``include_request_attempt_count``: the app sees ``x-envoy-attempt-count``), as Istio's default
proxy headers do for sidecars and gateways.
"""

from __future__ import annotations

import dataclasses
from collections import ChainMap
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2

from pilot.api.http_route import MAX_DIRECT_RESPONSE_BODY
from pilot.model.convert_routes import all_destinations
from pilot.model.mesh import MeshSnapshot, RoutingRule, Service, ServicePort
from pilot.translate import names
from pilot.translate.encoded import Encoded
from pilot.translate.http_routes import (
    allow_large_direct_bodies,
    default_route,
    needs_large_direct_bodies,
    outbound_default_route,
    virtual_service_routes,
)
from pilot.translate.memo import carried_by, memoized
from pilot.translate.policy import cluster_hash_policies
from pilot.translate.retries import inbound_retry_policy
from pilot.translate.route_source import RouteSource
from pilot.xds.wire import len_field, str_field


def outbound_route_config(mesh: MeshSnapshot, namespace: str, labels: Mapping[str, str] | None = None) -> Any:
    """RouteConfiguration ``outbound`` for a sidecar in ``namespace``; vhosts sorted by name.

    ``labels`` are the sidecar's own: VirtualService matches with ``sourceLabels`` apply only
    when they fit, which makes the route config specific to the proxy class.
    """
    return _outbound(mesh, namespace, labels)


def _outbound(mesh: MeshSnapshot, namespace: str, labels: Mapping[str, str] | None, tail: Sequence[Any] = ()) -> Any:
    """The route configuration as a message: the virtual hosts in name order, then `tail`."""
    source = RouteSource(namespace, labels or {})
    vhosts = _sorted_vhosts(mesh)
    # Domains depend on the set of services (claims resolve collisions) and the namespace, not on
    # routing rules: a VirtualService edit reuses them, and every unchanged virtual host message.
    claimed = carried_by(mesh, _CLAIMS_TAG, tuple(svc for _, svc, _ in vhosts), (namespace, mesh.cluster_domain),
                         lambda: _claimed_domains(mesh, vhosts, namespace))
    made = [_vhost(mesh, name, service, port, source, claimed[name]) for name, service, port in vhosts]
    config = route_pb2.RouteConfiguration(name=names.OUTBOUND_ROUTE, virtual_hosts=[*made, *tail])
    return allow_large_direct_bodies(config)


def _sorted_vhosts(mesh: MeshSnapshot) -> list[tuple[str, Service, ServicePort]]:
    """(virtual host name, service, port) for every HTTP port of every service, by name."""
    return sorted(((names.virtual_host(s.host, p.number), s, p) for s in mesh.services.values()
                   for p in s.http_ports), key=lambda v: v[0])


def _vhost(mesh: MeshSnapshot, name: str, service: Service, port: ServicePort, source: RouteSource,
           domains: tuple[str, ...]) -> Any:
    """A virtual host message, for the configuration as a message (no carry: tests and tools);
    pilot's pushes keep only its encoding (`_vhost_entry`)."""
    return service_vhost(name, domains, vhost_routes(mesh, service, port, source))


def service_vhost(name: str, domains: Sequence[str], routes: Sequence[Any]) -> Any:
    """A service's virtual host on a sidecar (both outbound models): its routes, and the attempt
    count sent upstream as Istio's default proxy headers do."""
    return rc.VirtualHost(name=name, domains=domains, routes=routes, include_request_attempt_count=True)


# One virtual host as an element of RouteConfiguration.virtual_hosts (field 2), and whether one of
# its routes answers with a body over Envoy's default limit.
_Entry = tuple[bytes, bool]


def _entry(vhost: Any) -> _Entry:
    return len_field(2, vhost.SerializeToString(deterministic=True)), needs_large_direct_bodies((vhost,))


def _vhost_entry(mesh: MeshSnapshot, name: str, service: Service, port: ServicePort, source: RouteSource,
                 domains: tuple[str, ...]) -> _Entry:
    """`_entry` of `_vhost`, carried while its routes are the same objects and its name and
    domains equal (namespaces and mesh versions share the encodings of unchanged virtual hosts),
    with no message kept: the configuration is joined from the encodings, and a VirtualHost
    message (~4 KB in memory with its routes) would only stay to key them (2,000 at mission
    scale)."""
    routes = vhost_routes(mesh, service, port, source)
    return carried_by(mesh, _ENTRY_TAG, (routes,), (name, domains),
                      lambda: _entry(service_vhost(name, domains, routes)))


_DATA, _LARGE = itemgetter(0), itemgetter(1)
_NAME_FIELD = str_field(1, names.OUTBOUND_ROUTE)
_LARGE_BODIES_FIELD = route_pb2.RouteConfiguration(
    max_direct_response_body_size_bytes={"value": MAX_DIRECT_RESPONSE_BODY}).SerializeToString(deterministic=True)


def _encode(entries: Sequence[_Entry], tail: Sequence[_Entry]) -> Encoded:
    """The configuration's deterministic encoding: its name (field 1), the virtual hosts (2), and
    the direct-response body limit (11) when a body needs it, in field order as protobuf writes."""
    large = any(map(_LARGE, entries)) or any(map(_LARGE, tail))
    pieces = [_NAME_FIELD, *map(_DATA, entries), *map(_DATA, tail)]
    if large:
        pieces.append(_LARGE_BODIES_FIELD)
    return Encoded(route_pb2.RouteConfiguration, b"".join(pieces))


@dataclass(frozen=True, eq=False)
class OutboundBasis:
    """An outbound route configuration and what it was made from, to patch its next version.

    `services`, `destination_rules` and `virtual_services` are the narrowed mesh's mappings the
    configuration was generated from; `positions` says where each service host's virtual hosts
    are (in port order) in `entries`, and `tail` holds the virtual hosts after them.
    """

    services: Mapping[str, Service]
    destination_rules: Mapping[str, Any]
    virtual_services: Mapping[str, RoutingRule]
    cluster_domain: str
    claimed: Mapping[str, tuple[str, ...]]
    positions: Mapping[str, list[int]]
    entries: tuple[_Entry, ...]
    tail: tuple[_Entry, ...]
    config: Encoded


def carried_outbound_config(
    mesh: MeshSnapshot, key: Hashable, namespace: str, labels: Mapping[str, str] | None, tail: list[Any]
) -> Any:
    """`outbound_route_config(mesh, namespace, labels)` followed by the virtual hosts `tail`; with a
    carry (pilot's pushes), as its encoding (`Encoded`), patched from the one recorded under `key`
    for the last mesh version when only routing rules differ there. `key` must determine `tail`
    and what of `namespace` and `labels` routes read.

    Why: a VirtualService edit changes the virtual hosts of its own hosts, yet generating the
    configuration walks every service of the mesh: ~30 ms at 1,000 services, once per distinct
    route configuration (per namespace with sidecars, at least) and route change. Patched, it
    costs a pass comparing the routing rule of each host by identity, the changed virtual hosts,
    and one join of the virtual hosts' encodings (~0.3 ms for 1,000), which every namespace and
    version shares while they are unchanged. No message of the whole configuration is kept: it
    would take ~2.1 MB per namespace, and copying it for each edit ~1.3 ms. Equal, byte for
    byte, to generating it afresh (tests compare both).
    """
    carry = mesh.carry
    if carry is None:
        return _outbound(mesh, namespace, labels, tail)
    basis: OutboundBasis | None = carry.previous(key)
    if basis is not None:
        patched = _patched(mesh, basis, namespace, labels)
        if patched is not None:
            carry.record(key, patched)
            return patched.config
    skeleton = _skeleton(mesh)
    entries, own = _namespace_entries(mesh, skeleton, namespace, labels)
    ends = tuple(_entry(v) for v in tail)
    basis = OutboundBasis(mesh.services, mesh.destination_rules, mesh.virtual_services, mesh.cluster_domain,
                          ChainMap(own, skeleton.claimed), skeleton.positions, entries, ends, _encode(entries, ends))
    carry.record(key, basis)
    return basis.config


@dataclass(frozen=True, eq=False)
class _Skeleton:
    """What the outbound configurations of every namespace seeing one visible mesh share.

    A namespace's configuration differs from another's only in the bare short names (``reviews``,
    ``reviews:9080``) of its own services' virtual hosts, and in virtual hosts whose routing rule
    selects senders (``sourceNamespace``, ``sourceLabels``). So the virtual hosts in name order,
    the domains claimed without bare short names, and the encodings of the virtual hosts that
    depend on neither are made once per visible mesh; a namespace then costs its own services'
    and the sender-selecting virtual hosts, and a join, instead of a walk over every service.
    """

    vhosts: tuple[tuple[str, Service, ServicePort], ...]  # (virtual host name, service, port), by name
    claimed: dict[str, tuple[str, ...]]  # domains, no bare short names (no namespace's own); read-only
    full: frozenset[str]  # every full-name domain: a bare short name never takes one
    positions: Mapping[str, list[int]]  # service host -> its virtual hosts' positions, in port order
    own: Mapping[str, tuple[tuple[int, tuple[str, ...]], ...]]  # namespace -> (position, bare short names)
    by_sender: tuple[int, ...]  # positions whose routes depend on the sender
    entries: tuple[_Entry, ...]  # encodings; those at `by_sender` are placeholders


_PLACEHOLDER: _Entry = (b"", False)


def _skeleton(mesh: MeshSnapshot) -> _Skeleton:
    return memoized(mesh, ("outbound-skeleton", mesh.cluster_domain), lambda: _make_skeleton(mesh))


def _make_skeleton(mesh: MeshSnapshot) -> _Skeleton:
    vhosts = _sorted_vhosts(mesh)
    services = tuple(svc for _, svc, _ in vhosts)
    # No namespace: the domains every namespace shares (claims resolve collisions among them).
    claimed = carried_by(mesh, _CLAIMS_TAG, services, ("", mesh.cluster_domain),
                         lambda: _claimed_domains(mesh, vhosts, ""))
    full = frozenset(d for _, svc, port in vhosts for d in _domains(mesh, svc, port, "")[0])
    positions: dict[str, list[int]] = {}
    own: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
    by_sender: list[int] = []
    entries: list[_Entry] = []
    neutral = RouteSource("")
    for index, (name, service, port) in enumerate(vhosts):
        positions.setdefault(service.host, []).append(index)
        found = _bare_short_names(mesh, service, port)
        if found is not None:
            own.setdefault(found[0], []).append((index, found[1]))
        label_keys, by_namespace = _sender_inputs(mesh.virtual_services.get(service.host))
        if label_keys or by_namespace:
            by_sender.append(index)
            entries.append(_PLACEHOLDER)
        else:
            entries.append(_vhost_entry(mesh, name, service, port, neutral, claimed[name]))
    return _Skeleton(tuple(vhosts), claimed, full, positions, {ns: tuple(v) for ns, v in own.items()},
                     tuple(by_sender), tuple(entries))


def _bare_short_names(mesh: MeshSnapshot, service: Service, port: ServicePort) -> tuple[str, tuple[str, ...]] | None:
    """(namespace, the bare short names a virtual host wants for sidecars of that namespace),
    for Kubernetes-style hosts (see `_domains`)."""
    found = _kube_name(mesh, service.host)
    if found is None:
        return None
    name, ns = found
    bare = (name,) if port == service.http_ports[0] else ()
    return ns, (f"{name}:{port.number}", *bare)


def _kube_name(mesh: MeshSnapshot, host: str) -> tuple[str, str] | None:
    """(name, namespace) of a ``<name>.<namespace>.svc.<cluster domain>`` host, else None."""
    suffix = f".svc.{mesh.cluster_domain}"
    if not host.endswith(suffix):
        return None
    name, _, ns = host[: -len(suffix)].partition(".")
    return (name, ns) if name and ns and "." not in ns else None


def _namespace_entries(
    mesh: MeshSnapshot, skeleton: _Skeleton, namespace: str, labels: Mapping[str, str] | None
) -> tuple[tuple[_Entry, ...], dict[str, tuple[str, ...]]]:
    """The virtual host encodings of `namespace`'s configuration, and the domains of the virtual
    hosts whose domains differ from the skeleton's (the namespace's own services)."""
    own = skeleton.own.get(namespace, ())
    if not own and not skeleton.by_sender:
        return skeleton.entries, {}
    claimed: dict[str, tuple[str, ...]] = {}
    for index, bare in own:
        name = skeleton.vhosts[index][0]
        claimed[name] = tuple(sorted((*skeleton.claimed[name], *(d for d in bare if d not in skeleton.full))))
    source = RouteSource(namespace, labels or {})
    entries = list(skeleton.entries)
    for index in sorted({i for i, _ in own}.union(skeleton.by_sender)):
        name, service, port = skeleton.vhosts[index]
        domains = claimed.get(name) or skeleton.claimed[name]
        entries[index] = _vhost_entry(mesh, name, service, port, source, domains)
    return tuple(entries), claimed


def _patched(
    mesh: MeshSnapshot, basis: OutboundBasis, namespace: str, labels: Mapping[str, str] | None
) -> OutboundBasis | None:
    """`basis` with the virtual hosts of every host whose routing rule is another object made
    again; None unless the DestinationRules are the very same objects and the services the same
    but for their endpoints (`_same_but_endpoints`).

    Why endpoints may differ: an endpoint move makes a new Service object, and endpoint changes
    come all the time; requiring the very same services made the first routing edit after any of
    them generate the whole configuration again (~0.2 s of CPU at 1,000 services, on the event
    loop for the route part prepared during the debounce), where patching costs ~1 ms. No virtual
    host reads an endpoint.
    """
    if (mesh.cluster_domain != basis.cluster_domain or not _same_but_endpoints(basis.services, mesh.services)
            or not _same_objects(basis.destination_rules, mesh.destination_rules)):
        return None
    before, after = basis.virtual_services, mesh.virtual_services
    changed = [h for h in mesh.services if before.get(h) is not after.get(h)] if before is not after else []
    if not changed:
        return dataclasses.replace(basis, services=mesh.services, virtual_services=after)
    source = RouteSource(namespace, labels or {})
    entries = list(basis.entries)
    for host in changed:
        service = mesh.services[host]
        for index, port in zip(basis.positions.get(host, ()), service.http_ports, strict=True):
            name = names.virtual_host(host, port.number)
            entries[index] = _vhost_entry(mesh, name, service, port, source, basis.claimed[name])
    return dataclasses.replace(basis, services=mesh.services, virtual_services=after, entries=tuple(entries),
                               config=_encode(entries, basis.tail))


def _same_objects(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Same keys, each with the very same object."""
    if old is new:
        return True
    return len(old) == len(new) and all(new.get(k, _MISSING) is v for k, v in old.items())


_MISSING = object()
# Every field of a Service but its endpoints: what virtual hosts may read (a new field counts too).
_ROUTED_FIELDS = tuple(f.name for f in dataclasses.fields(Service) if f.name != "endpoints")


def _same_but_endpoints(old: Mapping[str, Service], new: Mapping[str, Service]) -> bool:
    """Same hosts, each the very same Service or one equal to it in every field but `endpoints`.
    Cost: an identity check per service, and a field comparison for the few that are new objects."""
    if old is new:
        return True
    if len(old) != len(new):
        return False
    for host, service in new.items():
        was = old.get(host, _MISSING)
        if was is service:
            continue
        if was is _MISSING or any(getattr(was, f) != getattr(service, f) for f in _ROUTED_FIELDS):
            return False
    return True


_CLAIMS_TAG = "vhost-domains"
_ENTRY_TAG = "vhost-entry"


def _claimed_domains(
    mesh: MeshSnapshot, vhosts: list[tuple[str, Service, ServicePort]], namespace: str
) -> dict[str, tuple[str, ...]]:
    """Each virtual host's domains, sorted, after collisions are resolved (`_claim`)."""
    claimed = _claim({name: _domains(mesh, svc, port, namespace) for name, svc, port in vhosts})
    return {name: tuple(sorted(found)) for name, found in claimed.items()}


def _domains(
    mesh: MeshSnapshot, service: Service, port: ServicePort, namespace: str
) -> tuple[list[str], list[str]]:
    """(full-name domains, short-form domains) wanted by one virtual host."""
    full = names.host_domains(service.host)
    short: list[str] = []
    found = _kube_name(mesh, service.host)
    if found is not None:
        name, ns = found
        short = [f"{name}.{ns}", f"{name}.{ns}.svc"] + ([name] if ns == namespace else [])
    bare = port == service.http_ports[0]  # http_ports are sorted by number

    def with_port(hosts: list[str]) -> list[str]:
        return [f"{h}:{port.number}" for h in hosts] + (hosts if bare else [])

    return with_port(full), with_port(short)


def _claim(wanted: dict[str, tuple[list[str], list[str]]]) -> dict[str, set[str]]:
    taken: set[str] = set()
    claimed: dict[str, set[str]] = {name: set() for name in wanted}
    for tier in (0, 1):
        for name in sorted(wanted):
            for domain in wanted[name][tier]:
                if domain not in taken:
                    taken.add(domain)
                    claimed[name].add(domain)
    return claimed


def vhost_routes(mesh: MeshSnapshot, service: Service, port: ServicePort, source: RouteSource) -> list[Any]:
    """A virtual host's routes, shared by every sender they would be identical for.

    They depend on the sender only through `sourceLabels` and `sourceNamespace` matches, so the
    memo key holds just the parts of `source` those matches of this rule look at.
    """
    rule = mesh.virtual_services.get(service.host)
    label_keys, by_namespace = _sender_inputs(rule)
    sender = (
        source.gateways, source.namespace if by_namespace else None,
        tuple(sorted((k, v) for k, v in source.labels.items() if k in label_keys)),
    )
    key = ("vhost-routes", service.host, port.number, *sender)
    return memoized(mesh, key, lambda: _carried_routes(mesh, service, port, source, rule, sender))


def _carried_routes(
    mesh: MeshSnapshot, service: Service, port: ServicePort, source: RouteSource, rule: RoutingRule | None,
    sender: tuple[Hashable, ...],
) -> list[Any]:
    """The routes, carried over from the last mesh version while everything they read is unchanged:
    the rule, the service, and the service and DestinationRule of every destination host
    (cluster ports, consistent-hash policies). A VirtualService edit so rebuilds its own hosts only."""
    hosts = sorted({d.host for d in all_destinations(rule)} | {service.host}) if rule else [service.host]
    reads = (rule, service, *(x for h in hosts for x in (mesh.services.get(h), mesh.destination_rules.get(h))))
    return carried_by(mesh, _ROUTES_TAG, reads, (port, *sender),
                      lambda: _build_routes(mesh, service, port, source, rule))


_ROUTES_TAG = "vhost-routes"


def _sender_inputs(rule: RoutingRule | None) -> tuple[frozenset[str], bool]:
    """Label keys and whether the namespace of the sender matter to a rule's HTTP matches."""
    if rule is None:
        return frozenset(), False
    matches = [m for route in rule.http for m in route.matches]
    return frozenset(k for m in matches for k, _ in m.source_labels), any(m.source_namespace for m in matches)


def _build_routes(
    mesh: MeshSnapshot, service: Service, port: ServicePort, source: RouteSource, rule: RoutingRule | None
) -> list[Any]:
    routes = virtual_service_routes(mesh, rule, port.number, source) if rule is not None else []
    # A VirtualService with nothing for this port leaves the port's default behaviour in place.
    if routes:
        return routes
    default = outbound_default_route(names.outbound_cluster(port.number, "", service.host))
    default.route.hash_policy.extend(cluster_hash_policies(mesh, [default.route.cluster]))
    return [default]


def inbound_route_config(port: int, grpc: bool = False) -> Any:
    """Inline route config of an inbound listener: everything to the local app's cluster.

    As Istio's inbound route: no timeout, a gRPC caller's ``grpc-timeout`` header honoured
    without a cap, and (except on gRPC ports, where it breaks streams) a request reset before
    it reached the app is resent twice (Istio 1.24).
    """
    name = names.inbound_route(port)
    route = default_route(names.inbound_cluster(port))
    route.route.ClearField("max_grpc_timeout")
    route.route.max_stream_duration.max_stream_duration.FromSeconds(0)
    route.route.max_stream_duration.grpc_timeout_header_max.FromSeconds(0)
    if not grpc:
        route.route.retry_policy.CopyFrom(inbound_retry_policy())
    return route_pb2.RouteConfiguration(
        name=name, virtual_hosts=[rc.VirtualHost(name=name, domains=["*"], routes=[route])]
    )
