"""`meshctl wait --for=applied` against a local mesh with real Envoy sidecars: it returns 0 only once
every affected sidecar holds the change (checked in each Envoy's own config dump), exits 1 naming
the proxy and Envoy's message when a sidecar NACKs it, and 4 listing the proxy still pending when a
sidecar cannot ACK (its Envoy stopped with SIGSTOP) before the timeout. `--for=delete` returns 0
only once every affected sidecar's Envoy dropped a removed VirtualService."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any

import pytest
from click.testing import CliRunner, Result

from meshctl.cli import cli
from tests.e2e.conftest import Canary
from tests.e2e.test_xds_envoy import corrupting

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


async def meshctl_wait(canary: Canary, *args: str) -> Result:
    """The CLI in a thread: pilot serves on this test's event loop meanwhile."""
    argv = ["wait", "--for=applied", "-f", str(canary.config_dir / "route.yaml"),
            "--debug", canary.mesh.pilot.debug_address, *args]
    return await asyncio.to_thread(CliRunner().invoke, cli, argv)


def reviews_weights(dump: Any) -> dict[str, int]:
    """subset -> weight of every weighted route to reviews in an Envoy config dump."""
    found: dict[str, int] = {}
    for config in dump["configs"]:
        for dynamic in config.get("dynamic_route_configs", ()):
            for vhost in dynamic["route_config"].get("virtual_hosts", ()):
                for route in vhost.get("routes", ()):
                    for cluster in route.get("route", {}).get("weighted_clusters", {}).get("clusters", ()):
                        if "reviews" in cluster["name"]:
                            found[cluster["name"].split("|")[2]] = int(cluster.get("weight", 0))
    return found


def affected(result: Result) -> list[dict[str, Any]]:
    return [p for obj in json.loads(result.output)["objects"] for p in obj["pilot"].get("proxies", ())]


async def test_wait_returns_once_every_sidecar_holds_the_change(canary: Canary) -> None:
    canary.set_weights(10, 90)
    result = await meshctl_wait(canary, "-o", "json", "--timeout", "60s")
    assert result.exit_code == 0, result.output
    # The moment wait returns, every affected sidecar's Envoy already routes 10/90.
    rows = affected(result)
    assert {r["workload"] for r in rows} >= {"frontend"} and {r["state"] for r in rows} == {"ACKED"}, rows
    for row in rows:
        envoy = canary.mesh.sidecars[f'{row["namespace"]}/{row["workload"]}']
        assert reviews_weights(await envoy.config_dump()) == {"v1": 10, "v2": 90}, row["proxy"]
    # Text output for people names the objects and the proxy count.
    text = await meshctl_wait(canary)
    assert text.exit_code == 0 and "applied VirtualService default/reviews" in text.output, text.output


async def test_wait_fails_naming_the_proxy_that_nacked_and_envoys_message(canary: Canary) -> None:
    canary.mesh.pilot.pusher.generate = corrupting({"on": True})  # routes with a regex Envoy refuses
    canary.set_weights(30, 70)
    result = await meshctl_wait(canary, "--timeout", "60s")
    assert result.exit_code == 1, result.output
    assert "FAILED VirtualService default/reviews" in result.output
    assert "frontend" in result.output and "RDS rejected" in result.output and "unclosed" in result.output
    # The sidecar kept its last good routes: the change did not reach it, as wait said.
    assert reviews_weights(await canary.mesh.sidecars["default/frontend"].config_dump()) == {"v1": 80, "v2": 20}


async def test_wait_times_out_listing_the_proxy_that_cannot_ack(canary: Canary) -> None:
    envoy = canary.mesh.sidecars["default/frontend"]
    assert envoy.pid is not None
    os.kill(envoy.pid, signal.SIGSTOP)
    try:
        canary.set_weights(60, 40)
        result = await meshctl_wait(canary, "--timeout", "3s", "-o", "json")
    finally:
        os.kill(envoy.pid, signal.SIGCONT)
    assert result.exit_code == 4, result.output
    out = json.loads(result.output)
    assert out["applied"] is False and out["exit_code"] == 4
    pending = [p for p in affected(result) if p["state"] == "PENDING"]
    assert {p["workload"] for p in pending} == {"frontend"}, pending
    assert "waiting for its ACK" in pending[0]["reason"] or "not sent" in pending[0]["reason"], pending
    # Resumed, it ACKs, and the same wait now succeeds.
    again = await meshctl_wait(canary, "--timeout", "60s")
    assert again.exit_code == 0, again.output


async def test_wait_for_delete_returns_once_every_sidecar_dropped_the_removed_rule(canary: Canary,
                                                                                 tmp_path_factory: Any) -> None:
    kept = tmp_path_factory.mktemp("removed") / "route.yaml"  # the user's copy of what they removed
    route = canary.config_dir / "route.yaml"
    kept.write_text(route.read_text())
    argv = ["wait", "--for=delete", "-f", str(kept), "--debug", canary.mesh.pilot.debug_address, "--timeout", "60s"]
    held = await asyncio.to_thread(CliRunner().invoke, cli, [*argv[:-2], "--timeout", "300ms"])
    assert held.exit_code == 4 and "pilot still holds it" in held.output, held.output
    route.unlink()
    result = await asyncio.to_thread(CliRunner().invoke, cli, [*argv, "-o", "json"])
    assert result.exit_code == 0, result.output
    objects = json.loads(result.output)["objects"]
    assert "VirtualService" in {o["kind"] for o in objects}
    assert {o["pilot"]["status"] for o in objects} == {"deleted"}, objects
    rows = affected(result)
    assert {r["workload"] for r in rows} >= {"frontend"} and {r["state"] for r in rows} == {"ACKED"}, rows
    # The moment wait returns, no affected sidecar's Envoy splits reviews by weight any more.
    for row in rows:
        envoy = canary.mesh.sidecars[f'{row["namespace"]}/{row["workload"]}']
        assert reviews_weights(await envoy.config_dump()) == {}, row["proxy"]
    text = await asyncio.to_thread(CliRunner().invoke, cli, argv)
    assert text.exit_code == 0 and "deleted VirtualService default/reviews" in text.output, text.output


def test_wait_without_pilot_is_unreachable_and_bad_usage_is_2(tmp_path: Any) -> None:
    path = tmp_path / "vs.yaml"
    path.write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n"
                    "spec: {hosts: [r], http: [{route: [{destination: {host: r}}]}]}\n")
    runner = CliRunner()
    down = runner.invoke(cli, ["wait", "--for=applied", "-f", str(path), "--debug", "127.0.0.1:1"])
    assert down.exit_code == 3 and "cannot reach" in down.output, down.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("{host: r}", "{host: r, port: {number: 70000}}"))
    usage = runner.invoke(cli, ["wait", "-f", str(bad), "--debug", "127.0.0.1:1"])
    assert usage.exit_code == 2 and "r" in usage.output and "number" in usage.output, usage.output
    timeout = runner.invoke(cli, ["wait", "-f", str(path), "--timeout", "soon"])
    assert timeout.exit_code == 2 and "--timeout" in timeout.output, timeout.output
