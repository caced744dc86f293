"""Sidecar checks: resources that select nothing or collide, and egress scopes that hide a host a
VirtualService routes for the Sidecar's own workloads."""

from __future__ import annotations

from collections.abc import Iterator

from pilot.analysis import messages as msg
from pilot.analysis.context import Context
from pilot.analysis.virtual_services import destinations, on_mesh
from pilot.api import Sidecar, VirtualService
from pilot.model.hosts import export_set, host_matches, visible_to
from pilot.model.mesh import selects


def multiple_without_selector(ctx: Context) -> Iterator[msg.Message]:
    """IST0111: more than one Sidecar without workloadSelector in a namespace (only one applies)."""
    by_namespace: dict[str, list[Sidecar]] = {}
    for sc in ctx.of(Sidecar):
        if sc.spec.workload_selector is None:
            by_namespace.setdefault(sc.metadata.namespace, []).append(sc)
    for namespace, sidecars in sorted(by_namespace.items()):
        if len(sidecars) > 1:
            names = ", ".join(s.metadata.name for s in sidecars)
            for sc in sidecars:
                yield ctx.message(msg.MULTIPLE_SIDECARS_WITHOUT_SELECTORS, sc, "spec.workloadSelector",
                                  f'The Sidecars [{names}] in namespace "{namespace}" have no workload selector, '
                                  "which can lead to undefined behavior (pilot applies the oldest)",
                                  "keep one namespace-wide Sidecar; give the others a workloadSelector")


def selects_nothing(ctx: Context) -> Iterator[msg.Message]:
    """IST0127: a Sidecar whose workloadSelector matches no workload of its namespace."""
    if not ctx.workloads_known:
        return
    for sc in ctx.of(Sidecar):
        sel = sc.spec.workload_selector
        if sel is not None and sel.labels and not ctx.selected(sc.metadata.namespace, sel.labels):
            labels = ",".join(f"{k}={v}" for k, v in sorted(sel.labels.items()))
            yield ctx.message(msg.NO_MATCHING_WORKLOADS_FOUND, sc, "spec.workloadSelector.labels",
                              f"No matching workloads for this resource with the following labels: {labels}",
                              "correct the labels to those of the workloads in the Sidecar's namespace")


def _imports(sc: Sidecar, namespace: str, host: str) -> bool:
    """Whether any egress listener of `sc` admits `host` declared in `namespace`."""
    for listener in sc.spec.egress:
        for entry in listener.hosts:
            scope, _, name = entry.partition("/")
            scope = sc.metadata.namespace if scope == "." else scope
            if scope in ("*", namespace) and (host_matches(name, host) or host_matches(host, name)):
                return True
    return False


def _for_workloads_of(sc: Sidecar, vs: VirtualService) -> bool:
    """A VirtualService meant for the Sidecar's workloads: in its namespace, or matching them by sourceLabels."""
    if vs.metadata.namespace == sc.metadata.namespace:
        return True
    sel = sc.spec.workload_selector
    return sel is not None and any(m.source_labels and selects(m.source_labels, sel.labels)
                                   for route in vs.spec.http for m in route.match)


def hides_routed_host(ctx: Context) -> Iterator[msg.Message]:
    """MSH0103: a Sidecar's egress hosts leave out a host that a VirtualService routes for the
    Sidecar's own workloads (or a destination it routes to): those workloads get no route, or a
    route to a cluster they do not have (503 NC)."""
    for sc in ctx.of(Sidecar):
        if not sc.spec.egress or not any(lst.hosts for lst in sc.spec.egress):
            continue
        ns = sc.metadata.namespace
        for vs in ctx.of(VirtualService):
            visible = visible_to(export_set(vs.spec.export_to, vs.metadata.namespace), ns)
            if not (on_mesh(vs) and visible and _for_workloads_of(sc, vs)):
                continue
            ref = f"{vs.metadata.namespace}/{vs.metadata.name}"
            for host in vs.spec.hosts:
                full = ctx.qualify(host, vs.metadata.namespace)
                if not _imports(sc, vs.metadata.namespace, full):
                    yield ctx.message(msg.SIDECAR_HIDES_ROUTED_HOST, sc, "spec.egress",
                                      f"host {full} of VirtualService {ref} is not in the egress hosts, so the "
                                      "Sidecar's workloads do not get its routes",
                                      f'add "{vs.metadata.namespace}/{full}" (or "{vs.metadata.namespace}/*") to '
                                      "spec.egress[].hosts")
            for path, dest in destinations(vs):
                full = ctx.qualify(dest.host, vs.metadata.namespace)
                spaces = ctx.service_namespaces(full)
                if spaces and not any(_imports(sc, space, full) for space in spaces):
                    yield ctx.message(msg.SIDECAR_HIDES_ROUTED_HOST, sc, "spec.egress",
                                      f"destination {full} of VirtualService {ref} ({path}) is not in the egress "
                                      "hosts, so requests routed there fail with 503 (no cluster)",
                                      f'add "{spaces[0]}/{full}" to spec.egress[].hosts')
