"""Local-mesh fixtures: a canary mesh on random loopback addresses with real Envoy sidecars."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from meshctl.democonfig import DemoMesh
from meshctl.localmesh import LocalMesh, free_port
from pilot.settings import PilotSettings


def service_entry(name: str, port: int = 9080, app: str | None = None, namespace: str = "default") -> str:
    """A MESH_INTERNAL HTTP ServiceEntry for `<name>.<namespace>.svc.cluster.local` selecting `app: <app or name>`."""
    return _doc("ServiceEntry", name, namespace, {
        "hosts": [f"{name}.{namespace}.svc.cluster.local"],
        "location": "MESH_INTERNAL",
        "resolution": "STATIC",
        "ports": [{"number": port, "name": "http", "protocol": "HTTP"}],
        "workloadSelector": {"labels": {"app": app or name}},
    })


def workload_entry(
    name: str, address: str, labels: dict[str, str] | None = None, port: int | None = None, namespace: str = "default"
) -> str:
    """A local-mesh WorkloadEntry (labels default to `app: <name>`; `port` is its `http` port)."""
    spec: dict[str, object] = {"address": address, "labels": labels or {"app": name}}
    if port is not None:
        spec["ports"] = {"http": port}
    return _doc("WorkloadEntry", name, namespace, spec)


def _doc(kind: str, name: str, namespace: str, spec: dict[str, object]) -> str:
    body = {"apiVersion": "networking.istio.io/v1", "kind": kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}
    return "---\n" + yaml.safe_dump(body, sort_keys=False)


def random_block() -> str:
    """A random 127.a.b.0/24 prefix, so parallel runs never share addresses."""
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}"


@dataclass
class Canary:
    mesh: LocalMesh
    config_dir: Path
    demo: DemoMesh

    @property
    def outbound(self) -> str:
        """The frontend sidecar's outbound listener."""
        return f"http://{self.demo.frontend}:15001"

    def set_weights(self, *weights: int) -> None:
        (self.config_dir / "route.yaml").write_text(self.demo.route_yaml(weights))


@pytest.fixture
async def canary(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Canary]:
    """frontend -> reviews v1 (80) / v2 (20), every workload with a real Envoy sidecar. Its sidecars
    speak delta ADS, or state of the world when parametrized indirectly with "sotw"."""
    demo = DemoMesh(random_block(), {"v1": free_port(), "v2": free_port()})
    (tmp_path / "mesh.yaml").write_text(demo.mesh_yaml())
    (tmp_path / "route.yaml").write_text(demo.route_yaml([80, 20]))
    settings = PilotSettings(ads_port=free_port(), debug_port=0, config_dir=tmp_path, debounce_ms=50)
    async with LocalMesh(settings, delta_xds=getattr(request, "param", "delta") == "delta") as mesh:
        for v in demo.versions:
            await mesh.start_app("default", f"reviews-{v}", v)
        for name in ("frontend", *(f"reviews-{v}" for v in demo.versions)):
            await mesh.start_sidecar("default", name)
        await mesh.wait_synced()
        yield Canary(mesh, tmp_path, demo)
