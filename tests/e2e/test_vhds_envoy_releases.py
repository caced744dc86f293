"""Which Envoy releases take virtual hosts over VHDS on the ADS stream, behind pilot (`VHDS_OVER_ADS_SINCE`).

Pilot decides from the release the Node reports. The whole local mesh runs on a real Envoy of
the release on either side of the line: 1.36.4, which NACKs a route configuration whose VHDS
config source is `ads`, and 1.37.0, the first that takes it. Each must route the canary, before
and after a route change, with the configuration pilot chose for it, and NACK nothing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshctl.democonfig import DemoMesh
from meshctl.localmesh import LocalMesh, free_port, http_session
from pilot.settings import PilotSettings
from tests.e2e.conftest import Canary, random_block
from tests.e2e.envoy_releases import envoy_release
from tests.e2e.test_describe import versions_answering

pytestmark = pytest.mark.e2e
REVIEWS = "reviews.default.svc.cluster.local:9080"


@pytest.fixture(params=[("1.36.4", False), ("1.37.0", True)], ids=["envoy-1.36", "envoy-1.37"])
async def release_canary(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Canary, str, bool]]:
    """The canary mesh (delta ADS) with every proxy on Envoy `version`; whether it should take VHDS."""
    version, takes_vhds = request.param
    binary = envoy_release(version)
    demo = DemoMesh(random_block(), {"v1": free_port(), "v2": free_port()})
    (tmp_path / "mesh.yaml").write_text(demo.mesh_yaml())
    (tmp_path / "route.yaml").write_text(demo.route_yaml([100, 0]))
    settings = PilotSettings(ads_port=free_port(), debug_port=0, config_dir=tmp_path, debounce_ms=50)
    async with LocalMesh(settings, envoy_path=binary) as mesh:
        for v in demo.versions:
            await mesh.start_app("default", f"reviews-{v}", v)
        for name in ("frontend", *(f"reviews-{v}" for v in demo.versions)):
            await mesh.start_sidecar("default", name)
        await mesh.wait_synced()
        yield Canary(mesh, tmp_path, demo), version, takes_vhds


async def test_envoy_takes_vhds_over_ads_from_1_37_and_older_ones_get_whole_route_configurations(
        release_canary: tuple[Canary, str, bool]) -> None:
    canary, version, takes_vhds = release_canary
    frontend = canary.mesh.sidecars["default/frontend"].admin_url
    async with http_session() as session:
        async with session.get(frontend + "/server_info") as r:
            assert (await r.json())["version"].split("/")[1] == version  # the release under test runs
        async with session.get(frontend + "/config_dump?resource=dynamic_route_configs") as r:
            dump = json.loads(await r.text())
    outbound = next(c["route_config"] for c in dump["configs"] if c["route_config"]["name"] == "outbound")
    names = {v["name"] for v in outbound["virtual_hosts"]}
    if takes_vhds:
        assert outbound["vhds"]["config_source"]["ads"] == {}
        assert f"outbound/{REVIEWS}" in names, names  # taken over VHDS
    else:
        assert "vhds" not in outbound
        assert REVIEWS in names, names  # inline, in the whole configuration
    assert await versions_answering(canary, 40) == {"v1": 40}

    revision = canary.mesh.pilot.store.revision
    canary.set_weights(0, 100)
    await canary.mesh.wait_applied(revision)
    assert await versions_answering(canary, 40) == {"v2": 40}
    registry = canary.mesh.pilot.registry
    vhds_pushes = registry.get_sample_value("pilot_xds_config_size_bytes_count", {"type": "vhds"}) or 0.0
    assert (vhds_pushes > 0) == takes_vhds
    nacked = [s for m in registry.collect() if m.name == "pilot_xds_nacks" for s in m.samples
              if s.name == "pilot_xds_nacks_total" and s.value]
    assert nacked == []
