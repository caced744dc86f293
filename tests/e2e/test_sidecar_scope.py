"""Sidecar egress scoping and the outbound traffic policy with real Envoy.

frontend's Sidecar lets it reach reviews only; ratings is a working service (proved by widening
the scope at the end), yet frontend has no cluster for it. Under ALLOW_ANY a host outside the
registry goes where DNS says (PassthroughCluster): `localhost:<port>` reaches a plain server, and
`ratings` (not in DNS on the local mesh) fails with 503; under REGISTRY_ONLY both get 502.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from meshctl.localmesh import LocalMesh, free_port, http_session
from pilot.settings import PilotSettings
from tests.e2e.conftest import random_block, service_entry, workload_entry

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
    outside_port: int  # a plain HTTP server on 127.0.0.1, in no ServiceEntry

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
    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="outside the mesh")

    outside = web.Application()
    outside.router.add_get("/", hello)
    runner = web.AppRunner(outside)
    await runner.setup()
    outside_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", outside_port).start()
    try:
        async with LocalMesh(settings) as mesh:
            for name in ("reviews", "ratings"):
                await mesh.start_app("default", name)
            await asyncio.gather(*(mesh.start_sidecar("default", n) for n in ("frontend", "reviews", "ratings")))
            await mesh.wait_synced()
            yield Scoped(mesh, config_dir, f"{block}.10", outside_port)
    finally:
        await runner.cleanup()


async def test_egress_scope_removes_a_service_and_keeps_the_allowed_one(scoped: Scoped) -> None:
    names = await scoped.cluster_names()
    assert "outbound|9080||reviews.default.svc.cluster.local" in names
    assert not any("ratings" in n for n in names), names
    assert await scoped.status("reviews:9080") == 200
    assert await scoped.status("ratings:9080") == 503  # passed through, but no DNS name "ratings"


async def test_allow_any_passes_a_host_outside_the_registry_to_where_dns_points(scoped: Scoped) -> None:
    assert await scoped.status(f"localhost:{scoped.outside_port}") == 200
    assert "PassthroughCluster" in await scoped.cluster_names()


async def test_registry_only_answers_502_for_hosts_outside_the_scope(scoped: Scoped) -> None:
    await scoped.set_scope("./reviews.default.svc.cluster.local", mode="REGISTRY_ONLY")
    assert await scoped.status("ratings:9080") == 502
    assert await scoped.status(f"localhost:{scoped.outside_port}") == 502
    assert await scoped.status("reviews:9080") == 200
    assert "PassthroughCluster" not in await scoped.cluster_names()


async def test_widening_the_scope_makes_the_other_service_reachable(scoped: Scoped) -> None:
    await scoped.set_scope('"./*"')
    assert "outbound|9080||ratings.default.svc.cluster.local" in await scoped.cluster_names()
    assert await scoped.status("ratings:9080") == 200
