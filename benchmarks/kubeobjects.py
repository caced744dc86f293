"""The Kubernetes objects of the `kube_load` benchmark, as plain API dicts (pure functions).

A cluster of `services` Services in one namespace, each selecting its Pods by `app` and with a
DestinationRule (subsets v1/v2 by the `version` label) and a VirtualService splitting 90/10, like
`meshgen`'s mesh. Pod `j` belongs to service `j % services`, is `v1` or `v2` in turn and runs at
a unique address of 10.244.0.0/16, on one Node; `spare` Pods (one per endpoint change) are
reported not Ready, so flipping one to Ready makes a new address appear in EDS. Indexes are
deterministic so a simulated proxy can pose as any Pod (its node id names the Pod and its IP).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

NAMESPACE = "bench"
NODE = "bench-node"
NODE_ADDRESS = "10.244.255.1"
SERVICE_PORT = 80
TARGET_PORT = 8080
SUBSETS = ("v1", "v2")
BASE_WEIGHTS = (90, 10)
MAX_PODS = 250 * 250  # addresses 10.244.0.2 - 10.244.249.251
# EndpointSlices kube-controller-manager made carry this; the benchmark makes none itself.
MANAGED_BY = "endpointslice-controller.k8s.io"


def service_name(index: int) -> str:
    return f"svc-{index:04d}"


def host(index: int) -> str:
    return f"{service_name(index)}.{NAMESPACE}.svc.cluster.local"


def pod_ip(index: int) -> str:
    """Pod `index`'s address (bulk Pods first, then the spares)."""
    if not 0 <= index < MAX_PODS:
        raise ValueError(f"pod index {index}: the benchmark's pod range holds {MAX_PODS} addresses")
    return f"10.244.{index // 250}.{index % 250 + 2}"


@dataclass(frozen=True)
class PodRef:
    """One Pod of the benchmark cluster: what the API objects and a proxy posing as it need."""

    name: str
    service: int
    version: str
    ip: str

    @property
    def labels(self) -> dict[str, str]:
        return {"app": service_name(self.service), "version": self.version}

    @property
    def node_id(self) -> str:
        """Istio's sidecar id for this Pod: pilot matches it to the Pod by name and IP."""
        return f"sidecar~{self.ip}~{self.name}.{NAMESPACE}~{NAMESPACE}.svc.cluster.local"


def bulk_pod(index: int, services: int) -> PodRef:
    service, replica = index % services, index // services
    return PodRef(f"{service_name(service)}-{replica}", service, SUBSETS[replica % 2], pod_ip(index))


def spare_pod(change: int, services: int, pods: int) -> PodRef:
    """The not-Ready Pod whose readiness flip is endpoint change `change` (services spread)."""
    service = (change * 7 + 3) % services
    return PodRef(f"{service_name(service)}-spare-{change}", service, SUBSETS[0], pod_ip(pods + change))


def route_service(change: int, services: int) -> int:
    """The service whose VirtualService route change `change` edits (spread over services)."""
    return (change * 7) % services


def route_weights(change: int) -> tuple[int, int]:
    """Weights unique to one edit (the initial split is 90/10), so no older response matches."""
    minor = 11 + change % 80
    return (100 - minor, minor)


def namespace() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}


def service(index: int) -> dict[str, Any]:
    name = service_name(index)
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"selector": {"app": name}, "ports": [
            {"name": "http", "port": SERVICE_PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}]},
    }


def pod(ref: PodRef) -> dict[str, Any]:
    """Already bound to the benchmark's Node (no scheduler runs); no token volume (nothing reads it)."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": ref.name, "namespace": NAMESPACE, "labels": ref.labels},
        "spec": {
            "nodeName": NODE, "automountServiceAccountToken": False,
            "containers": [{"name": "app", "image": "meshctl.invalid/bench-app:1",
                            "ports": [{"containerPort": TARGET_PORT, "name": "http"}]}],
        },
    }


def _now(micro: bool = False) -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def pod_status(ref: PodRef, ready: bool) -> dict[str, Any]:
    """The status a kubelet reports for a running Pod (a strategic-merge patch of `status`)."""
    now, flag = _now(), "True" if ready else "False"
    conditions = [{"type": t, "status": s, "lastTransitionTime": now} for t, s in (
        ("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", flag), ("Ready", flag))]
    return {"status": {"phase": "Running", "podIP": ref.ip, "podIPs": [{"ip": ref.ip}], "hostIP": NODE_ADDRESS,
                       "hostIPs": [{"ip": NODE_ADDRESS}], "startTime": now, "conditions": conditions}}


def destination_rule(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": service_name(index), "namespace": NAMESPACE},
        "spec": {"host": host(index), "subsets": [{"name": s, "labels": {"version": s}} for s in SUBSETS]},
    }


def http_routes(index: int, weights: tuple[int, int]) -> list[dict[str, Any]]:
    """The VirtualService's `spec.http`: one route splitting `weights` over the subsets."""
    return [{"route": [{"destination": {"host": host(index), "subset": s, "port": {"number": SERVICE_PORT}},
                        "weight": w} for s, w in zip(SUBSETS, weights, strict=True)]}]


def virtual_service(index: int, weights: tuple[int, int] = BASE_WEIGHTS) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": service_name(index), "namespace": NAMESPACE},
        "spec": {"hosts": [host(index)], "http": http_routes(index, weights)},
    }


def node() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": NODE, "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux"}}}


def node_status() -> dict[str, Any]:
    """Ready, as a kubelet reports it; the Lease (renewed by the driver) keeps it so."""
    return {"status": {
        "addresses": [{"type": "InternalIP", "address": NODE_ADDRESS}, {"type": "Hostname", "address": NODE}],
        "capacity": {"cpu": "64", "memory": "256Gi", "pods": str(MAX_PODS)},
        "allocatable": {"cpu": "64", "memory": "256Gi", "pods": str(MAX_PODS)},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kube_load",
                        "lastHeartbeatTime": _now(), "lastTransitionTime": _now()}],
    }}


def node_lease() -> dict[str, Any]:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": NODE},
            "spec": {"holderIdentity": NODE, "leaseDurationSeconds": 40, "renewTime": _now(micro=True)}}


def lease_renewal() -> dict[str, Any]:
    return {"spec": {"renewTime": _now(micro=True)}}
