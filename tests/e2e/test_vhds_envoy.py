"""Virtual hosts over VHDS with real Envoy sidecars (`pilot.translate.vhds`).

A delta sidecar from Envoy 1.40 takes its outbound route configuration without virtual hosts,
naming VHDS, and the virtual hosts as resources of their own; a route change then reaches the
proxies as the one virtual host it changed, never as a route configuration. A SotW sidecar keeps
whole route configurations. Each claim is checked in Envoy's own config dump and by requests.
"""

from __future__ import annotations

import collections
import json
from typing import Any

import pytest

from meshctl.localmesh import http_session
from tests.e2e.conftest import Canary
from tests.e2e.test_describe import debug, meshctl, versions_answering

pytestmark = pytest.mark.e2e
HOST = {"Host": "reviews:9080"}
REVIEWS = "reviews.default.svc.cluster.local:9080"


async def _route_dump(canary: Canary, sidecar: str = "default/frontend") -> dict[str, Any]:
    """The sidecar's `outbound` route configuration as Envoy holds it (VHDS virtual hosts merged in)."""
    async with http_session() as session, \
            session.get(canary.mesh.sidecars[sidecar].admin_url + "/config_dump?resource=dynamic_route_configs") as r:
        assert r.status == 200
        dump = json.loads(await r.text())
    configs = {c["route_config"]["name"]: c["route_config"] for c in dump["configs"]}
    return configs["outbound"]  # type: ignore[no-any-return]


def _pushed(canary: Canary, kind: str) -> tuple[float, float]:
    """(responses, bytes) pilot wrote of one type (`rds`, `vhds`) so far, from its Istio metrics."""
    registry = canary.mesh.pilot.registry
    count = registry.get_sample_value("pilot_xds_config_size_bytes_count", {"type": kind}) or 0.0
    size = registry.get_sample_value("pilot_xds_config_size_bytes_sum", {"type": kind}) or 0.0
    return count, size


async def _rds_status(canary: Canary) -> dict[str, Any]:
    """The RDS entry of `meshctl proxy-status default/frontend -o json`."""
    code, out = await meshctl("proxy-status", "default/frontend", "--debug", debug(canary), "-o", "json")
    assert code == 0, out
    (rds,) = [t for t in json.loads(out)["types"] if t["type"] == "RDS"]
    return rds  # type: ignore[no-any-return]


async def _versions(canary: Canary, requests: int = 400) -> collections.Counter[str]:
    """Which version answers `requests` requests to reviews (each must be a 200)."""
    return await versions_answering(canary, requests)


async def test_a_route_change_reaches_delta_sidecars_as_one_virtual_host(canary: Canary) -> None:
    config = await _route_dump(canary)
    assert config["vhds"]["config_source"]["ads"] == {}
    names = {v["name"] for v in config["virtual_hosts"]}
    assert f"outbound/{REVIEWS}" in names, names  # taken over VHDS, under its resource name
    assert {n for n in names if not n.startswith("outbound/")} == {"allow_any"}, names  # the base's own
    assert "reviews:9080" in next(v for v in config["virtual_hosts"] if v["name"] == f"outbound/{REVIEWS}")["domains"]

    rds_before, vhds_before = _pushed(canary, "rds"), _pushed(canary, "vhds")
    assert vhds_before[0] >= len(canary.mesh.sidecars)  # every sidecar took its virtual hosts
    status_before = await _rds_status(canary)
    revision = canary.mesh.pilot.store.revision
    canary.set_weights(0, 100)
    await canary.mesh.wait_applied(revision)
    assert await _versions(canary) == {"v2": 400}
    # `meshctl proxy-status PROXY` shows the change arrived: the configurations keep their version,
    # the virtual hosts' moved, and Envoy ACKed it; its merged view matches pilot's.
    status_after = await _rds_status(canary)
    assert status_after["in_sync"] and status_after["pilot_version"] == status_before["pilot_version"]
    assert status_after["vhds_pilot_version"] != status_before["vhds_pilot_version"]
    assert status_after["vhds_acked_version"] == status_after["vhds_pilot_version"]

    rds_after, vhds_after = _pushed(canary, "rds"), _pushed(canary, "vhds")
    assert rds_after == rds_before  # no route configuration was sent again
    responses, size = vhds_after[0] - vhds_before[0], vhds_after[1] - vhds_before[1]
    assert responses == len(canary.mesh.sidecars)  # one VHDS response per sidecar (each its own class)
    assert size < 2_000 * responses, size  # the reviews virtual host alone, not the configuration
    reviews = next(v for v in (await _route_dump(canary))["virtual_hosts"] if v["name"] == f"outbound/{REVIEWS}")
    assert reviews["routes"][0]["route"]["cluster"] == "outbound|9080|v2|reviews.default.svc.cluster.local"


async def test_the_catch_all_stays_in_the_route_configuration_and_follows_the_outbound_policy(canary: Canary) -> None:
    """The catch-all (ALLOW_ANY's passthrough, REGISTRY_ONLY's 502) is the base's own virtual host:
    switching the mode replaces it in one RDS update; over VHDS the new one would arrive while the
    old one is held, and Envoy allows one `*` per configuration."""
    config = await _route_dump(canary)
    assert [v["name"] for v in config["virtual_hosts"] if v["domains"] == ["*"]] == ["allow_any"]
    revision = canary.mesh.pilot.store.revision
    (canary.config_dir / "sidecar.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: default}\n"
        "spec:\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n")
    await canary.mesh.wait_applied(revision)
    config = await _route_dump(canary)
    assert [v["name"] for v in config["virtual_hosts"] if v["domains"] == ["*"]] == ["block_all"]
    async with http_session() as session, \
            session.get(canary.outbound + "/", headers={"Host": "elsewhere.example:80"}) as resp:
        assert resp.status == 502
    assert sum((await _versions(canary, 20)).values()) == 20  # mesh hosts still route (each answer 200)


@pytest.mark.parametrize("canary", ["sotw"], indirect=True)
async def test_sotw_sidecars_keep_whole_route_configurations(canary: Canary) -> None:
    config = await _route_dump(canary)
    assert "vhds" not in config
    names = {v["name"] for v in config["virtual_hosts"]}
    assert REVIEWS in names, names
    assert _pushed(canary, "vhds") == (0.0, 0.0)
    rds_before = _pushed(canary, "rds")
    revision = canary.mesh.pilot.store.revision
    canary.set_weights(0, 100)
    await canary.mesh.wait_applied(revision)
    assert await _versions(canary) == {"v2": 400}
    assert _pushed(canary, "rds")[0] > rds_before[0]
