"""`build_mesh`: the whole config store in, one frozen, indexed MeshSnapshot out (pure).

Conflicts are resolved the same way every time: the oldest object (creationTimestamp; objects
without one count as newest), then namespace/name, wins. Every loser and every dangling
reference is reported in ``MeshSnapshot.warnings``; nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from itertools import groupby
from types import MappingProxyType
from typing import TypeVar

from pilot.api import (
    ApiObject,
    DestinationRule,
    Gateway,
    ServiceEntry,
    Sidecar,
    VirtualService,
    WorkloadEntry,
)
from pilot.api.authorization import AuthorizationPolicy
from pilot.api.peer_authentication import PeerAuthentication
from pilot.api.request_authentication import RequestAuthentication
from pilot.kube.registry import KubeService, ServiceEndpoints
from pilot.model import convert_routes
from pilot.model import mesh as m
from pilot.model.authz import Security, build_security
from pilot.model.build_scoping import ScopeInputs, build_scoping, gateway_server_conflicts, oldest_merged_rules
from pilot.model.build_services import services_stage
from pilot.model.conversions import Conversions, changed_keys, changed_positions, position, same_objects
from pilot.model.delegates import resolve_delegates
from pilot.model.hosts import ROOT_NAMESPACE
from pilot.model.local_ports import local_port_warnings
from pilot.model.mtls import PeerAuthn, peer_authn_stage
from pilot.model.route_patches import delegates_stage, for_sidecars, routing_stage, scoping_stage
from pilot.model.scoping import Scoping

_LATEST = datetime.max.replace(tzinfo=UTC)
T = TypeVar("T", bound=ApiObject)
R = TypeVar("R")
K = TypeVar("K", str, tuple[str, str])
V = TypeVar("V")
FEW = 8  # changed objects found by a search each rather than through a map of all positions
_DANGLING = "dangling-findings"  # (shape, rules, id(rule) -> (rule, its findings)) of the last check


def precedence(obj: ApiObject) -> tuple[datetime, str, str]:
    """Sort key for conflict resolution: oldest first, then namespace, then name."""
    ts = obj.metadata.creation_timestamp
    if ts is not None and ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return (ts or _LATEST, obj.metadata.namespace, obj.metadata.name)


def build_mesh(
    objects: Iterable[ApiObject], cluster_domain: str = "cluster.local", conversions: Conversions | None = None,
    carry: Conversions | None = None, jwks: Mapping[str, str] | None = None, trust_domain: str = "cluster.local",
    root_namespace: str = ROOT_NAMESPACE,
) -> m.MeshSnapshot:
    """Index every object into a MeshSnapshot; see the module docstring for conflict rules.

    `conversions` carries per-object conversions over from the previous build (pilot keeps
    one), and unchanged services keep their identity; `carry` is handed to the generators
    (`MeshSnapshot.carry`; its generations are the pusher's to end). The result is the same
    without either. `jwks` holds the key sets pilot fetched for RequestAuthentication rules
    (jwksUri, or ``openid:<issuer>``: see `pilot.model.authz.jwks_sources`). `trust_domain` names
    workload identities (``spiffe://<trust_domain>/ns/<ns>/sa/<sa>``) that clients verify;
    `root_namespace` is Istio's config root namespace (its policies and Sidecar apply mesh-wide).
    """
    memo = Conversions() if conversions is None else conversions
    memo.next_build()
    by_kind: dict[type[ApiObject], list[ApiObject]] = {}
    # Runs of one type at a time (the store lists objects by kind: a handful of runs, not a step per
    # object). A Kubernetes Service (pilot.kube.registry) is a ServiceEntry under its own store kind.
    for kind, run in groupby(objects, type):
        by_kind.setdefault(ServiceEntry if kind is KubeService else kind, []).extend(run)
    # Each pass is a stage (`Conversions.stage`): skipped while its inputs are the same objects.
    entries, dest_rules = _of(memo, by_kind, ServiceEntry), _of(memo, by_kind, DestinationRule)
    served = _with_registry_endpoints(memo, entries, _of(memo, by_kind, ServiceEndpoints))
    gateways, sidecars = _of(memo, by_kind, Gateway), _of(memo, by_kind, Sidecar)
    all_routes = _of(memo, by_kind, VirtualService)
    virtual_services, delegate_warnings = delegates_stage(
        memo, all_routes, lambda _: _warned(partial(resolve_delegates, list(all_routes))))
    workloads = _workloads_stage(memo, _of(memo, by_kind, WorkloadEntry))
    services, service_warnings, shape = services_stage(memo, served, workloads)
    routing, routing_warnings = routing_stage(
        memo, tuple(virtual_services), cluster_domain,
        lambda sub: _warned(lambda w: _virtual_services(virtual_services, cluster_domain, w, sub)))
    scope_inputs = ScopeInputs(list(entries), list(dest_rules), virtual_services, list(gateways), list(sidecars))
    scoping, scoping_warnings = scoping_stage(memo, scope_inputs, cluster_domain, root_namespace, lambda sub: _warned(
        lambda w: build_scoping(scope_inputs, cluster_domain, w, sub, root_namespace)))
    rules = _base_rules(memo, scoping)
    warnings = [*delegate_warnings, *service_warnings, *routing_warnings, *scoping_warnings]
    warnings += memo.stage("gateway-conflicts", (scoping, workloads), (),
                           lambda _: gateway_server_conflicts(scoping.gateways, workloads))
    warnings += memo.stage("dangling", (routing, shape, rules), (),  # shape: hosts and ports
                           lambda sub: _dangling_references(routing, services, rules, shape, sub))
    warnings += memo.stage("local-ports", (services,), (), lambda _: local_port_warnings(services))
    security, peer_authn = _security(memo, by_kind, jwks, scoping.root_namespace)
    return m.MeshSnapshot(
        cluster_domain=cluster_domain,
        trust_domain=trust_domain,
        peer_authn=peer_authn,
        services=_frozen(memo, "frozen-services", services),
        workloads=_frozen(memo, "frozen-workloads", workloads),
        destination_rules=memo.stage("frozen-rules", (rules,), (), lambda _: m.frozen_map(rules)),
        virtual_services=memo.stage("frozen-routing", (routing,), (), lambda _: m.frozen_map(routing)),
        sidecars=memo.stage("sidecars", sidecars, (), lambda _: _sidecars(sidecars)),
        scoping=scoping,
        security=security,
        warnings=tuple(warnings),
        carry=carry,
    )


def _security(
    memo: Conversions, by_kind: Mapping[type[ApiObject], list[ApiObject]], jwks: Mapping[str, str] | None,
    root_namespace: str,
) -> tuple[Security, PeerAuthn]:
    """The `security.istio.io` stages: authorization and JWT rules (with the fetched key sets), and
    PeerAuthentication."""
    authz, authn = _of(memo, by_kind, AuthorizationPolicy), _of(memo, by_kind, RequestAuthentication)
    fetched = tuple(sorted((jwks or {}).items()))
    security = memo.stage("security", (*authz, *authn), (len(authz), fetched),
                          lambda sub: build_security(authz, authn, dict(fetched), sub))
    peers = _of(memo, by_kind, PeerAuthentication)
    peer_authn = memo.stage("peer-authn", peers, (root_namespace,), lambda _: peer_authn_stage(peers, root_namespace))
    return security, peer_authn


def _with_registry_endpoints(
    memo: Conversions, entries: tuple[ServiceEntry, ...], endpoints: tuple[ServiceEndpoints, ...]
) -> tuple[ServiceEntry, ...]:
    """`entries` with each Kubernetes Service's endpoints (its ServiceEndpoints) added inline.

    Only the services stage sees the result: hosts, ports and exportTo (scoping, routes) come
    from the Service alone, so an endpoint change leaves those stages' inputs the same objects.
    A service keeps its merged object while it and its endpoints are the same instances; when a
    few ServiceEndpoints were replaced (an endpoint change), the last result is patched at their
    services' positions: O(endpoint objects) identity checks instead of a pass over every entry."""
    if not endpoints:
        return entries
    last = memo.stage_last("registry-endpoints")
    if last is not None:
        sub, before, (merged, position) = last
        count = len(entries)
        if len(before) == count + len(endpoints) and same_objects(before[:count], entries):
            changed = changed_positions(before[count:], endpoints)
            if changed is not None and sub.has_room(count) and all(
                    _key(before[count + i]) == _key(endpoints[i]) for i in changed):
                patched = list(merged)
                for i in changed:
                    at = position.get(_key(endpoints[i]))
                    if at is not None:
                        patched[at] = sub.of_all(_merged, (entries[at], endpoints[i]))
                result = (tuple(patched), position)
                memo.stage_store("registry-endpoints", sub, (*entries, *endpoints), (), result)
                return result[0]

    def full(sub: Conversions) -> tuple[tuple[ServiceEntry, ...], dict[tuple[str, str], int]]:
        by_service = {_key(e): e for e in endpoints}
        position = {_key(se): i for i, se in enumerate(entries) if type(se) is KubeService and _key(se) in by_service}
        merged = list(entries)
        for key, i in position.items():
            merged[i] = sub.of_all(_merged, (entries[i], by_service[key]))
        return tuple(merged), position

    return memo.stage("registry-endpoints", (*entries, *endpoints), (), full)[0]


def _merged(se: ServiceEntry, endpoints: ServiceEndpoints) -> ServiceEntry:
    spec = se.spec.model_copy(update={"endpoints": (*se.spec.endpoints, *endpoints.spec.endpoints)})
    return se.model_copy(update={"spec": spec})


def _frozen(memo: Conversions, tag: str, items: dict[K, V]) -> Mapping[K, V]:
    """`m.frozen_map(items)` as a stage; when `items` holds the same keys as last time and a few
    values were replaced (an endpoint change), the last sorted map is copied with those values
    replaced: an identity check per entry instead of sorting ~6,000 workloads again."""
    last = memo.stage_last(tag)
    if last is not None:
        sub, (before,), frozen = last
        if before is items:
            return frozen  # type: ignore[no-any-return]
        changed = changed_keys(before, items)  # a stage patched the dict: same keys, same order
        if changed is not None:
            patched = dict(frozen)  # in key order already
            for key in changed:
                patched[key] = items[key]
            result: Mapping[K, V] = MappingProxyType(patched)
            memo.stage_store(tag, sub, (items,), (), result)
            return result
    return memo.stage(tag, (items,), (), lambda _: m.frozen_map(items))


def _warned(compute: Callable[[list[str]], R]) -> tuple[R, tuple[str, ...]]:
    """`compute(warnings)` and the warnings it added, so a stage's result carries its warnings."""
    warnings: list[str] = []
    return compute(warnings), tuple(warnings)


def _workloads_stage(memo: Conversions, entries: tuple[WorkloadEntry, ...]) -> dict[tuple[str, str], m.Workload]:
    """The workloads by (namespace, name); when a few entries were replaced in place (an endpoint
    change), the last result patched: O(entries) identity checks instead of a conversion pass."""
    last = memo.stage_last("workloads")
    if last is not None:
        sub, before, value = last
        changed = changed_positions(before, entries)
        if changed == []:
            return value  # type: ignore[no-any-return]
        if changed is not None and sub.has_room(len(entries)) and all(
                _key(before[i]) == _key(entries[i]) for i in changed):
            patched = dict(value)
            for i in changed:
                patched[_key(entries[i])] = sub.of(_workload, entries[i])
            memo.stage_store("workloads", sub, entries, (), patched)
            return patched
    return memo.stage("workloads", entries, (), lambda sub: _workloads(list(entries), sub))


def _key(e: ApiObject) -> tuple[str, str]:
    return (e.metadata.namespace, e.metadata.name)


def _of(memo: Conversions, by_kind: Mapping[type[ApiObject], list[ApiObject]], cls: type[T]) -> tuple[T, ...]:
    """The objects of one kind in precedence order: sorted again only when they changed, and when
    a few were replaced by objects of equal precedence (an edit), the last order patched."""
    found = tuple(by_kind.get(cls, ()))
    tag = ("by-precedence", cls)
    last = memo.stage_last(tag)
    if last is not None:
        sub, before, ordered = last
        changed = changed_positions(before, found)
        if changed and all(precedence(before[i]) == precedence(found[i]) for i in changed):
            patched = list(ordered)
            if len(changed) <= FEW:  # a search in C each: no map of every object's position
                for i in changed:
                    patched[position(ordered, before[i])] = found[i]
            else:
                where = {id(obj): n for n, obj in enumerate(ordered)}
                for i in changed:
                    patched[where[id(before[i])]] = found[i]
            memo.stage_store(tag, sub, found, (), tuple(patched))
            return tuple(patched)
    return memo.stage(tag, found, (), lambda _: tuple(sorted(found, key=precedence)))  # type: ignore[arg-type]


def _workload(e: WorkloadEntry) -> m.Workload:
    return m.Workload(
        namespace=e.metadata.namespace,
        name=e.metadata.name,
        address=e.spec.address,
        labels=m.frozen_map(e.spec.labels),
        service_account=e.spec.service_account,
        ports=m.frozen_map(e.spec.ports),
        weight=e.spec.weight,
        network=e.spec.network,
        locality=e.spec.locality,
    )


def _workloads(entries: list[WorkloadEntry], memo: Conversions) -> dict[tuple[str, str], m.Workload]:
    return {(e.metadata.namespace, e.metadata.name): memo.of(_workload, e) for e in entries}


def _virtual_services(
    entries: Sequence[VirtualService], cluster_domain: str, warnings: list[str], memo: Conversions
) -> dict[str, m.RoutingRule]:
    found: dict[str, m.RoutingRule] = {}
    for vs in entries:
        if not for_sidecars(vs):
            continue  # gateway-only routes do not apply to sidecars
        rule = memo.of(convert_routes.routing_rule, vs, cluster_domain)
        for host in rule.hosts:
            if host in found:
                continue  # build_scoping reports the conflict where exportTo lets sidecars see both
            found[host] = rule
    return found


def _base_rules(memo: Conversions, scoping: Scoping) -> dict[str, m.DestinationPolicy]:
    """The base view of DestinationRules, same-namespace rules merged as Istio does. Scoping is
    rebuilt by any routing edit; equal rules keep the last build's object, so what is keyed by it
    (the per-rule dangling checks, the frozen map) is reused."""
    rules = memo.stage("rules", (scoping,), (), lambda _: oldest_merged_rules(scoping))
    return memo.same("merged-rules", rules)


def _dangling_references(
    routing: dict[str, m.RoutingRule], services: dict[str, m.Service], rules: dict[str, m.DestinationPolicy],
    shape: object, memo: Conversions,
) -> list[str]:
    """Destinations naming hosts, subsets or ports that do not exist (Envoy would answer 503).

    Each rule's findings are kept while the rule, the services' hosts and ports (`shape`) and the
    DestinationRules are the same objects: a VirtualService edit checks that rule alone, not the
    mesh's 1,000. They are looked up by the rule's identity in one table per (`shape`, `rules`),
    ~0.2 us a rule, where a memo key per rule cost ~2 us (2 ms of a mission-scale route change).
    """
    last = memo.previous(_DANGLING)
    kept: dict[int, tuple[m.RoutingRule, list[str]]] = (
        last[2] if last is not None and last[0] is shape and last[1] is rules else {})
    found: dict[int, tuple[m.RoutingRule, list[str]]] = {}
    out: list[str] = []
    seen: set[str] = set()
    for rule in routing.values():
        entry = kept.get(id(rule))
        if entry is None or entry[0] is not rule:
            entry = (rule, _dangling_in(rule, services, rules))
        found[id(rule)] = entry  # the entry keeps its rule alive: ids stay their own
        for msg in entry[1]:
            if msg not in seen:
                seen.add(msg)
                out.append(msg)
    memo.record(_DANGLING, (shape, rules, found))
    return out


def _dangling_in(
    rule: m.RoutingRule, services: dict[str, m.Service], rules: dict[str, m.DestinationPolicy]
) -> list[str]:
    """One rule's destinations naming hosts, subsets or ports that do not exist, in its order."""
    out: list[str] = []
    ref = f"VirtualService {rule.namespace}/{rule.name}"
    for d in convert_routes.all_destinations(rule):
        svc = services.get(d.host)
        if svc is None:
            msg = f"{ref}: destination {d.host}: no ServiceEntry defines this host"
        elif d.subset and d.subset not in (rules[d.host].subsets if d.host in rules else {}):
            msg = f"{ref}: destination {d.host}: subset {d.subset!r} is not defined by a DestinationRule"
        elif d.port is not None and svc.port(d.port) is None:
            msg = f"{ref}: destination {d.host}: port {d.port} is not a port of the service"
        else:
            continue
        out.append(msg)
    return out


def _sidecars(entries: Sequence[Sidecar]) -> tuple[m.SidecarScope, ...]:
    scopes = [
        m.SidecarScope(
            namespace=s.metadata.namespace,
            name=s.metadata.name,
            selector=m.frozen_map(s.spec.workload_selector.labels) if s.spec.workload_selector else None,
            ingress_endpoints=m.frozen_map(
                {i.port.number: i.default_endpoint for i in s.spec.ingress if i.default_endpoint}
            ),
            ingress_ports=m.frozen_map({i.port.number: (i.port.protocol or "").upper() for i in s.spec.ingress}),
        )
        for s in entries
    ]
    # Istio: a Sidecar with a selector beats the namespace-wide default; oldest first otherwise.
    return tuple(sorted(scopes, key=lambda s: s.selector is None))
