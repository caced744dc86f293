"""`Context`: one analysis run's input plus the indexes every check shares, built once.

The MeshSnapshot (`pilot.model.build.build_mesh`) supplies what pilot already resolves: service
hosts and their endpoints (WorkloadEntries selected by ServiceEntries, inline endpoints).
Kubernetes Services are added to it as pilot's registry converts them (`kube_service`), and their
pods are matched here by selector, since analysis has no EndpointSlices. Checks only read.
Cost: one `build_mesh` (linear in the config) and a few dictionaries.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import TypeVar

from pilot.analysis import messages as msg
from pilot.analysis.inputs import AnalysisInput, WorkloadFacts
from pilot.api import ApiObject, Gateway, ServiceEntry, WorkloadEntry
from pilot.kube.registry import KubeService, hostname, kube_service
from pilot.model.build import build_mesh
from pilot.model.hosts import host_matches
from pilot.model.mesh import MeshSnapshot, selects

T = TypeVar("T", bound=ApiObject)
MESH = "mesh"


class Context:
    """Shared, read-only views of an `AnalysisInput` (see the module docstring)."""

    def __init__(self, inp: AnalysisInput) -> None:
        self.inp = inp
        self.domain = inp.cluster_domain
        # The loader kept only Services the registry converts (`pilot.analysis.load`).
        self.kube_services: list[KubeService] = [kube_service(svc, inp.cluster_domain) for svc in inp.services]

    def of(self, cls: type[T]) -> list[T]:
        """The input's objects of one kind, sorted by namespace/name."""
        return [o for o in self.inp.objects if isinstance(o, cls)]

    def message(self, mtype: msg.MessageType, obj: ApiObject, path: str, text: str, fix: str) -> msg.Message:
        return msg.Message(mtype, obj.kind, obj.metadata.namespace, obj.metadata.name, path, text, fix,
                           self.inp.origin(obj))

    @cached_property
    def mesh(self) -> MeshSnapshot:
        return build_mesh([*self.inp.objects, *self.kube_services], cluster_domain=self.domain)

    def qualify(self, host: str, namespace: str) -> str:
        """Istio's rule: a short name (no dot) is a Kubernetes service of the object's namespace."""
        if host == "*" or "." in host:
            return host
        return hostname(host, namespace, self.domain)

    @cached_property
    def service_hosts(self) -> dict[str, list[ApiObject]]:
        """Host -> the ServiceEntries and Kubernetes Services that declare it."""
        found: dict[str, list[ApiObject]] = {}
        for se in [*self.of(ServiceEntry), *self.kube_services]:
            for host in se.spec.hosts:
                found.setdefault(host, []).append(se)
        return found

    def service_known(self, host: str) -> bool:
        """Whether a service declares `host` (a wildcard host of a ServiceEntry covers names under it;
        a wildcard `host` is known when some service is under it)."""
        if host in self.service_hosts:
            return True
        candidates = self.service_hosts if host.startswith("*") else self.wildcard_hosts
        return any(host_matches(h, host) or host_matches(host, h) for h in candidates)

    @cached_property
    def wildcard_hosts(self) -> list[str]:
        """The declared hosts that are wildcards: the only ones an exact name can match beyond itself."""
        return [h for h in self.service_hosts if h.startswith("*")]

    @cached_property
    def workloads(self) -> tuple[WorkloadFacts, ...]:
        """Pods, pod templates and WorkloadEntries."""
        entries = tuple(WorkloadFacts("WorkloadEntry", e.metadata.namespace, e.metadata.name,
                                      {**e.metadata.labels, **e.spec.labels}, e.spec.service_account or "default")
                        for e in self.of(WorkloadEntry))
        return (*self.inp.workloads, *entries)

    @property
    def workloads_known(self) -> bool:
        return self.inp.workloads_known

    @cached_property
    def _by_label(self) -> dict[tuple[str, str], list[WorkloadFacts]]:
        index: dict[tuple[str, str], list[WorkloadFacts]] = {}
        for w in self.workloads:
            for item in w.labels.items():
                index.setdefault(item, []).append(w)
        return index

    def selected(self, namespace: str | None, labels: Mapping[str, str]) -> list[WorkloadFacts]:
        """Workloads in `namespace` (None: any) that carry every label of `labels`. Looks only at the
        workloads carrying the rarest of the labels (an index), so policies x workloads stays linear."""
        pools = [self._by_label.get(item, []) for item in labels.items()]
        candidates = min(pools, key=len) if pools else self.workloads
        return [w for w in candidates if (namespace is None or w.namespace == namespace) and selects(labels, w.labels)]

    def instance_labels(self, host: str) -> list[Mapping[str, str]]:
        """Labels of every known instance of the service `host`: its endpoints in the mesh model and
        the pods its Kubernetes selector picks."""
        out: list[Mapping[str, str]] = []
        service = self.mesh.service(host)
        if service is not None:
            out += [e.labels for e in service.endpoints]
        for ks in self.kube_services:
            if host in ks.spec.hosts and ks.spec.workload_selector is not None:
                out += [w.labels for w in self.selected(ks.metadata.namespace, ks.spec.workload_selector.labels)
                        if w.kind != "WorkloadEntry"]
        return out

    def service_namespaces(self, host: str) -> list[str]:
        return sorted({s.metadata.namespace for s in self.service_hosts.get(host, ())})

    @cached_property
    def gateways(self) -> dict[tuple[str, str], Gateway]:
        return {(g.metadata.namespace, g.metadata.name): g for g in self.of(Gateway)}

    def gateway_ref(self, ref: str, namespace: str) -> tuple[str, str] | None:
        """``name`` or ``ns/name`` as a VirtualService names a Gateway; None for ``mesh``."""
        if ref == MESH:
            return None
        ns, _, name = ref.rpartition("/")
        return (ns or namespace, name)

    @cached_property
    def workload_namespaces(self) -> frozenset[str]:
        return frozenset({w.namespace for w in self.workloads} | set(self.inp.namespaces))

    @cached_property
    def identities(self) -> frozenset[tuple[str, str]]:
        """(namespace, service account) of every workload."""
        return frozenset((w.namespace, w.service_account) for w in self.workloads)
