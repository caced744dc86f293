"""The demo's mesh as Istio YAML: a frontend calling reviews v1..vN, with a weighted route.

Shared by `meshctl demo` and the end-to-end tests so both exercise the same config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: reviews}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: frontend, namespace: default}}
spec: {{address: {frontend}, labels: {{app: frontend}}, serviceAccount: frontend}}
"""

WORKLOAD = """\
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-{version}, namespace: default}}
spec:
  address: {address}
  labels: {{app: reviews, version: {version}}}
  serviceAccount: reviews
  ports: {{http: {port}}}
"""

# Mesh-wide mutual TLS (the root namespace's policy without a selector), as the demo runs it:
# every sidecar with a workload certificate then refuses plaintext on its inbound ports.
STRICT_MTLS = """\
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""

ROUTE_HEAD = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
"""

VIRTUAL_SERVICE = """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
"""


@dataclass(frozen=True)
class DemoMesh:
    """Addresses and app ports of the demo workloads; `block` is a 127.a.b prefix."""

    block: str
    app_ports: Mapping[str, int]  # version -> port of that reviews app on 127.0.0.1

    @property
    def versions(self) -> list[str]:
        return sorted(self.app_ports)

    @property
    def frontend(self) -> str:
        return f"{self.block}.10"

    def address(self, version: str) -> str:
        return f"{self.block}.{11 + self.versions.index(version)}"

    def mesh_yaml(self, strict_mtls: bool = False) -> str:
        """The ServiceEntry and WorkloadEntries; with `strict_mtls`, a mesh-wide STRICT PeerAuthentication."""
        out = SERVICE.format(frontend=self.frontend)
        for v in self.versions:
            out += WORKLOAD.format(version=v, address=self.address(v), port=self.app_ports[v])
        return out + (STRICT_MTLS if strict_mtls else "")

    def route_yaml(self, weights: Sequence[int]) -> str:
        """DestinationRule subsets per version and a VirtualService splitting by `weights`."""
        if len(weights) != len(self.versions):
            raise ValueError(f"need {len(self.versions)} weights, got {len(weights)}")
        out = ROUTE_HEAD + "".join(f"  - {{name: {v}, labels: {{version: {v}}}}}\n" for v in self.versions)
        out += VIRTUAL_SERVICE
        for v, w in zip(self.versions, weights, strict=True):
            out += f"    - destination: {{host: reviews, subset: {v}}}\n      weight: {w}\n"
        return out
