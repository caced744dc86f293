"""The user's path, as separate processes: `meshctl up`, `meshctl proxy run` per workload,
real HTTP through the sidecars, `meshctl proxy-status`, and a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from meshctl.democonfig import DemoMesh
from meshctl.echoapp import start_echo_app
from meshctl.localmesh import free_port, http_session
from tests.e2e.conftest import random_block

pytestmark = pytest.mark.e2e
MESHCTL = [sys.executable, "-m", "meshctl.cli"]


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *MESHCTL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)


async def run(*args: str) -> str:
    proc = await spawn(*args)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), 15)
    except TimeoutError:
        proc.kill()
        return await proc.wait()


async def wait_synced(debug: str, proxies: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for _ in range(150):
        rows = json.loads(await run("proxy-status", "--debug", debug, "--json"))
        if len(rows) == proxies and all(
            t["state"] == "SYNCED" for r in rows for t in r["types"].values()  # type: ignore[attr-defined]
        ):
            return rows
        await asyncio.sleep(0.2)
    raise AssertionError(f"not synced: {rows}")


async def test_up_proxy_run_and_proxy_status_as_processes(tmp_path: Path) -> None:
    demo = DemoMesh(random_block(), {"v1": free_port(), "v2": free_port()})
    (tmp_path / "mesh.yaml").write_text(demo.mesh_yaml())
    (tmp_path / "route.yaml").write_text(demo.route_yaml([50, 50]))
    ads, debug = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    procs = [await spawn("up", "--config-dir", str(tmp_path), "--ads", ads, "--debug", debug, "--plaintext-only")]
    apps = [await start_echo_app(f"reviews-{v}", v, port=p) for v, p in demo.app_ports.items()]
    try:
        for _ in range(100):  # pilot answers once its debug port is up
            try:
                await run("proxy-status", "--debug", debug, "--json")
                break
            except AssertionError:
                await asyncio.sleep(0.1)
        for name in ("frontend", "reviews-v1", "reviews-v2"):
            procs.append(await spawn("proxy", "run", "--plaintext", "--workload", f"default/{name}", "--pilot", ads,
                                     "--debug", debug, "--log-level", "warning"))
        await wait_synced(debug, 3)
        table = await run("proxy-status", "--debug", debug)
        assert table.count("SYNCED") == 12 and "default/frontend" in table
        seen: set[str] = set()
        async with http_session() as session:
            for _ in range(60):
                url = f"http://{demo.frontend}:15001/"
                async with session.get(url, headers={"Host": "reviews.default.svc.cluster.local:9080"}) as resp:
                    assert resp.status == 200
                    seen.add((await resp.json())["version"])
        assert seen == {"v1", "v2"}
    finally:
        codes = [await stop(p) for p in reversed(procs)]
        for runner, _ in apps:
            await runner.cleanup()
    assert codes == [0, 0, 0, 0], codes
