"""The mesh as one proxy may see it: exportTo, Sidecar egress hosts, DestinationRule lookup.

`visible_mesh` returns a MeshSnapshot narrowed for a proxy namespace (and Sidecar scope), with
``virtual_services`` and ``destination_rules`` re-keyed by the hosts that proxy resolves. The
cluster, endpoint and route generators then run unchanged on it, so a service a proxy may not
reach has no cluster, no endpoints and no virtual host there. Pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from envoy.config.route.v3 import route_components_pb2 as rc

from pilot.model.hosts import MESH_GATEWAY, host_matches, namespace_allows, specificity, visible_to
from pilot.model.mesh import (
    DestinationPolicy,
    MeshSnapshot,
    RouteDestination,
    RoutingRule,
    Service,
    frozen_map,
    selects,
)
from pilot.model.policy import NO_POLICY
from pilot.model.scoping import REGISTRY_ONLY, EgressScope, Exported, Scoping
from pilot.translate.memo import memoized, memoized_for

Rules = list[Exported[RoutingRule]]
BLOCK_ALL = "block_all"


def visible_rules(mesh: MeshSnapshot, namespace: str, gateway: str = MESH_GATEWAY) -> Rules:
    """VirtualServices exported to ``namespace`` and bound to ``gateway`` (``mesh``: sidecars), oldest first."""
    return [r for r in mesh.scoping.routing_rules if gateway in r.value.gateways and visible_to(r.export_to, namespace)]


def visible_mesh(
    mesh: MeshSnapshot, namespace: str, egress: EgressScope | None = None, labels: Mapping[str, str] | None = None
) -> MeshSnapshot:
    """``mesh`` narrowed to what a proxy in ``namespace`` (under Sidecar ``egress``) may reach.

    ``labels`` are the proxy's, for DestinationRules with a workloadSelector (see
    `destination_rule_for`); the result depends on them only through `selected_rules`.
    """
    scoping = mesh.scoping
    services = {h: s for h, s in mesh.services.items() if visible_to(scoping.service_export(h), namespace)}
    rules = visible_rules(mesh, namespace)
    if egress is not None and egress.hosts is not None:
        hosts = tuple((namespace if ns == "." else ns, h) for ns, h in egress.hosts)
        rules = [r for r in rules if any(_egress_admits(hosts, r.value.namespace, h) for h in r.value.hosts)]
        wanted = {h for h, s in services.items() if _egress_admits(hosts, s.namespace, h)}
        # Istio keeps what in-scope VirtualServices route to, so no route points at a missing cluster.
        wanted |= {d.host for r in rules for d in _destinations(r.value)} & set(services)
        services = {h: services[h] for h in sorted(wanted)}
    return dataclasses.replace(
        mesh,
        services=frozen_map(services),
        virtual_services=frozen_map(narrowed_routes(mesh, namespace, services, rules)),
        destination_rules=frozen_map(
            {h: p for h, s in services.items() if (p := destination_rule_for(mesh, namespace, s, labels)) is not None}
        ),
    )


def narrowed_routes(
    mesh: MeshSnapshot, namespace: str, services: Mapping[str, Service], rules: Rules | None = None
) -> dict[str, RoutingRule]:
    """`visible_mesh`'s ``virtual_services``: the rules a proxy in ``namespace`` sees (``rules``,
    else every rule exported there), under their hosts and the narrowed ``services`` they match."""
    seen = visible_rules(mesh, namespace) if rules is None else rules
    return routes_by_host([r.value for r in seen], services)


def shared_narrowed_routes(
    mesh: MeshSnapshot, namespace: str, services: Mapping[str, Service]
) -> Mapping[str, RoutingRule]:
    """`narrowed_routes` as a frozen mapping, one object for every namespace that sees the same
    rules over the same `services` mapping (memoized on the mesh).

    Why: after a routing edit each namespace's visible mesh is patched from the last one (see
    `pilot.translate.generate._visible`); with 20 namespaces exporting to each other, matching
    ~1,000 rules to ~1,000 hosts again in each is ~2 ms apiece for twenty equal results. Equal
    results as one object also let the namespaces be recognised as one view in O(1).
    """
    rules = visible_rules(mesh, namespace)
    tag = ("narrowed-routes", tuple(map(id, rules)))  # the rules live as long as the mesh
    return memoized_for(mesh, tag, services, lambda: frozen_map(routes_by_host([r.value for r in rules], services)))


_SCOPING_BESIDES_RULES = tuple(f.name for f in dataclasses.fields(Scoping)
                               if f.name not in ("routing_rules", "rules_by_host", "wildcard_rules"))


def routing_rules_alone_differ(old: Scoping, new: Scoping) -> bool:
    """Whether two scopings are equal but for their routing rules (VirtualServices): then what a
    namespace sees of services and DestinationRules is the same (`rules_by_host` and
    `wildcard_rules` are indexes of `destination_rules`). Identity first: a routing edit keeps
    the other fields' objects."""
    return all((a := getattr(old, f)) is (b := getattr(new, f)) or a == b for f in _SCOPING_BESIDES_RULES)


