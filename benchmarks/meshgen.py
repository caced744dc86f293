"""A realistic local-mesh config directory for the load benchmark, and the edits it measures.

Each service gets its own file holding a ServiceEntry (selecting workloads by label), a
DestinationRule with subsets v1 and v2, a VirtualService splitting traffic 90/10 between
them, and 2-4 WorkloadEntries per subset; `workloads()` lists the (service, subset) groups a
simulated proxy can pose as. Edits change the in-memory spec first, so the
caller can arm its clients before `write_service` makes the edit visible; files are
rewritten atomically (temp file, then rename) so pilot never reads half a file.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NAMESPACE = "bench"
PORT = 8080
SUBSETS = ("v1", "v2")
BASE_WEIGHTS = (90, 10)
# Service addresses use 10.1/16 to 10.249/16 (200 services each), so this many stay unique.
MAX_SERVICES = 249 * 200


@dataclass
class ServiceSpec:
    """One service of the generated mesh and its current state (weights and addresses)."""

    index: int
    endpoints: dict[str, list[str]]  # subset -> workload addresses
    weights: tuple[int, int] = BASE_WEIGHTS
    namespace: str = NAMESPACE

    @property
    def name(self) -> str:
        return f"svc-{self.index:03d}"

    @property
    def host(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


@dataclass(frozen=True)
class RouteEdit:
    """What a route change set: the service's host and the weight of each subset, in order."""

    host: str
    subsets: tuple[str, ...]
    weights: tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    """One (service, subset) group of WorkloadEntries: a simulated proxy can pose as one of them."""

    service: str
    subset: str
    address: str  # its first WorkloadEntry's address
    namespace: str = NAMESPACE

    @property
    def labels(self) -> tuple[tuple[str, str], ...]:
        """Exactly the WorkloadEntries' labels, so pilot matches the proxy to this workload."""
        return (("app", self.service), ("version", self.subset))


@dataclass
class MeshConfig:
    """The generated directory; `route_change` and `endpoint_change` edit it in place."""

    directory: Path
    services: list[ServiceSpec] = field(default_factory=list)
    _edits: int = 0

    def write_all(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for svc in self.services:
            self._write(svc)

    def workloads(self) -> list[Workload]:
        """Every (service, subset) workload, service by service: 2 per service."""
        return [Workload(svc.name, subset, svc.endpoints[subset][0], svc.namespace)
                for svc in self.services for subset in SUBSETS]

    def route_change(self, service: int) -> RouteEdit:
        """New weights for one VirtualService (unique per edit, never 90/10); not written yet."""
        self._edits += 1
        first = 21 + self._edits % 29  # 21..49: never equal to its complement nor to 90/10
        svc = self.services[service % len(self.services)]
        svc.weights = (first, 100 - first)
        return RouteEdit(svc.host, SUBSETS, svc.weights)

    def endpoint_change(self, service: int) -> str:
        """A new address for the first v1 workload of a service; not written yet."""
        self._edits += 1
        address = f"10.250.{self._edits // 250}.{self._edits % 250 + 1}"
        self.services[service % len(self.services)].endpoints[SUBSETS[0]][0] = address
        return address

    def write_service(self, service: int) -> float:
        """Write one service's file; returns the monotonic time at which it became visible."""
        self._write(self.services[service % len(self.services)])
        return time.monotonic()

    def _write(self, svc: ServiceSpec) -> None:
        path = self.directory / f"{svc.name}.yaml"
        tmp = self.directory / f".{svc.name}.yaml.tmp"  # dotfiles are ignored by the file source
        tmp.write_text(yaml.safe_dump_all(service_documents(svc), sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)


def generate(directory: Path, services: int = 50, seed: int = 7, namespaces: int = 1) -> MeshConfig:
    """Write `services` services with 2 subsets of 2-4 endpoints each into `directory`.

    Service i's addresses are 10.(i // 200 + 1).(i % 200).(1-12): unique for every service up
    to MAX_SERVICES and never in 10.250/16, where `endpoint_change` takes its new addresses.
    With one namespace every service is in `bench`; with N, service i is in `bench-<i % N>`,
    so each namespace's sidecars get an outbound route configuration of their own (the short
    host names of their namespace's services), as in a mesh of many teams.
    """
    if not 0 < services <= MAX_SERVICES:
        raise ValueError(f"services must be 1..{MAX_SERVICES}, not {services}")
    if not 0 < namespaces <= services:
        raise ValueError(f"namespaces must be 1..{services} (the service count), not {namespaces}")
    rng = random.Random(seed)
    specs = []
    for i in range(services):
        eps = {s: [f"10.{i // 200 + 1}.{i % 200}.{j * 8 + k + 1}" for k in range(rng.randint(2, 4))]
               for j, s in enumerate(SUBSETS)}
        namespace = NAMESPACE if namespaces == 1 else f"{NAMESPACE}-{i % namespaces}"
        specs.append(ServiceSpec(index=i, endpoints=eps, namespace=namespace))
    mesh = MeshConfig(directory, specs)
    mesh.write_all()
    return mesh


def service_documents(svc: ServiceSpec) -> list[dict[str, Any]]:
    ns = svc.namespace
    docs: list[dict[str, Any]] = [
        _obj("ServiceEntry", svc.name, ns, {
            "hosts": [svc.host],
            "location": "MESH_INTERNAL",
            "resolution": "STATIC",
            "ports": [{"number": PORT, "name": "http", "protocol": "HTTP"}],
            "workloadSelector": {"labels": {"app": svc.name}},
        }),
        _obj("DestinationRule", svc.name, ns, {
            "host": svc.host,
            "subsets": [{"name": s, "labels": {"version": s}} for s in SUBSETS],
        }),
        _obj("VirtualService", svc.name, ns, {
            "hosts": [svc.host],
            "http": [{"route": [
                {"destination": {"host": svc.host, "subset": s}, "weight": w}
                for s, w in zip(SUBSETS, svc.weights, strict=True)
            ]}],
        }),
    ]
    for subset, addresses in svc.endpoints.items():
        for k, address in enumerate(addresses):
            docs.append(_obj("WorkloadEntry", f"{svc.name}-{subset}-{k}", ns, {
                "address": address,
                "labels": {"app": svc.name, "version": subset},
                "ports": {"http": PORT},
                "serviceAccount": svc.name,
            }))
    return docs


def _obj(kind: str, name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
