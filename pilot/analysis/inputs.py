"""What the analyzers read: mesh objects plus the Kubernetes facts they are checked against.

`AnalysisInput` is plain, frozen data, built by `pilot.analysis.load` from files, a cluster or
pilot's ``/debug/configz``; the analyzers never do I/O. Facts that may be unknown are marked so:
a check that needs workloads (does a selector match anything?) runs only when the input says
which workloads exist, and the credential check only when a secret store was read; otherwise
every policy of a file analyzed alone would be reported as selecting nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pilot.analysis.messages import Message
from pilot.api import ApiObject

Key = tuple[str, str, str]  # (kind, namespace, name)
# (namespace, secret name, "cert" | "ca"): as `pilot.credentials.scan` lists the local secret store.
Secrets = frozenset[tuple[str, str, str]]


@dataclass(frozen=True)
class WorkloadFacts:
    """A running (or templated) workload: a Pod, a Deployment's pod template, a WorkloadEntry."""

    kind: str
    namespace: str
    name: str
    labels: Mapping[str, str]
    service_account: str = "default"
    has_sidecar: bool = True  # an istio-proxy container (or init container) is in the pod
    opted_out: bool = False  # sidecar.istio.io/inject "false", or hostNetwork: never injected


@dataclass(frozen=True)
class AnalysisInput:
    """Everything one run analyzes (see the module docstring for the unknowns)."""

    objects: tuple[ApiObject, ...] = ()
    origins: Mapping[Key, str] = field(default_factory=dict)  # where each object came from
    services: tuple[Mapping[str, Any], ...] = ()  # Kubernetes Service objects, as decoded JSON
    workloads: tuple[WorkloadFacts, ...] = ()  # Pods and pod templates (WorkloadEntries are objects)
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # Namespace -> labels
    secrets: Secrets | None = None  # None: no secret store was read
    problems: tuple[Message, ...] = ()  # documents that did not parse, duplicates
    workloads_known: bool = False  # True: `workloads` (with WorkloadEntries) is every workload there is
    kubernetes: bool = False  # a cluster's config (pods' traffic is captured), not the local mesh's
    cluster_domain: str = "cluster.local"
    root_namespace: str = "istio-system"

    def origin(self, obj: ApiObject) -> str:
        return self.origins.get(obj.key, "")

    def merged(self, other: AnalysisInput) -> AnalysisInput:
        """Both inputs; an object in both keeps this one's version (files override the cluster)."""
        mine = {o.key for o in self.objects}
        secrets = None if self.secrets is None and other.secrets is None else \
            (self.secrets or frozenset()) | (other.secrets or frozenset())
        return AnalysisInput(
            objects=self.objects + tuple(o for o in other.objects if o.key not in mine),
            origins={**other.origins, **self.origins},
            services=self.services + tuple(s for s in other.services if _service_key(s) not in
                                           {_service_key(m) for m in self.services}),
            workloads=self.workloads + other.workloads,
            namespaces={**other.namespaces, **self.namespaces},
            secrets=secrets,
            problems=self.problems + other.problems,
            workloads_known=self.workloads_known or other.workloads_known,
            kubernetes=self.kubernetes or other.kubernetes,
            cluster_domain=self.cluster_domain,
            root_namespace=self.root_namespace,
        )


def _service_key(service: Mapping[str, Any]) -> tuple[str, str]:
    meta = service.get("metadata") or {}
    return (str(meta.get("namespace") or "default"), str(meta.get("name") or ""))
