"""What kind of change separates two mesh snapshots, for the pusher's EDS-only fast path.

`endpoints_only(old, new)` is True when the two meshes differ at most in where endpoints are
(addresses and weights of WorkloadEntries and inline endpoints): every input of clusters,
listeners and routes is unchanged, so proxies need new ClusterLoadAssignments and nothing else.
It errs on the side of False: any doubt means a full push.

`http_routes_only(old, new)` is True when the meshes differ at most in VirtualServices whose
old and new versions carry HTTP routes only, without `sourceLabels`, and share no host with a
rule that has TCP or TLS routes: for a sidecar that is not captured, such an edit changes its
outbound route configuration and nothing else (clusters, endpoints and listeners do not read
HTTP routes; which label keys pick route configurations is unchanged), which is what the
pusher's route fast path relies on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from pilot.model.conversions import changed_keys
from pilot.model.mesh import DNS_RESOLUTIONS, MeshSnapshot, RoutingRule, Service
from pilot.model.scoping import Exported

K = TypeVar("K")


def endpoints_only(old: MeshSnapshot, new: MeshSnapshot) -> bool:
    """True if `new` differs from `old` only in endpoint addresses or weights."""
    if (old.cluster_domain, old.sidecars, old.destination_rules, old.virtual_services, old.scoping, old.security) != (
        new.cluster_domain, new.sidecars, new.destination_rules, new.virtual_services, new.scoping, new.security
    ):
        return False
    if (old.peer_authn, old.trust_domain) != (new.peer_authn, new.trust_domain):  # mutual TLS: listeners, clusters
        return False
    # What the build carried over unchanged is the same object: only the others are compared.
    workloads, services = _replaced(old.workloads, new.workloads), _replaced(old.services, new.services)
    if workloads is None or services is None:
        return False
    for key in workloads:
        was, now = old.workloads[key], new.workloads[key]
        if (was.labels, was.ports, was.service_account) != (now.labels, now.ports, now.service_account):
            return False
    return all(_same_but_endpoints(old.services[h], new.services[h]) for h in services)


def _replaced(old: Mapping[K, Any], new: Mapping[K, Any]) -> list[K] | None:
    """Keys whose value is another object in `new`; None if the keys differ. The build patches its
    maps in place (same keys, same order), so this is usually found in C (`changed_keys`)."""
    found = changed_keys(old, new)
    if found is not None:
        return found
    if old.keys() != new.keys():
        return None
    return [k for k, value in old.items() if value is not new[k]]


def _same_but_endpoints(old: Service, new: Service) -> bool:
    if dataclasses.replace(old, endpoints=()) != dataclasses.replace(new, endpoints=()):
        return False
    if old.resolution in DNS_RESOLUTIONS:
        return old.endpoints == new.endpoints
    # Having endpoints at all decides a cluster's discovery type (EDS or original destination).
    return bool(old.endpoints) == bool(new.endpoints)


def http_routes_only(old: MeshSnapshot, new: MeshSnapshot) -> bool:
    """True if `new` differs from `old` only in HTTP-only VirtualServices (see the module docstring).

    Cost: identity comparisons for everything the build carried over unchanged, plus one pass
    over the VirtualServices (about a millisecond at 1,000 of them).
    """
    if old.scoping.routing_rules == new.scoping.routing_rules:
        return False  # nothing routing-related changed: not this kind of change
    if (old.cluster_domain, old.trust_domain, old.credentials_over_ads) != (
            new.cluster_domain, new.trust_domain, new.credentials_over_ads):
        return False
    if not all(a is b or a == b for a, b in (
            (old.services, new.services), (old.workloads, new.workloads),
            (old.destination_rules, new.destination_rules), (old.sidecars, new.sidecars),
            (old.security, new.security), (old.peer_authn, new.peer_authn))):
        return False
    if dataclasses.replace(old.scoping, routing_rules=()) != dataclasses.replace(new.scoping, routing_rules=()):
        return False
    before = _rules_by_name(old.scoping.routing_rules)
    after = _rules_by_name(new.scoping.routing_rules)
    changed: list[Exported[RoutingRule]] = []  # both versions of every rule that changed, came or went
    for key in before.keys() | after.keys():
        a, b = before.get(key), after.get(key)
        if a is not b and a != b:
            changed += [r for r in (a, b) if r is not None]
    hosts: set[str] = set()
    for exported in changed:
        rule = exported.value
        if rule.tcp or rule.tls or _has_source_labels(rule):
            return False
        hosts.update(rule.hosts)
    if any("*" in h for h in hosts):
        return False
    # A rule with TCP or TLS routes sharing a host with a changed one could gain or lose that host.
    return not any((e.value.tcp or e.value.tls) and (hosts.intersection(e.value.hosts)
                                                     or any("*" in h for h in e.value.hosts))
                   for e in (*old.scoping.routing_rules, *new.scoping.routing_rules))


def _rules_by_name(rules: tuple[Exported[RoutingRule], ...]) -> dict[tuple[str, str], Exported[RoutingRule]]:
    return {(e.value.namespace, e.value.name): e for e in rules}


def _has_source_labels(rule: RoutingRule) -> bool:
    return any(match.source_labels for route in rule.http for match in route.matches)
