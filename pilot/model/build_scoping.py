"""The scoping part of `build_mesh`: exportTo, DestinationRule merging, Gateways, Sidecar egress.

Pure, like `build_mesh`: objects arrive sorted oldest first, so "first" always means oldest.
Everything that is merged, shadowed or dangling is reported in ``warnings``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from pilot.api import DestinationRule, Gateway, ServiceEntry, Sidecar, VirtualService
from pilot.model import convert, convert_routes
from pilot.model import mesh as m
from pilot.model.conversions import Conversions
from pilot.model.gateway import GatewayConfig, gateway_config, servers_by_port
from pilot.model.hosts import (
    MESH_GATEWAY,
    ROOT_NAMESPACE,
    export_set,
    exports_overlap,
    split_scoped_host,
)
from pilot.model.scoping import EgressScope, Exported, Scoping


@dataclasses.dataclass(frozen=True)
class ScopeInputs:
    """The objects scoping reads, each list oldest first."""

    service_entries: Sequence[ServiceEntry]
    destination_rules: Sequence[DestinationRule]
    virtual_services: Sequence[VirtualService]
    gateways: Sequence[Gateway]
    sidecars: Sequence[Sidecar]


def build_scoping(
    inputs: ScopeInputs,
    cluster_domain: str,
    warnings: list[str],
    memo: Conversions | None = None,
    root_namespace: str = ROOT_NAMESPACE,
) -> Scoping:
    """The exportTo-aware view of routing rules, DestinationRules, Gateways and Sidecars.

    A function of the config alone, not of workloads (their Gateway port conflicts are
    `gateway_server_conflicts`), so an endpoint change reuses it whole.
    """
    memo = Conversions() if memo is None else memo
    gateways = tuple(gateway_config(g, warnings) for g in inputs.gateways)
    rules = tuple(
        Exported(memo.of(convert_routes.routing_rule, vs, cluster_domain),
                 export_set(vs.spec.export_to, vs.metadata.namespace))
        for vs in inputs.virtual_services
    )
    warnings += mesh_route_conflicts(rules)
    warnings += gateway_reference_problems(rules, gateways)
    # A routing edit reruns this whole function: the parts that do not read routing rules are
    # kept while their inputs are the same objects (a few ms of a VirtualService edit at 1,000 services).
    entries, dest_rules = tuple(inputs.service_entries), tuple(inputs.destination_rules)
    service_exports = memo.keyed("service-exports", entries, (), lambda: _service_exports(entries))
    merged, merge_warnings = memo.keyed("merged-rules", dest_rules, (cluster_domain,),
                                        lambda: _merged_and_warnings(dest_rules, cluster_domain, memo))
    warnings += merge_warnings
    return Scoping(
        root_namespace=root_namespace,
        service_exports=service_exports,
        routing_rules=rules,
        destination_rules=merged,
        gateways=gateways,
        egress=_egress_scopes(inputs.sidecars, warnings),
    )


def _merged_and_warnings(
    rules: Sequence[DestinationRule], cluster_domain: str, memo: Conversions
) -> tuple[tuple[Exported[m.DestinationPolicy], ...], list[str]]:
    warnings: list[str] = []
    return merged_destination_rules(rules, cluster_domain, warnings, memo), warnings


def _service_exports(entries: Sequence[ServiceEntry]) -> Mapping[str, frozenset[str]]:
    exports: dict[str, frozenset[str]] = {}
    for se in entries:
        for host in se.spec.hosts:
            exports.setdefault(host, export_set(se.spec.export_to, se.metadata.namespace))
    return m.frozen_map(exports)


def merged_destination_rules(
    rules: Sequence[DestinationRule], cluster_domain: str, warnings: list[str], memo: Conversions | None = None
) -> tuple[Exported[m.DestinationPolicy], ...]:
    """Istio merges DestinationRules for one host within one namespace: the oldest rule's traffic
    policy and exportTo stand, later rules add subsets, a repeated subset name keeps the oldest."""
    memo = Conversions() if memo is None else memo
    merged: dict[tuple[str, str], Exported[m.DestinationPolicy]] = {}
    selected: list[Exported[m.DestinationPolicy]] = []
    for rule in rules:
        ns = rule.metadata.namespace
        host = convert.qualify(rule.spec.host, ns, cluster_domain)
        policy = memo.of(convert.destination_policy, rule, host)
        if policy.selector is not None:
            # Picked per proxy by its labels, never merged; only its own namespace's proxies can match.
            selected.append(Exported(policy, frozenset({ns})))
            continue
        found = merged.get((ns, host))
        if found is None:
            merged[(ns, host)] = Exported(policy, export_set(rule.spec.export_to, ns))
            continue
        first = found.value
        dupes = sorted(set(policy.subsets) & set(first.subsets))
        note = f"; its subsets {dupes} are already defined there and ignored" if dupes else ""
        if rule.spec.traffic_policy is not None:
            note += "; its trafficPolicy is ignored (the oldest rule's applies)"
        warnings.append(f"{rule.ref}: merged into DestinationRule {ns}/{first.name} for host {host}{note}")
        subsets = {**policy.subsets, **first.subsets}
        merged[(ns, host)] = dataclasses.replace(found, value=dataclasses.replace(first, subsets=m.frozen_map(subsets)))
    return (*merged.values(), *selected)


def oldest_merged_rules(scoping: Scoping) -> dict[str, m.DestinationPolicy]:
    """Per host, the oldest namespace's merged rule: the proxy-independent view (per-proxy lookup
    is `pilot.translate.visibility.destination_rule_for`)."""
    found: dict[str, m.DestinationPolicy] = {}
    for exported in scoping.destination_rules:
        if exported.value.selector is None:
            found.setdefault(exported.value.host, exported.value)
    return found


def mesh_route_conflicts(rules: Sequence[Exported[m.RoutingRule]]) -> list[str]:
    """Sidecars use one VirtualService per host (Istio merges only on gateways): later ones lose."""
    out: list[str] = []
    claimed: dict[str, list[Exported[m.RoutingRule]]] = {}
    for rule in rules:
        if MESH_GATEWAY not in rule.value.gateways:
            continue
        for host in rule.value.hosts:
            for winner in claimed.get(host, []):
                if exports_overlap(winner.export_to, rule.export_to):
                    out.append(
                        f"VirtualService {rule.value.namespace}/{rule.value.name}: host {host} is already routed "
                        f"by VirtualService {winner.value.namespace}/{winner.value.name} for sidecars that see "
                        "both; ignored there"
                    )
                    break
            claimed.setdefault(host, []).append(rule)
    return out


def gateway_reference_problems(
    rules: Sequence[Exported[m.RoutingRule]], gateways: Sequence[GatewayConfig]
) -> list[str]:
    """Missing Gateways, hosts no server of the Gateway exposes, and VirtualServices merged on one host."""
    known = {g.ref: g for g in gateways}
    out = []
    merged: dict[tuple[str, str], m.RoutingRule] = {}
    for rule in (r.value for r in rules):
        ref_text = f"VirtualService {rule.namespace}/{rule.name}"
        for ref in (g for g in rule.gateways if g != MESH_GATEWAY):
            gateway = known.get(ref)
            if gateway is None:
                out.append(f"{ref_text}: gateway {ref} does not exist")
                continue
            for host in rule.hosts:
                served = {h for s in gateway.servers if (h := s.admits(rule.namespace, host)) is not None}
                if not served:
                    out.append(f"{ref_text}: host {host} is not exposed to namespace {rule.namespace} by Gateway {ref}")
                for h in sorted(served):
                    first = merged.setdefault((ref, h), rule)
                    if first is not rule:
                        out.append(_merge_note(ref_text, first, rule, h, ref))
    return out


def _merge_note(ref_text: str, first: m.RoutingRule, later: m.RoutingRule, host: str, gateway: str) -> str:
    note = (
        f"{ref_text}: routes for host {host} on Gateway {gateway} are merged after "
        f"VirtualService {first.namespace}/{first.name}"
    )
    if later.http and any(not route.matches for route in first.http):  # only http routes can be shadowed
        note += " (whose catch-all route comes first, so these http routes never match)"
    return note


def gateway_server_conflicts(
    gateways: Sequence[GatewayConfig], workloads: Mapping[tuple[str, str], m.Workload]
) -> list[str]:
    """For each declared workload that Gateways select: servers that cannot share its ports."""
    out: list[str] = []
    if not any(g.selector for g in gateways):
        return out  # nothing selects a workload: no walk over thousands of them
    seen: set[tuple[str, ...]] = set()
    for wl in workloads.values():
        selected = tuple(g for g in gateways if g.selector and g.selects(wl.labels))
        key = tuple(g.ref for g in selected)
        if not selected or key in seen:
            continue
        seen.add(key)
        for _port, _servers, conflicts in servers_by_port(selected):
            out += conflicts
    return out


def _egress_scopes(sidecars: Sequence[Sidecar], warnings: list[str]) -> Mapping[tuple[str, str], EgressScope]:
    scopes: dict[tuple[str, str], EgressScope] = {}
    defaults: dict[str, str] = {}
    for sc in sidecars:
        ns = sc.metadata.namespace
        if sc.spec.workload_selector is None:
            if ns in defaults:
                warnings.append(
                    f"{sc.ref}: namespace {ns} already has Sidecar {defaults[ns]} without workloadSelector; "
                    "the oldest one applies"
                )
            defaults.setdefault(ns, sc.metadata.name)
        # "." stays: in the root namespace's default Sidecar it means each workload's own namespace.
        hosts = tuple(split_scoped_host(h, ".") for e in sc.spec.egress for h in e.hosts) if sc.spec.egress else None
        policy = sc.spec.outbound_traffic_policy
        scopes[(ns, sc.metadata.name)] = EgressScope(hosts=hosts, outbound_policy=policy.mode.value if policy else None)
    return m.frozen_map(scopes)
