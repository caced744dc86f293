"""Pilot and real Envoy sidecars: warming, ACKs, real HTTP, NACK handling, pilot restarts."""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

import pytest
from click.testing import CliRunner

from meshctl.cli import cli
from meshctl.localmesh import LocalMesh, http_session
from pilot.app import Pilot
from pilot.translate import generate
from pilot.xds.typeurls import CLUSTER, LISTENER, ROUTE, VIRTUAL_HOST
from tests.e2e.conftest import Canary

# Every test here runs with sidecars on both ADS variants: delta (the default, as Istio since 1.22)
# and state of the world (`ISTIO_DELTA_XDS=false`).
pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("canary", ["delta", "sotw"], indirect=True)]


async def versions_seen(url: str, n: int, host: str = "reviews:9080") -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    async with http_session() as session:
        for _ in range(n):
            async with session.get(url + "/", headers={"Host": host}) as resp:
                assert resp.status == 200, await resp.text()
                counts[(await resp.json())["version"]] += 1
    return counts


async def test_sidecars_warm_ack_every_type_and_route_weighted_http(canary: Canary) -> None:
    rows = canary.mesh.pilot.status.syncz()
    assert len(rows) == 3
    for row in rows:
        assert row["protocol"] == ("delta" if canary.mesh.delta_xds else "sotw")
        for t in ("CDS", "LDS"):
            assert row["types"][t]["state"] == "SYNCED"
    frontend = next(r for r in rows if r["workload"] == "frontend")
    assert {"CDS", "EDS", "LDS", "RDS"} <= set(frontend["types"])
    envoy = canary.mesh.sidecars["default/frontend"]
    clusters = await envoy.clusters()
    names = {c["name"] for c in clusters["cluster_statuses"]}
    assert {"outbound|9080|v1|reviews.default.svc.cluster.local",
            "outbound|9080|v2|reviews.default.svc.cluster.local"} <= names
    counts = await versions_seen(canary.outbound, 400)
    assert sum(counts.values()) == 400
    assert 0.70 <= counts["v1"] / 400 <= 0.90, counts


def corrupting(bad: dict[str, bool]) -> Any:
    """The real generator, plus (while bad["on"]) a route with a regex Envoy refuses in every virtual
    host of the outbound route configuration, and of the virtual hosts a VHDS sidecar takes apart."""

    def broken(vh: Any) -> Any:
        vh = _copy(vh)  # generated messages are shared between classes: corrupt a copy, never the original
        r = vh.routes.add()
        r.match.safe_regex.regex = "(unclosed"
        r.route.cluster = vh.routes[0].route.cluster or vh.routes[0].route.weighted_clusters.clusters[0].name
        return vh

    def gen(mesh: Any, proxy: Any) -> Any:
        out = generate(mesh, proxy)
        if bad["on"] and "outbound" in out.get(ROUTE, {}):
            rc = _copy(out[ROUTE]["outbound"])
            for i, vh in enumerate(list(rc.virtual_hosts)):
                rc.virtual_hosts[i].CopyFrom(broken(vh))
            out[ROUTE] = {**out[ROUTE], "outbound": rc}
            if VIRTUAL_HOST in out:
                out[VIRTUAL_HOST] = {name: broken(vh) for name, vh in out[VIRTUAL_HOST].items()}
        return out

    return gen


def _copy(message: Any) -> Any:
    out = type(message)()
    out.CopyFrom(message)
    return out


async def test_invalid_resource_is_nacked_shown_and_last_good_config_keeps_serving(
    canary: Canary, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Swap in a generator that breaks the route config, then change config to trigger a push.
    bad = {"on": True}
    canary.mesh.pilot.pusher.generate = corrupting(bad)
    canary.set_weights(0, 100)
    debug = canary.mesh.pilot.debug_address
    for _ in range(100):
        rows = canary.mesh.pilot.status.syncz()
        front = next(r for r in rows if r["workload"] == "frontend")
        if front["types"]["RDS"]["state"] == "NACKED":
            break
        await asyncio.sleep(0.1)
    rds = front["types"]["RDS"]
    assert rds["state"] == "NACKED" and "unclosed" in rds["nack"], rds
    assert canary.mesh.pilot.status.metrics.nacks.labels("RDS")._value.get() >= 1
    # The CLI shows it too.
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["proxy-status", "--debug", debug])
    assert result.exit_code == 0, result.output
    assert "NACKED" in result.output and "unclosed" in result.output
    as_json = await asyncio.to_thread(CliRunner().invoke, cli, ["proxy-status", "--debug", debug, "--json"])
    assert any(r["types"]["RDS"]["state"] == "NACKED" for r in json.loads(as_json.output))
    # Envoy kept the last good route (80/20), not the rejected 0/100 one.
    counts = await versions_seen(canary.outbound, 200)
    assert counts["v1"] > 100, counts
    # Fixing the generator and touching the config clears the NACK; the 0/100 route goes live.
    bad["on"] = False
    before = canary.mesh.pilot.store.revision
    (canary.config_dir / "touch.yaml").write_text("# trigger\n")
    await canary.mesh.wait_applied(before)
    assert (await versions_seen(canary.outbound, 50)) == {"v2": 50}


