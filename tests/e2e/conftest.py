"""Local-mesh fixtures: a canary mesh on random loopback addresses with real Envoy sidecars."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshctl.localmesh import LocalMesh
from pilot.settings import PilotSettings

CANARY = """\
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
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-v1, namespace: default}}
spec:
  address: {v1}
  labels: {{app: reviews, version: v1}}
  serviceAccount: reviews
  ports: {{http: {p1}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-v2, namespace: default}}
spec:
  address: {v2}
  labels: {{app: reviews, version: v2}}
  serviceAccount: reviews
  ports: {{http: {p2}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
"""

ROUTE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {{host: reviews, subset: v1}}
      weight: {w1}
    - destination: {{host: reviews, subset: v2}}
      weight: {w2}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_block() -> str:
    """A random 127.a.b.0/24 prefix, so parallel runs never share addresses."""
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}"


@dataclass
class Canary:
    mesh: LocalMesh
    config_dir: Path
    frontend: str
    outbound: str  # the frontend sidecar's outbound URL

    def set_weights(self, w1: int, w2: int) -> None:
        (self.config_dir / "route.yaml").write_text(ROUTE.format(w1=w1, w2=w2))


@pytest.fixture
async def canary(tmp_path: Path) -> AsyncIterator[Canary]:
    block = random_block()
    addrs = {"frontend": f"{block}.10", "v1": f"{block}.11", "v2": f"{block}.12"}
    (tmp_path / "mesh.yaml").write_text(CANARY.format(**addrs, p1=free_port(), p2=free_port()))
    (tmp_path / "route.yaml").write_text(ROUTE.format(w1=80, w2=20))
    settings = PilotSettings(ads_port=free_port(), debug_port=0, config_dir=tmp_path, debounce_ms=50)
    async with LocalMesh(settings) as mesh:
        await mesh.start_app("default", "reviews-v1", "v1")
        await mesh.start_app("default", "reviews-v2", "v2")
        for name in ("frontend", "reviews-v1", "reviews-v2"):
            await mesh.start_sidecar("default", name)
        await mesh.wait_synced()
        yield Canary(mesh, tmp_path, addrs["frontend"], f"http://{addrs['frontend']}:15001")
