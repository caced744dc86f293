"""Helpers of the replica tests: `meshctl up --kubeconfig` processes, Leases and pilot's debug API."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshctl.localmesh import free_port
from tests.k8s.cluster import KubeCluster
from tests.k8s.test_kube_source import minimal_crds

log = logging.getLogger(__name__)

# Short leases so the tests run in seconds; LeaseTiming's rule still holds (30 > 6 > 1.2 x 1).
FAST_LEASE = {"MESHCTL_PILOT_LEASE_DURATION_MS": "8000", "MESHCTL_PILOT_LEASE_RENEW_DEADLINE_MS": "6000",
              "MESHCTL_PILOT_LEASE_RETRY_PERIOD_MS": "1000"}


def install_crds(cluster: KubeCluster) -> None:
    """Every mesh kind served, with the status subresource (CRDs another test installed are kept)."""
    cluster.ensure_crds(minimal_crds())


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    """Poll `check()` until true; fail naming `what` if `timeout` passes first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


async def kubectl_json(cluster: KubeCluster, *args: str) -> Any:
    """`kubectl ... -o json`, decoded; None when it fails (e.g. NotFound)."""
    done = await asyncio.to_thread(cluster.kubectl, *args, "-o", "json", check=False)
    if done.returncode != 0:
        log.info("kubectl %s: %s", " ".join(args), done.stderr)
        return None
    return json.loads(done.stdout)


async def no_namespace_terminating(cluster: KubeCluster) -> bool:
    """Whether every namespace deleted earlier is gone. Tests delete theirs without waiting; the
    Services in them leave the mesh while that runs, which changes config versions mid-test."""
    found = await kubectl_json(cluster, "get", "namespaces")
    return found is not None and all(n["status"].get("phase") != "Terminating" for n in found["items"])


async def lease_holder(cluster: KubeCluster, namespace: str, name: str) -> str:
    """The Lease's holderIdentity ("" when free or absent)."""
    lease = await kubectl_json(cluster, "-n", namespace, "get", "lease", name)
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


async def get_json(url: str) -> Any:
    """GET `url` as JSON; None when nothing answers."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
                session.get(url) as resp:
            return await resp.json() if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def metric(debug: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """One sample from pilot's `/metrics` (None when absent or pilot is away)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
                session.get(f"http://{debug}/metrics") as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items())) + "}" if labels else "")
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == want:
            return float(value)
    return None


@dataclass
class UpProcess:
    """One `meshctl up --kubeconfig` (a pilot replica) on free ports."""

    cluster: KubeCluster
    mesh_namespace: str
    log: Path
    env: Mapping[str, str] = field(default_factory=dict)
    ads: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    debug: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")
    proc: asyncio.subprocess.Process | None = None
    state_dir: Path | None = None  # given: the whole control plane (CA, webhooks); None: --plaintext-only

    async def start(self) -> None:
        mode = ["--plaintext-only"] if self.state_dir is None else [
            "--state-dir", str(self.state_dir), "--xds-tls", f"127.0.0.1:{free_port()}",
            "--webhooks", f"127.0.0.1:{free_port()}"]
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshctl.cli", "up", *mode,
                "--kubeconfig", str(self.cluster.kubeconfig), "--mesh-namespace", self.mesh_namespace,
                "--ads", self.ads, "--debug", self.debug, "--log-level", "info",
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **FAST_LEASE, **self.env})
        await until(f"pilot {self.debug} serving", self.serving, 90)

    async def serving(self) -> bool:
        if self.proc is None or self.proc.returncode is not None:
            pytest.fail(f"meshctl up exited: {self.log.read_text()[-3000:]}")
        return await get_json(f"http://{self.debug}/debug/syncz") is not None

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it with `sig` (SIGKILL: as a crash) and reap it; a no-op once it has exited."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(sig)
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
