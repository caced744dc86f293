"""The services stage of `build_mesh`: ServiceEntries and the workloads they select, as Services
with their endpoints (pure; `pilot.model.build` runs it as a stage).

Cost follows change: a service is a function of its ServiceEntry and the workloads its selector
may pick, memoized on exactly those objects; when a few workloads moved (an endpoint change), the
workload index is patched and only the entries selecting a moved workload are looked at again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import partial

from pilot.api import ServiceEntry, WorkloadEntrySpec
from pilot.api.service_entry import ServicePort as ApiServicePort
from pilot.model import mesh as m
from pilot.model.conversions import Conversions, changed_keys, same_objects

# The services stage's result: the services, their conflict warnings, their shape (see
# `services_stage`), the workload index, and what patching needs (`_Owners`).
_Services = tuple[dict[str, m.Service], tuple[str, ...], object, "_WorkloadIndex", "_Owners"]


def services_stage(
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
        if len(before) == len(entries) + 1 and same_objects(before[:-1], entries):
            if old is workloads:
                return services, warnings, shape
            moved = _moved(old, workloads)
            if moved is not None and sub.has_room(len(entries) + len(workloads)):
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
    same_keys = changed_keys(old, new)  # the usual case, entries edited in place: compared in C
    if same_keys is not None:
        return [(old[k], new[k]) for k in same_keys]
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
