"""Sidecar egress scoping with real Envoy: an out-of-scope service has no cluster and no route.

frontend's Sidecar lets it reach reviews only; ratings is a working service (proved by widening
the scope at the end), yet from frontend it gets 404 (no route) and is absent from /clusters.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from meshctl.localmesh import LocalMesh, http_session
from pilot.settings import PilotSettings
from tests.e2e.conftest import free_port, random_block, service_entry, workload_entry

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SCOPE = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: frontend, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: frontend}}}}
  egress:
  - hosts: [{hosts}]
  outboundTrafficPolicy: {{mode: {mode}}}
"""


@dataclass
class Scoped:
    mesh: LocalMesh
    config_dir: Path
    frontend: str

    async def set_scope(self, hosts: str, mode: str = "ALLOW_ANY") -> None:
        revision = self.mesh.pilot.store.revision
        (self.config_dir / "sidecar.yaml").write_text(SCOPE.format(hosts=hosts, mode=mode))
        await self.mesh.wait_applied(revision)

    async def status(self, host: str) -> int:
        async with (
            http_session() as session,
            session.get(f"http://{self.frontend}:15001/", headers={"Host": host}) as r,
        ):
            return r.status

    async def cluster_names(self) -> set[str]:
        clusters = await self.mesh.sidecars["default/frontend"].clusters()
        return {c["name"] for c in clusters["cluster_statuses"]}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def scoped(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Scoped]:
    config_dir = tmp_path_factory.mktemp("sidecar-scope")
    block = random_block()
    text = "".join(
        service_entry(name) + workload_entry(name, f"{block}.{11 + i}", port=free_port())
        for i, name in enumerate(("reviews", "ratings"))
    )
    (config_dir / "mesh.yaml").write_text(text + workload_entry("frontend", f"{block}.10"))
    (config_dir / "sidecar.yaml").write_text(
        SCOPE.format(hosts="./reviews.default.svc.cluster.local", mode="ALLOW_ANY")
    )
    settings = PilotSettings(ads_port=free_port(), debug_port=0, config_dir=config_dir, debounce_ms=50)
    async with LocalMesh(settings) as mesh:
        for name in ("reviews", "ratings"):
            await mesh.start_app("default", name)
        await asyncio.gather(*(mesh.start_sidecar("default", n) for n in ("frontend", "reviews", "ratings")))
        await mesh.wait_synced()
        yield Scoped(mesh, config_dir, f"{block}.10")


async def test_egress_scope_removes_a_service_and_keeps_the_allowed_one(scoped: Scoped) -> None:
    names = await scoped.cluster_names()
    assert "outbound|9080||reviews.default.svc.cluster.local" in names
    assert not any("ratings" in n for n in names), names
    assert await scoped.status("reviews:9080") == 200
    assert await scoped.status("ratings:9080") == 404  # no virtual host: Envoy's "no route"


async def test_registry_only_answers_502_for_hosts_outside_the_scope(scoped: Scoped) -> None:
    await scoped.set_scope("./reviews.default.svc.cluster.local", mode="REGISTRY_ONLY")
    assert await scoped.status("ratings:9080") == 502
    assert await scoped.status("reviews:9080") == 200


async def test_widening_the_scope_makes_the_other_service_reachable(scoped: Scoped) -> None:
    await scoped.set_scope('"./*"')
    assert "outbound|9080||ratings.default.svc.cluster.local" in await scoped.cluster_names()
    assert await scoped.status("ratings:9080") == 200
