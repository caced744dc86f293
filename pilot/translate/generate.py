"""`generate(mesh, proxy)`: all xDS resources of one proxy class. Pure: same input, same output."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from types import MappingProxyType
from typing import Any

from pilot.model.authz import WorkloadSecurity, workload_security
from pilot.model.mesh import MeshSnapshot, Service
from pilot.model.mtls import WorkloadMtls, workload_mtls
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import names
from pilot.translate.captured import captured_parts
from pilot.translate.clusters import inbound_clusters_for, outbound_clusters
from pilot.translate.common import sorted_by_name
from pilot.translate.encoded import as_message
from pilot.translate.endpoints import load_assignments, patched_assignments
from pilot.translate.gateway import gateway_resources
from pilot.translate.listeners import sidecar_listeners_for
from pilot.translate.memo import carried_value, memoized, memoized_for
from pilot.translate.passthrough import PASSTHROUGH_CLUSTER, allow_any, passthrough_cluster, passthrough_vhost
from pilot.translate.routes import carried_outbound_config
from pilot.translate.scope import InboundPort, ProxyView, proxy_view, scope_view
from pilot.translate.tcp_routes import outbound_l4_listeners
from pilot.translate.vhds import vhds_parts
from pilot.translate.visibility import (
    outbound_policy_vhosts,
    routing_rules_alone_differ,
    selected_rules,
    shared_narrowed_routes,
    visible_mesh,
)
from pilot.xds import typeurls

Resources = dict[str, dict[str, Any]]  # type URL -> resource name -> xds-protos message
Parts = dict[str, tuple[Mapping[str, Any], ...]]  # type URL -> disjoint parts, shared ones first


def _shared(mesh: MeshSnapshot, narrowed: MeshSnapshot) -> MeshSnapshot:
    """One object for every namespace that sees exactly the same services and rules.

    Narrowing reuses the mesh's own service and rule objects, so identities say "the same";
    the memoized entry keeps them alive, so an id is never reused while it is a key. Each
    mapping's part of the signature is made once per mapping object (`_identities`): namespaces
    patched from one shared narrowed mesh hand over the very same mappings, so across 20
    namespaces the signature costs one walk of ~1,000 services, not 20.
    """
    signature = (
        "same-view",
        _identities(mesh, narrowed.services),
        _identities(mesh, narrowed.destination_rules),
        _identities(mesh, narrowed.virtual_services),
    )
    return memoized(mesh, signature, lambda: narrowed)


def _identities(mesh: MeshSnapshot, mapping: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    """(key, id(value)) of every entry, memoized on the mesh per mapping object (kept alive there)."""
    return memoized_for(mesh, "identities", mapping, lambda: tuple((k, id(v)) for k, v in mapping.items()))


def _source_label_keys(seen: MeshSnapshot) -> frozenset[str]:
    """Label keys that HTTP route matches select senders by (`sourceLabels`)."""
    return frozenset(
        key
        for rule in seen.virtual_services.values()
        for route in rule.http
        for match in route.matches
        for key, _ in match.source_labels
    )


def _outbound_routes(seen: MeshSnapshot, view: ProxyView, key: Hashable) -> dict[str, Any]:
    """The sidecar's outbound route config: depends on its namespace, labels and egress scope,
    which `key` (the route part's memo key) determines; patched from the last mesh version's when
    only routing rules changed (`carried_outbound_config`)."""
    tail = [*outbound_policy_vhosts(view.egress), *([passthrough_vhost()] if allow_any(view) else [])]
    outbound = carried_outbound_config(seen, ("outbound-config", key), view.namespace, view.labels, tail)
    return {names.OUTBOUND_ROUTE: outbound}


def _seen(mesh: MeshSnapshot, proxy: ProxyClass, view: ProxyView) -> MeshSnapshot:
    """What the proxy may see; parts depending only on this are computed once and shared."""
    egress = None if proxy.kind == ProxyKind.ROUTER else view.egress
    selected = selected_rules(mesh, proxy.namespace, view.labels)  # DestinationRules picked by workloadSelector
    key = ("visible", proxy.namespace, egress, selected)
    return memoized(mesh, key, lambda: _visible(mesh, key, view.labels))


def _visible(mesh: MeshSnapshot, key: tuple[Any, ...], labels: Mapping[str, str]) -> MeshSnapshot:
    """`visible_mesh` for `key` (namespace, egress, selected rules), patched from the last mesh
    version's result when the services changed only in what visibility does not read.

    Why: an endpoint move makes a new Service object and so a new mesh; narrowing it again walks
    every service, rule and DestinationRule (~10 ms at 1,000 services) to find what it found last
    time. Visibility reads a service's host and namespace only, and the routing rules and
    DestinationRules only through `scoping`, which the build hands over as the same object while
    they are unchanged. So with the same scoping and the same hosts in the same namespaces, the
    narrowed mesh is the last one with this mesh's service objects: O(visible services) of
    dictionary work. A routing edit (the same services mapping, the scoping different in its
    routing rules alone, no egress host list) keeps the narrowed services and DestinationRules and
    matches the rules to hosts again (~2 ms at 1,000 rules, instead of ~10-16 ms). The result
    equals `visible_mesh(...)` (tests compare both).
    """
    namespace, egress, _ = key[1:]
    carry = mesh.carry
    if carry is None:
        return _shared(mesh, visible_mesh(mesh, namespace, egress, labels))
    last = carry.previous(("visible-mesh", *key))
    if last is not None:
        old_services, old_scoping, old = last
        patched = None
        if old_scoping is mesh.scoping and _same_placement(old_services, mesh.services):
            patched = dataclasses.replace(mesh, services=_placed(mesh, old.services),
                                          virtual_services=old.virtual_services,
                                          destination_rules=old.destination_rules)
        elif (old_services is mesh.services and (egress is None or egress.hosts is None)
              and routing_rules_alone_differ(old_scoping, mesh.scoping)):
            patched = dataclasses.replace(mesh, services=old.services, destination_rules=old.destination_rules,
                                          virtual_services=shared_narrowed_routes(mesh, namespace, old.services))
        if patched is not None:
            patched = _shared(mesh, patched)
            carry.record(("visible-mesh", *key), (mesh.services, mesh.scoping, patched))
            return patched
    # What is recorded is the shared object: next time, namespaces that shared it patch the very
    # same mappings, and so match rules to hosts once between them (`shared_narrowed_routes`).
    narrowed = _shared(mesh, visible_mesh(mesh, namespace, egress, labels))
    carry.record(("visible-mesh", *key), (mesh.services, mesh.scoping, narrowed))
    return narrowed


def _placed(mesh: MeshSnapshot, narrowed: Mapping[str, Service]) -> Mapping[str, Service]:
    """`narrowed`'s hosts with this mesh's service objects: one mapping per narrowed mapping and
    mesh, so namespaces that shared a view before an endpoint move share it after (memoized on
    the mesh, which keeps `narrowed` alive while its id is a key)."""
    services = mesh.services
    return memoized_for(mesh, "placed-services", narrowed,
                        lambda: MappingProxyType({h: services[h] for h in narrowed}))


def _same_placement(old: Mapping[str, Service], new: Mapping[str, Service]) -> bool:
    """Same hosts, each in the same namespace (the services may be other objects)."""
    if old is new:
        return True
    if len(old) != len(new):
        return False
    for host, service in new.items():
        was = old.get(host)
        if was is None or (was is not service and was.namespace != service.namespace):
            return False
    return True


def generate_endpoints(mesh: MeshSnapshot, proxy: ProxyClass, view: ProxyView | None = None) -> dict[str, Any]:
    """Only the ClusterLoadAssignments of ``proxy``: exactly ``generate(...)[ENDPOINT]``, for the EDS fast path."""
    seen = _seen(mesh, proxy, view or scope_view(mesh, proxy))  # `_seen` reads no inbound port
    if proxy.mtls:  # endpoints marked for auto mTLS: shared by the classes with mesh certificates
        return memoized(seen, ("endpoints", "mtls"), lambda: _endpoints(seen, True))
    return memoized(seen, "endpoints", lambda: _endpoints(seen, False))


def _endpoints(seen: MeshSnapshot, mtls: bool) -> dict[str, Any]:
    """`sorted_by_name(load_assignments(seen, mtls))`, patched from the last mesh version's part
    when the DestinationRules and PeerAuthentications seen are the very same objects (an endpoint
    move: see `_visible`), so an endpoint change costs what moved (`patched_assignments`)."""
    carry = seen.carry
    peers = seen.peer_authn if mtls else None
    if carry is None:
        return sorted_by_name(load_assignments(seen, mtls=mtls))
    key = ("endpoint-part", mtls, id(seen.destination_rules))
    last = carry.previous(key)  # the entry holds the rules: the id stays theirs while it lives
    part: dict[str, Any] | None = None
    if last is not None and last[0] is seen.destination_rules and last[1] is peers:
        part = patched_assignments(seen, last[2], last[3], peers)
    if part is None:
        part = sorted_by_name(load_assignments(seen, mtls=mtls))
    carry.record(key, (seen.destination_rules, peers, seen.services, part))
    return part


def generate_parts(mesh: MeshSnapshot, proxy: ProxyClass) -> Parts:
    """Each type of ``proxy``'s config as disjoint parts: shared ones first, then its own.

    A shared part (outbound clusters, endpoints, the outbound route config) is the very same
    mapping object for every class that has it (memoized on the visible mesh), so it is
    serialized and versioned once per mesh version however many classes use it; the class's
    own part holds only what depends on the proxy itself (inbound clusters and listeners,
    passthrough). Parts keep their positions per proxy kind (and listener model: a captured
    class's listeners are a shared outbound part and its own, `pilot.translate.captured`), so
    two versions of a class's config compare part by part. Values are messages, or their
    encodings (`pilot.translate.encoded.Encoded`) where keeping messages would cost memory: the
    outbound clusters, the endpoints and, with a carry, the outbound route configuration.
    """
    view = proxy_view(mesh, proxy)
    seen = _seen(mesh, proxy, view)
    clusters_key = ("clusters", "mtls") if proxy.mtls else "clusters"
    shared_clusters = memoized(seen, clusters_key, lambda: sorted_by_name(outbound_clusters(seen, proxy.mtls)))
    if proxy.kind == ProxyKind.ROUTER:
        gateway_listeners, gateway_routes = gateway_resources(seen, view)
        own_clusters: Mapping[str, Any] = {}
        listener_parts: tuple[Mapping[str, Any], ...] = (sorted_by_name(gateway_listeners),)
        routes: Mapping[str, Any] = sorted_by_name(gateway_routes)
    elif proxy.captured:  # iptables capture: Istio's virtualOutbound/virtualInbound model
        own_clusters, listener_parts, routes = captured_parts(
            mesh, seen, view, _security(mesh, view), _peer_mtls(mesh, view) if proxy.mtls else None,
            _route_labels(seen, view))
    else:
        # What depends on the proxy alone is a function of a few values: carried by value, so
        # classes with equal ones (and the next mesh version) share the very same parts.
        passthrough = allow_any(view)
        own_clusters = carried_value(mesh, _own_clusters, view.inbound, passthrough)
        security = _security(mesh, view)
        peer = _peer_mtls(mesh, view) if proxy.mtls else None
        listeners = carried_value(mesh, _own_listeners, view.bind_address, view.inbound, passthrough, security, peer)
        l4 = outbound_l4_listeners(seen, view)
        if l4:
            listeners = sorted_by_name({**listeners, **l4})
        listener_parts = (listeners,)
        routes = _sidecar_routes(seen, proxy, view, passthrough)
    parts: dict[str, tuple[Mapping[str, Any], ...]] = {
        typeurls.CLUSTER: (shared_clusters, own_clusters),
        typeurls.ENDPOINT: (generate_endpoints(mesh, proxy, view),),
        typeurls.LISTENER: listener_parts,
        typeurls.ROUTE: (routes,),
    }
    if proxy.vhds and proxy.kind == ProxyKind.SIDECAR and routes:
        bases, hosts = vhds_parts(mesh, routes)
        parts[typeurls.ROUTE], parts[typeurls.VIRTUAL_HOST] = (bases,), (hosts,)
    return parts


def generate_routes(mesh: MeshSnapshot, proxy: ProxyClass) -> Mapping[str, Any]:
    """Only the route configurations of a sidecar that is not captured: exactly
    ``generate_parts(...)[ROUTE][0]`` (the same object), for the route fast path; for a VHDS
    class, the configurations whole, which `vhds_parts` splits as `generate_parts` does."""
    if proxy.kind != ProxyKind.SIDECAR or proxy.captured:
        raise ValueError(f"{proxy.describe()}: only plain sidecars have a route part of their own")
    view = proxy_view(mesh, proxy)
    return _sidecar_routes(_seen(mesh, proxy, view), proxy, view, allow_any(view))


def _sidecar_routes(seen: MeshSnapshot, proxy: ProxyClass, view: ProxyView, passthrough: bool) -> Mapping[str, Any]:
    """A plain sidecar's route part, shared by the classes with equal inputs (memoized on `seen`)."""
    key = ("routes", proxy.namespace, _route_labels(seen, view), view.egress, passthrough)
    return memoized(seen, key, lambda: sorted_by_name(_outbound_routes(seen, view, key)))


def _route_labels(seen: MeshSnapshot, view: ProxyView) -> tuple[tuple[str, str], ...]:
    """Only labels some route's sourceLabels mention can change route configs: they key them."""
    keys = memoized(seen, "source-label-keys", lambda: _source_label_keys(seen))
    return tuple(sorted((k, v) for k, v in view.labels.items() if k in keys))


def _own_clusters(inbound: tuple[InboundPort, ...], passthrough: bool) -> dict[str, Any]:
    """A sidecar's own clusters: one per inbound port, and PassthroughCluster under ALLOW_ANY."""
    own = inbound_clusters_for(inbound)
    if passthrough:
        own[PASSTHROUGH_CLUSTER] = passthrough_cluster()
    return sorted_by_name(own)


def _own_listeners(
    bind: str, inbound: tuple[InboundPort, ...], passthrough: bool, security: WorkloadSecurity,
    peer: WorkloadMtls | None = None,
) -> dict[str, Any]:
    return sorted_by_name(sidecar_listeners_for(bind, inbound, passthrough, security, peer))


def _peer_mtls(mesh: MeshSnapshot, view: ProxyView) -> WorkloadMtls:
    """The workload's PeerAuthentication modes, once per (namespace, labels) and mesh version."""
    labels = tuple(sorted(view.labels.items()))
    return memoized(mesh, ("peer-mtls", view.namespace, labels),
                    lambda: workload_mtls(mesh.peer_authn, view.namespace, view.labels))


def _security(mesh: MeshSnapshot, view: ProxyView) -> WorkloadSecurity:
    """The AuthorizationPolicies and RequestAuthentications of the proxy's workload, once per
    (namespace, labels) and mesh version."""
    labels = tuple(sorted(view.labels.items()))
    return memoized(mesh, ("security", view.namespace, labels), lambda: workload_security(
        mesh.security, mesh.scoping.root_namespace, view.namespace, view.labels))


def generate(mesh: MeshSnapshot, proxy: ProxyClass) -> Resources:
    """Clusters, endpoints, listeners and routes for ``proxy``, each keyed and sorted by name.

    Both kinds see the mesh narrowed to what their namespace may reach (exportTo, and for
    sidecars their Sidecar's egress hosts); routers get the listeners of their Gateways.
    The same resources as `generate_parts`, merged into one mapping per type, every one a message
    (a part handed over as its encoding, `Encoded`, is parsed: this flat form is for tools, tests
    and custom generators, which read fields; pilot's pushes use `generate_parts`).
    """
    return {
        type_url: sorted_by_name({name: as_message(msg) for part in parts for name, msg in part.items()})
        for type_url, parts in generate_parts(mesh, proxy).items()
    }