async def test_pilot_restart_loses_no_request_and_proxies_resync(canary: Canary) -> None:
    mesh: LocalMesh = canary.mesh
    failures: list[str] = []
    done = asyncio.Event()
    sent = 0

    async def loop() -> None:
        nonlocal sent
        async with http_session() as session:
            while not done.is_set():
                try:
                    async with session.get(canary.outbound + "/", headers={"Host": "reviews:9080"}) as resp:
                        if resp.status != 200:
                            failures.append(f"status {resp.status}")
                except Exception as exc:
                    failures.append(repr(exc))
                sent += 1
                await asyncio.sleep(0.01)

    traffic = asyncio.create_task(loop())
    await asyncio.sleep(0.5)
    await mesh.pilot.stop()
    assert not mesh.pilot.status.streams()
    await asyncio.sleep(2.0)  # sidecars run on without a control plane
    mesh.pilot = Pilot(mesh.settings)
    await mesh.pilot.start()
    rows = await mesh.wait_synced(timeout=30)
    done.set()
    await traffic
    assert len(rows) == 3
    assert sent > 100 and failures == [], failures[:5]


async def test_each_type_is_acked_with_the_snapshot_version(canary: Canary) -> None:
    pilot = canary.mesh.pilot
    for row in pilot.status.syncz():
        stream = next(s for s in pilot.status.streams() if s.identity.node_id == row["proxy"])
        snap = pilot.cache.get(stream.identity.proxy_class)
        assert snap is not None
        # Wildcard types: the proxy holds the class's whole snapshot of that type.
        assert row["types"]["CDS"]["acked_version"] == snap.version(CLUSTER)
        assert row["types"]["LDS"]["acked_version"] == snap.version(LISTENER)
        # Subscribed types: the proxy ACKed exactly the version of what it subscribed to.
        for t in ("EDS", "RDS"):
            if t in row["types"]:
                assert row["types"][t]["acked_version"] == row["types"][t]["current_version"]
                assert row["types"][t]["state"] == "SYNCED"


async def test_a_destination_rule_edit_is_applied_without_waiting_for_envoy_timeouts(canary: Canary) -> None:
    """A changed cluster warms in Envoy until its endpoints are sent again; pilot must resend them.

    Without that, Envoy waits out its 15 s initial-fetch timeout before using (and ACKing) the cluster.
    """
    before = canary.mesh.pilot.store.revision
    rule = canary.demo.route_yaml([80, 20]).replace(
        "  host: reviews\n", "  host: reviews\n  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 3s}}}\n", 1)
    (canary.config_dir / "route.yaml").write_text(rule)
    await canary.mesh.wait_applied(before, timeout=5)
    dump = await canary.mesh.sidecars["default/frontend"].config_dump("dynamic_warming_clusters")
    assert not dump.get("configs"), dump
    counts = await versions_seen(canary.outbound, 20)
    assert sum(counts.values()) == 20


async def test_removing_subsets_leaves_every_proxy_synced(canary: Canary) -> None:
    """The subset clusters go, and Envoy drops their endpoints by unsubscribing: no response is
    due, and proxy status must still show every proxy in sync (it used to stay STALE)."""
    before = canary.mesh.pilot.store.revision
    rule = (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: default}\n"
        "spec: {host: reviews}\n---\n"
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: default}\n"
        "spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews}}]}]}\n"
    )
    (canary.config_dir / "route.yaml").write_text(rule)
    rows = await canary.mesh.wait_applied(before, timeout=5)
    clusters = await canary.mesh.sidecars["default/frontend"].clusters()
    assert not any("|v1|" in c["name"] for c in clusters["cluster_statuses"])
    assert all(t["state"] == "SYNCED" for row in rows for t in row["types"].values())