def _egress_admits(hosts: Iterable[tuple[str, str]], namespace: str, host: str) -> bool:
    return any(namespace_allows(ns, namespace) and host_matches(pattern, host) for ns, pattern in hosts)


def _destinations(rule: RoutingRule) -> Iterable[RouteDestination]:
    for route in rule.http:
        yield from route.destinations
        yield from (mirror.destination for mirror in route.mirrors)
    for l4 in (*rule.tcp, *rule.tls):
        yield from l4.destinations


def routes_by_host(rules: list[RoutingRule], services: Mapping[str, Service]) -> dict[str, RoutingRule]:
    """Each rule under its own hosts (oldest wins), and each service under its most specific matching rule."""
    found: dict[str, RoutingRule] = {}
    for rule in rules:
        for host in rule.hosts:
            found.setdefault(host, rule)
    patterns = sorted((h for h in found if h.startswith("*")), key=specificity)
    for host in services:
        if host not in found:
            best = next((p for p in patterns if host_matches(p, host)), None)
            if best is not None:
                found[host] = found[best]
    return found


def destination_rule_for(
    mesh: MeshSnapshot, namespace: str, service: Service, labels: Mapping[str, str] | None = None
) -> DestinationPolicy | None:
    """Istio's lookup path: the proxy's namespace, then the service's, then the root namespace.

    Within a namespace the most specific host wins (exact before ``*.example.com``), then the oldest.
    A rule with a workloadSelector in the proxy's own namespace that selects its ``labels`` is
    layered over that rule (see `_layered`); one that does not select the proxy never applies.
    """
    candidates = [
        c for c in mesh.scoping.destination_rules_for_host(service.host) if visible_to(c.export_to, namespace)
    ]
    chosen = [c.value for c in candidates if labels is not None and _picks(c.value, namespace, labels)]
    base = _catch_all_rule([c for c in candidates if c.value.selector is None], namespace, service,
                           mesh.scoping.root_namespace)
    if chosen:
        return _layered(min(chosen, key=lambda p: specificity(p.host)), base)
    return base


def _layered(selected: DestinationPolicy, base: DestinationPolicy | None) -> DestinationPolicy:
    """A selected rule over the rule its proxies would get otherwise: its traffic policy (when it
    sets one) replaces the base's, and its subsets join the base's (same name: the selected one's),
    so routes to the base rule's subsets keep working for the selected workloads."""
    if base is None:
        return selected
    own_policy = selected.policy != NO_POLICY or bool(selected.port_policies)
    return dataclasses.replace(
        selected,
        policy=selected.policy if own_policy else base.policy,
        port_policies=selected.port_policies if own_policy else base.port_policies,
        subsets=frozen_map({**base.subsets, **selected.subsets}),
    )


def _catch_all_rule(
    candidates: list[Exported[DestinationPolicy]], namespace: str, service: Service, root_namespace: str
) -> DestinationPolicy | None:
    """The rule without a workloadSelector a proxy in `namespace` gets, by Istio's lookup path."""
    for ns in (namespace, service.namespace, root_namespace):
        in_ns = [c.value for c in candidates if c.value.namespace == ns]
        if in_ns:
            return min(in_ns, key=lambda p: specificity(p.host))  # min is stable: oldest among equals
    return None


def outbound_policy_vhosts(egress: EgressScope | None) -> list[rc.VirtualHost]:
    """Istio's REGISTRY_ONLY: a catch-all virtual host answering 502 for hosts outside the registry.

    ALLOW_ANY (the default) adds nothing here; see `pilot.translate.passthrough`.
    """
    if egress is None or egress.outbound_policy != REGISTRY_ONLY:
        return []
    return [block_all_vhost()]


def block_all_vhost() -> rc.VirtualHost:
    """``block_all``: every host answered 502 (REGISTRY_ONLY's catch-all, both outbound models)."""
    route = rc.Route(name=BLOCK_ALL, match=rc.RouteMatch(prefix="/"))
    route.direct_response.status = 502
    return rc.VirtualHost(name=BLOCK_ALL, domains=["*"], routes=[route], include_request_attempt_count=True)


def selected_rules(mesh: MeshSnapshot, namespace: str, labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The DestinationRules with a workloadSelector that pick a proxy (its namespace's, selecting its labels).

    Proxies of one namespace with the same selected rules see the same mesh, so this keys the
    shared visible mesh; usually it is empty.
    """
    # Run for every class on every push: scan only the (usually no) rules that have a selector.
    rules = mesh.scoping.destination_rules
    with_selector = memoized(mesh, "selector-rules",
                             lambda: tuple(r.value for r in rules if r.value.selector is not None))
    return tuple(sorted((r.namespace, r.name) for r in with_selector if _picks(r, namespace, labels)))


def _picks(rule: DestinationPolicy, namespace: str, labels: Mapping[str, str]) -> bool:
    """Whether a rule with a workloadSelector applies to a proxy: its own namespace's, selected."""
    return rule.selector is not None and rule.namespace == namespace and selects(rule.selector, labels)
