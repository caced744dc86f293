"""DestinationRule warmup (Envoy slow start) with real Envoy: a new endpoint starts with a small share.

Two services select the same echo workloads; only `slow` has an 8 s warmup window. The first
workload is older than the window when a second one joins; `fast` then splits requests evenly at
once (round robin), while `slow` weighs the newcomer by its age over the window (about 20%).
Slow start treats every endpoint younger than the window alike, hence the wait of one window.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from meshctl.localmesh import LocalMesh, free_port, http_session
from pilot.settings import PilotSettings
from tests.e2e.conftest import random_block, service_entry, workload_entry

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]
WINDOW = 8.0

WARMUP_RULE = """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: slow, namespace: default}
spec:
  host: slow
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 8s}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: fast, namespace: default}
spec:
  host: fast
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
"""


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[LocalMesh, str]]:
    config_dir = tmp_path_factory.mktemp("warmup")
    block = random_block()
    services = service_entry("slow", app="echo") + service_entry("fast", app="echo")
    text = services + workload_entry("client", f"{block}.10") + WARMUP_RULE
    (config_dir / "mesh.yaml").write_text(text + workload_entry("echo-1", f"{block}.11", {"app": "echo"}, free_port()))
    settings = PilotSettings(ads_port=free_port(), debug_port=0, config_dir=config_dir, debounce_ms=50)
    async with LocalMesh(settings) as local:
        await local.start_app("default", "echo-1")
        await asyncio.gather(local.start_sidecar("default", "client"), local.start_sidecar("default", "echo-1"))
        await local.wait_synced()
        await asyncio.sleep(WINDOW + 0.5)  # echo-1 leaves its slow start
        # The second workload joins after every cluster exists: it is a new endpoint.
        revision = local.pilot.store.revision
        (config_dir / "echo-2.yaml").write_text(workload_entry("echo-2", f"{block}.12", {"app": "echo"}, free_port()))
        await local.wait_applied(revision)
        await local.start_app("default", "echo-2")
        await local.start_sidecar("default", "echo-2")
        await local.wait_synced()
        yield local, f"{block}.10"


async def _shares(client: str, host: str, n: int = 200) -> Counter[str]:
    seen: Counter[str] = Counter()
    async with http_session() as session:
        for _ in range(n):
            async with session.get(f"http://{client}:15001/", headers={"Host": f"{host}:9080"}) as resp:
                assert resp.status == 200
                seen[(await resp.json())["name"]] += 1
    return seen


async def test_a_new_endpoint_gets_a_small_share_during_warmup_and_an_even_one_without(
    mesh: tuple[LocalMesh, str],
) -> None:
    _, client = mesh
    fast, slow = await _shares(client, "fast"), await _shares(client, "slow")
    assert 90 <= fast["echo-2"] <= 110, fast  # round robin: half at once
    # Slow start: weight ~ age / window, about 2 s / 8 s here, so ~20% of requests (50% without).
    assert 0 < slow["echo-2"] <= 70, slow
