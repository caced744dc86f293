"""Finding the described target and a service's instances in an analysis `Context`.

An instance is what a service's traffic lands on: a WorkloadEntry endpoint from the mesh model, an
inline endpoint, or a Pod (or pod template) a Kubernetes selector picks; analysis reads no
EndpointSlices, so pods are matched by selector here, as `Context.instance_labels` matches them.
Pure; cost: one pass over a service's endpoints plus an indexed label lookup.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pilot.analysis.context import Context
from pilot.analysis.inputs import WorkloadFacts
from pilot.model.mesh import Service
from pilot.model.mtls import ISTIO_TLS_MODE, endpoint_tls_mode

TEMPLATE_ORDER = ("WorkloadEntry", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "Pod")


class TargetNotFound(LookupError):
    """The named pod, workload or service is not in the input; the message says what is."""


@dataclass(frozen=True)
class Instance:
    name: str  # namespace/name, or the address of an inline endpoint
    kind: str
    namespace: str
    address: str
    labels: Mapping[str, str]
    service_account: str
    sidecar: bool
    ports: Mapping[str, int] | None = None  # service port name -> the port it listens on (WorkloadEntry)


def find_workload(ctx: Context, kind: str, namespace: str, name: str) -> WorkloadFacts:
    """``pod``: a Pod; ``workload``: a WorkloadEntry, a pod template (Deployment, ...) or a Pod, in that order."""
    kinds = ("Pod",) if kind == "pod" else TEMPLATE_ORDER
    found = [w for w in ctx.workloads if w.namespace == namespace and w.name == name and w.kind in kinds]
    if found:
        return min(found, key=lambda w: kinds.index(w.kind))
    others = sorted(f"{w.kind} {w.namespace}/{w.name}" for w in ctx.workloads if w.name == name)
    hint = f"; found {', '.join(others)}" if others else ""
    if kind == "pod" and any(w.kind != "Pod" for w in ctx.workloads if w.name == name and w.namespace == namespace):
        hint += f" (try: meshctl describe workload {namespace}/{name})"
    raise TargetNotFound(f"{kind} {namespace}/{name} not found{hint}")


def find_service(ctx: Context, namespace: str, name: str) -> list[Service]:
    """The hosts of the ServiceEntry or Kubernetes Service ``namespace/name``, or a service whose
    host is ``name`` (fully qualified or ``name.namespace``)."""
    by_object = [s for s in ctx.mesh.services.values() if s.namespace == namespace and s.name == name]
    if by_object:
        return by_object
    for host in (name, ctx.qualify(name, namespace), f"{name}.svc.{ctx.domain}"):
        service = ctx.mesh.service(host)
        if service is not None:
            return [service]
    known = sorted(f"{s.namespace}/{s.name}" for s in ctx.mesh.services.values() if s.namespace == namespace)
    raise TargetNotFound(f"service {namespace}/{name} not found" +
                         (f"; namespace {namespace} has {', '.join(dict.fromkeys(known))}" if known else ""))


def instances(ctx: Context, service: Service) -> list[Instance]:
    """Every known instance of `service`, sorted by name."""
    out: dict[str, Instance] = {}
    for e in service.endpoints:
        name = e.workload or e.address
        out[name] = Instance(name, "WorkloadEntry" if e.workload else "endpoint", e.namespace, e.address, e.labels,
                             e.service_account, endpoint_tls_mode(e.labels, e.service_account) == ISTIO_TLS_MODE,
                             e.ports)
    if service.selector is not None:
        picked = [w for w in ctx.selected(service.namespace, service.selector) if w.kind != "WorkloadEntry"]
        pods = [w for w in picked if w.kind == "Pod"]
        for w in pods or picked:  # pod templates stand for their pods only when no pod is known (files)
            name = f"{w.namespace}/{w.name}"
            out.setdefault(name, Instance(name, w.kind, w.namespace, "", w.labels, w.service_account,
                                          w.has_sidecar and not w.opted_out))
    return [out[k] for k in sorted(out)]


def backs(ctx: Context, target: WorkloadFacts, service: Service) -> bool:
    """Whether `service` sends traffic to `target` (it selects it, or lists it as an endpoint)."""
    if target.kind == "WorkloadEntry":
        return any(e.workload == f"{target.namespace}/{target.name}" for e in service.endpoints)
    return service.selector is not None and service.namespace == target.namespace and \
        all(target.labels.get(k) == v for k, v in service.selector.items())
