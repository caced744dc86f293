"""`build_mesh`: the whole config store in, one frozen, indexed MeshSnapshot out (pure).

Conflicts are resolved the same way every time: the oldest object (creationTimestamp; objects
without one count as newest), then namespace/name, wins. Every loser and every dangling
reference is reported in ``MeshSnapshot.warnings``; nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
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
    WorkloadEntrySpec,
)
from pilot.api.authorization import AuthorizationPolicy
from pilot.api.peer_authentication import PeerAuthentication
from pilot.api.request_authentication import RequestAuthentication
from pilot.api.service_entry import ServicePort as ApiServicePort
from pilot.kube.registry import KubeService, ServiceEndpoints
from pilot.model import convert_routes
from pilot.model import mesh as m
from pilot.model.authz import Security, build_security
from pilot.model.build_scoping import ScopeInputs, build_scoping, gateway_server_conflicts, oldest_merged_rules
from pilot.model.conversions import Conversions
from pilot.model.delegates import resolve_delegates
from pilot.model.hosts import ROOT_NAMESPACE
from pilot.model.local_ports import local_port_warnings
from pilot.model.mtls import PeerAuthn, peer_authn_stage

MESH_GATEWAY = "mesh"
_LATEST = datetime.max.replace(tzinfo=UTC)
T = TypeVar("T", bound=ApiObject)
R = TypeVar("R")
K = TypeVar("K", str, tuple[str, str])
V = TypeVar("V")
_ABSENT = object()


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
    for obj in objects:
        # A Kubernetes Service (pilot.kube.registry) is a ServiceEntry under its own store kind.
        by_kind.setdefault(ServiceEntry if type(obj) is KubeService else type(obj), []).append(obj)
    # Each pass is a stage (`Conversions.stage`): skipped while its inputs are the same objects.
    entries, dest_rules = _of(memo, by_kind, ServiceEntry), _of(memo, by_kind, DestinationRule)
    served = _with_registry_endpoints(memo, entries, _of(memo, by_kind, ServiceEndpoints))
    gateways, sidecars = _of(memo, by_kind, Gateway), _of(memo, by_kind, Sidecar)
    all_routes = _of(memo, by_kind, VirtualService)
    virtual_services, delegate_warnings = memo.stage(
        "delegates", all_routes, (), lambda _: _warned(partial(resolve_delegates, list(all_routes))))
    workloads = _workloads_stage(memo, _of(memo, by_kind, WorkloadEntry))
    services, service_warnings, shape = _services_stage(memo, served, workloads)
    routing, routing_warnings = memo.stage(
        "routing", tuple(virtual_services), (cluster_domain,),
        lambda sub: _warned(lambda w: _virtual_services(virtual_services, cluster_domain, w, sub)))
    scope_inputs = ScopeInputs(list(entries), list(dest_rules), virtual_services, list(gateways), list(sidecars))
    scoping, scoping_warnings = memo.stage(
        "scoping", (*entries, *dest_rules, *virtual_services, *gateways, *sidecars), (cluster_domain, root_namespace),
        lambda sub: _warned(lambda w: build_scoping(scope_inputs, cluster_domain, w, sub, root_namespace)))
    # The base view, with same-namespace rules merged as Istio does.
    rules = memo.stage("rules", (scoping,), (), lambda _: oldest_merged_rules(scoping))
    warnings = [*delegate_warnings, *service_warnings, *routing_warnings, *scoping_warnings]
    warnings += memo.stage("gateway-conflicts", (scoping, workloads), (),
                           lambda _: gateway_server_conflicts(scoping.gateways, workloads))
    # Keyed on the services' shape: an endpoint change moves no host, port or subset.
    warnings += memo.stage("dangling", (routing, shape, rules), (),
                           lambda _: _dangling_references(routing, services, rules))
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
        if len(before) == count + len(endpoints) and all(a is b for a, b in zip(before, entries, strict=False)):
            changed = [i for i, (a, b) in enumerate(zip(before[count:], endpoints, strict=True)) if a is not b]
            if len(changed) <= max(len(endpoints) // 8, 1) and len(sub) < 2 * count + 64 and all(
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
        if len(before) == len(items):
            changed = [key for key, value in items.items() if before.get(key, _ABSENT) is not value]
            if len(changed) <= max(len(items) // 8, 1) and all(key in before for key in changed):
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
        if len(before) == len(entries):
            changed = [i for i, (a, b) in enumerate(zip(before, entries, strict=True)) if a is not b]
            if not changed:
                return value  # type: ignore[no-any-return]
            # Bounded: patching only adds conversions, so past twice the entries a full pass runs.
            if len(changed) <= max(len(entries) // 8, 1) and len(sub) < 2 * len(entries) + 64 and all(
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
    if last is not None and len(last[1]) == len(found):
        sub, before, ordered = last
        changed = [i for i, (a, b) in enumerate(zip(before, found, strict=True)) if a is not b]
        if changed and len(changed) <= max(len(found) // 8, 1) and all(
                precedence(before[i]) == precedence(found[i]) for i in changed):
            position = {id(obj): n for n, obj in enumerate(ordered)}
            patched = list(ordered)
            for i in changed:
                patched[position[id(before[i])]] = found[i]
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


# The services stage's result: the services, their conflict warnings, their shape (see
# `_services_stage`), the workload index, and what patching needs (`_Owners`).
_Services = tuple[dict[str, m.Service], tuple[str, ...], object, "_WorkloadIndex", "_Owners"]


def _services_stage(
    memo: Conversions, entries: tuple[ServiceEntry, ...], workloads: dict[tuple[str, str], m.Workload]
) -> tuple[dict[str, m.Service], tuple[str, ...], object]:
    """The services, their conflict warnings, and their shape: a token that stays the same object
    while every service keeps its host, ports and owner (only endpoints moved), so stages that read
    no endpoint (dangling references) can key on it instead of on the services.

    When only a few workloads moved (an endpoint change), the workload index is patched and only
    the ServiceEntries whose selector picks a moved workload (before or after the move) are looked
    at again: a WorkloadEntry edit at 1,000 services costs a few entries, not a pass over all of
    them. Their hosts, and so which entry owns each host, cannot change (the entries are the same).
    """
    last = memo.stage_last("services")
    if last is not None:
        sub, before, (services, warnings, shape, index, owners) = last
        old = before[-1]
        if len(before) == len(entries) + 1 and all(a is b for a, b in zip(before, entries, strict=False)):
            if old is workloads:
                return services, warnings, shape
            moved = _moved(old, workloads)
            if moved is not None and len(sub) < 2 * (len(entries) + len(workloads)) + 64:
                index.replace(moved)
                patched = dict(services)
                for i in owners.selecting(entries, moved):
                    for host, service in _entry_services_memo(entries[i], index, sub).items():
                        if owners.hosts.get(host) == i:
                            patched[host] = service
                memo.stage_store("services", sub, (*entries, workloads), (),
                                 (patched, warnings, shape, index, owners))
                return patched, warnings, shape

    def full(sub: Conversions) -> _Services:
        index = _WorkloadIndex(workloads.values())
        found: list[str] = []
        owners = _Owners(entries)
        return _services(entries, index, found, sub, owners), tuple(found), object(), index, owners

    services, warnings, shape, _, _ = memo.stage("services", (*entries, workloads), (), full)
    return services, warnings, shape


def _moved(
    old: Mapping[tuple[str, str], m.Workload], new: Mapping[tuple[str, str], m.Workload]
) -> list[tuple[m.Workload | None, m.Workload | None]] | None:
    """(before, after) per workload that changed, appeared (None before) or went (None after);
    None when that is more than an eighth of them (rebuilding is then as cheap)."""
    moved: list[tuple[m.Workload | None, m.Workload | None]] = [
        (old.get(k), wl) for k, wl in new.items() if old.get(k) is not wl]
    added = sum(1 for before, _ in moved if before is None)
    if len(old) + added != len(new):
        moved += [(wl, None) for k, wl in old.items() if k not in new]
    return moved if len(moved) <= max(len(new) // 8, 1) else None


def _services(
    entries: Sequence[ServiceEntry], index: _WorkloadIndex, warnings: list[str], memo: Conversions, owners: _Owners,
) -> dict[str, m.Service]:
    services: dict[str, m.Service] = {}
    for i, se in enumerate(entries):
        for host, service in _entry_services_memo(se, index, memo).items():
            if host in services:
                warnings.append(
                    f"{se.ref}: host {host} is already defined by {entries[owners.hosts[host]].ref}; "
                    "ignored for this host"
                )
                continue
            owners.hosts[host] = i
            services[host] = service
    return services


def _entry_services_memo(se: ServiceEntry, index: _WorkloadIndex, memo: Conversions) -> dict[str, m.Service]:
    """A ServiceEntry's services: a function of the entry and the workloads its selector may pick,
    so while all of them are the same objects they are the same Services (no work, same identity)."""
    selector = se.spec.workload_selector
    candidates = tuple(index.candidates(se.metadata.namespace, selector.labels)) if selector else ()
    return memo.keyed("service-entry", (se, *candidates), (), partial(_entry_services, se, candidates, memo))


class _Owners:
    """Which entry owns each host (the first to define it), and the entries with a workload selector
    indexed like workloads, so a moved workload finds the entries that may select it."""

    def __init__(self, entries: Sequence[ServiceEntry]) -> None:
        self.hosts: dict[str, int] = {}  # host -> position of the entry that defines it
        self.by_label: dict[tuple[str, str, str], list[int]] = {}  # (namespace, key, value) -> entries
        self.any_labels: dict[str, list[int]] = {}  # namespace -> entries whose selector is empty
        for i, se in enumerate(entries):
            selector = se.spec.workload_selector
            if selector is None:
                continue
            if not selector.labels:
                self.any_labels.setdefault(se.metadata.namespace, []).append(i)
            for key, value in selector.labels.items():
                self.by_label.setdefault((se.metadata.namespace, key, value), []).append(i)

    def selecting(self, entries: Sequence[ServiceEntry],
                  moved: Iterable[tuple[m.Workload | None, m.Workload | None]]) -> list[int]:
        """Positions of the entries whose selector picks any of the workloads, before or after."""
        found: set[int] = set()
        for pair in moved:
            for wl in pair:
                if wl is None:
                    continue
                found.update(self.any_labels.get(wl.namespace, ()))
                for key, value in wl.labels.items():
                    for i in self.by_label.get((wl.namespace, key, value), ()):
                        selector = entries[i].spec.workload_selector
                        if selector is not None and m.selects(selector.labels, wl.labels):
                            found.add(i)
        return sorted(found)


def _entry_services(
    se: ServiceEntry, candidates: tuple[m.Workload, ...], memo: Conversions
) -> dict[str, m.Service]:
    """The Services of one ServiceEntry (one per host) given the workloads its selector may pick."""
    ports = memo.of(_ports, se)
    endpoints = _endpoints(se, ports, candidates, memo)
    return {
        host: memo.same(("service", host), m.Service(
            host=host,
            namespace=se.metadata.namespace,
            name=se.metadata.name,
            ports=ports,
            resolution=se.spec.resolution.value,
            location=se.spec.location.value,
            selector=m.frozen_map(se.spec.workload_selector.labels) if se.spec.workload_selector else None,
            endpoints=endpoints,
            addresses=tuple(sorted(set(se.spec.addresses))),
        ))
        for host in se.spec.hosts
    }


def _ports(se: ServiceEntry) -> tuple[m.ServicePort, ...]:
    return tuple(sorted((_port(p) for p in se.spec.ports), key=lambda p: p.number))


def _port(p: ApiServicePort) -> m.ServicePort:
    return m.ServicePort(
        name=p.name, number=p.number, protocol=p.effective_protocol, target_port=p.target_port
    )


def endpoint_port(port: m.ServicePort, workload_ports: Mapping[str, int] | None) -> int:
    """Where an instance listens for ``port``: its own port map, else targetPort, else the port."""
    own = (workload_ports or {}).get(port.name)
    return int(own) if own else (port.target_port or port.number)


class _WorkloadIndex:
    """Workloads by namespace and by (namespace, label, value): selectors look at candidates only."""

    def __init__(self, workloads: Iterable[m.Workload]) -> None:
        self.by_namespace: dict[str, list[m.Workload]] = {}
        self.by_label: dict[tuple[str, str, str], list[m.Workload]] = {}
        for wl in workloads:
            self.by_namespace.setdefault(wl.namespace, []).append(wl)
            for key, value in wl.labels.items():
                self.by_label.setdefault((wl.namespace, key, value), []).append(wl)

    def replace(self, moved: Iterable[tuple[m.Workload | None, m.Workload | None]]) -> None:
        """Take out each `before` (by identity) and add each `after`: a few moved workloads cost
        a few list scans instead of indexing every workload again."""
        for before, after in moved:
            if before is not None:
                _drop(self.by_namespace[before.namespace], before)
                for key, value in before.labels.items():
                    _drop(self.by_label[(before.namespace, key, value)], before)
            if after is not None:
                self.by_namespace.setdefault(after.namespace, []).append(after)
                for key, value in after.labels.items():
                    self.by_label.setdefault((after.namespace, key, value), []).append(after)

    def candidates(self, namespace: str, labels: Mapping[str, str]) -> list[m.Workload]:
        """A superset of the workloads `labels` selects in `namespace` (the smallest such list)."""
        if not labels:
            return self.by_namespace.get(namespace, [])
        return min((self.by_label.get((namespace, k, v), []) for k, v in labels.items()), key=len)


def _drop(items: list[m.Workload], wl: m.Workload) -> None:
    """Remove `wl` itself (not an equal workload) from `items`."""
    for i, item in enumerate(items):
        if item is wl:
            del items[i]
            return


def _endpoints(
    se: ServiceEntry, ports: tuple[m.ServicePort, ...], candidates: tuple[m.Workload, ...], memo: Conversions
) -> tuple[m.Endpoint, ...]:
    found: list[m.Endpoint] = []
    selector = se.spec.workload_selector
    if selector is not None:
        for wl in candidates:
            if wl.address and m.selects(selector.labels, wl.labels):
                found.append(memo.of(_workload_endpoint, wl, ports))
    found += memo.of(_inline_endpoints, se, ports)
    return tuple(sorted(found, key=lambda e: (e.address, e.workload or "", sorted(e.ports.items()))))


def _workload_endpoint(wl: m.Workload, ports: tuple[m.ServicePort, ...]) -> m.Endpoint:
    port_map = {p.name: endpoint_port(p, wl.ports) for p in ports}
    return m.Endpoint(wl.address, m.frozen_map(port_map), wl.labels, wl.weight, f"{wl.namespace}/{wl.name}",
                      namespace=wl.namespace, service_account=wl.service_account)


def _inline_endpoints(se: ServiceEntry, ports: tuple[m.ServicePort, ...]) -> list[m.Endpoint]:
    return [_inline_endpoint(ep, ports, se.metadata.namespace) for ep in se.spec.endpoints if ep.address]


def _inline_endpoint(ep: WorkloadEntrySpec, ports: tuple[m.ServicePort, ...], namespace: str) -> m.Endpoint:
    port_map = {p.name: endpoint_port(p, ep.ports) for p in ports}
    return m.Endpoint(ep.address, m.frozen_map(port_map), m.frozen_map(ep.labels), ep.weight, None,
                      namespace=namespace, service_account=ep.service_account)


def _virtual_services(
    entries: Sequence[VirtualService], cluster_domain: str, warnings: list[str], memo: Conversions
) -> dict[str, m.RoutingRule]:
    found: dict[str, m.RoutingRule] = {}
    for vs in entries:
        if vs.spec.gateways and MESH_GATEWAY not in vs.spec.gateways:
            continue  # gateway-only routes do not apply to sidecars
        rule = memo.of(convert_routes.routing_rule, vs, cluster_domain)
        for host in rule.hosts:
            if host in found:
                continue  # build_scoping reports the conflict where exportTo lets sidecars see both
            found[host] = rule
    return found


def _dangling_references(
    routing: dict[str, m.RoutingRule], services: dict[str, m.Service], rules: dict[str, m.DestinationPolicy]
) -> list[str]:
    """Destinations naming hosts, subsets or ports that do not exist (Envoy would answer 503)."""
    out: list[str] = []
    seen: set[str] = set()
    for rule in routing.values():
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
            if msg not in seen:
                seen.add(msg)
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
