"""The sidecar's status port (15020): its own readiness and the app probes the injector rewrote.

With mutual TLS the kubelet's plaintext probes would be refused by the sidecar, so the injector
rewrites each app probe into an HTTP GET on this port at `/app-health/<container>/<livez|readyz|
startupz>` and passes the original in `ISTIO_KUBE_APP_PROBERS` (Istio's JSON: path ->
`{httpGet|tcpSocket|grpc, timeoutSeconds}`, ports already numbers). The agent runs the original
probe from inside the pod, against the pod IP as the kubelet would (Istio's default); HTTP and
TCP probes come from source address 127.0.0.6 (which the redirect rules let reach the app without
Envoy; gRPC's Python client cannot choose its source address). It answers: an httpGet probe's
own status code (the kubelet judges it: 200-399 pass), 200 or 500 for tcpSocket and grpc
(SERVING or not). `/healthz/ready` answers 200 once the workload has its certificate and Envoy
is LIVE.

`parse_app_probers` is pure; `run_probe` does one probe's I/O; `StatusServer` is the thin aiohttp
edge. Concurrency: one event loop; each request runs its probe and nothing is shared between
requests. Cost: one connection to the app per probe request (no keep-alive, as the kubelet).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
from aiohttp import web

log = logging.getLogger(__name__)

PROBERS_ENV = "ISTIO_KUBE_APP_PROBERS"
READY_PATH = "/healthz/ready"
PROBE_PATH = re.compile(r"^/app-health/[^/]+/(livez|readyz|startupz)$")
UPSTREAM_SOURCE_V4 = "127.0.0.6"
UPSTREAM_SOURCE_V6 = "::6"
DEFAULT_TIMEOUT_S = 1.0  # the kubelet's default timeoutSeconds
GRPC_HEALTH_METHOD = "/grpc.health.v1.Health/Check"
GRPC_SERVING = 1


class ProbeConfigError(ValueError):
    """ISTIO_KUBE_APP_PROBERS cannot be used: names the path, the field and the reason."""


@dataclass(frozen=True)
class HttpGet:
    port: int
    path: str = "/"
    scheme: str = "HTTP"
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TcpSocket:
    port: int
    host: str | None = None


@dataclass(frozen=True)
class Grpc:
    port: int
    service: str = ""


@dataclass(frozen=True)
class AppProbe:
    """One original probe, as the agent runs it."""

    action: HttpGet | TcpSocket | Grpc
    timeout_s: float = DEFAULT_TIMEOUT_S


def _port(path: str, action: str, spec: Mapping[str, Any]) -> int:
    port = spec.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ProbeConfigError(f"{PROBERS_ENV}: {path}: {action}.port {port!r} must be a port number "
                               "(the injector resolves named ports)")
    return port


def _action(path: str, probe: Mapping[str, Any]) -> HttpGet | TcpSocket | Grpc:
    kinds = [k for k in ("httpGet", "tcpSocket", "grpc") if k in probe]
    if len(kinds) != 1 or not isinstance(probe[kinds[0]], dict):
        raise ProbeConfigError(f"{PROBERS_ENV}: {path}: needs exactly one of httpGet, tcpSocket, grpc")
    kind = kinds[0]
    spec: Mapping[str, Any] = probe[kind]
    port = _port(path, kind, spec)
    if kind == "tcpSocket":
        return TcpSocket(port, spec.get("host") or None)
    if kind == "grpc":
        return Grpc(port, str(spec.get("service") or ""))
    scheme = str(spec.get("scheme") or "HTTP").upper()
    if scheme not in ("HTTP", "HTTPS"):
        raise ProbeConfigError(f"{PROBERS_ENV}: {path}: httpGet.scheme {scheme!r} is not HTTP or HTTPS")
    headers = tuple((str(h.get("name", "")), str(h.get("value", "")))
                    for h in spec.get("httpHeaders") or () if isinstance(h, dict) and h.get("name"))
    request_path = str(spec.get("path") or "/")
    return HttpGet(port, request_path if request_path.startswith("/") else f"/{request_path}", scheme,
                   spec.get("host") or None, headers)


def parse_app_probers(text: str) -> dict[str, AppProbe]:
    """The probes in ISTIO_KUBE_APP_PROBERS by agent path; empty text means none."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ProbeConfigError(f"{PROBERS_ENV}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ProbeConfigError(f"{PROBERS_ENV}: must be an object of path -> probe")
    probes = {}
    for path, probe in sorted(data.items()):
        if not PROBE_PATH.match(path):
            raise ProbeConfigError(f"{PROBERS_ENV}: path {path!r} is not /app-health/<container>/"
                                   "<livez|readyz|startupz>")
        if not isinstance(probe, dict):
            raise ProbeConfigError(f"{PROBERS_ENV}: {path}: must be an object")
        timeout = probe.get("timeoutSeconds") or DEFAULT_TIMEOUT_S
        if not isinstance(timeout, int | float) or timeout <= 0:
            raise ProbeConfigError(f"{PROBERS_ENV}: {path}: timeoutSeconds {timeout!r} must be positive")
        probes[path] = AppProbe(_action(path, probe), float(timeout))
    return probes


@dataclass(frozen=True)
class ProbeResult:
    """What the status port answers: the HTTP status and a short text for the kubelet's events."""

    status: int
    detail: str


def _source(destination: str) -> str | None:
    """127.0.0.6 (or ::6) when probing a pod address; none for other hosts (a probe's own `host`)."""
    try:
        ip = ipaddress.ip_address(destination)
    except ValueError:
        return None
    return UPSTREAM_SOURCE_V6 if ip.version == 6 else UPSTREAM_SOURCE_V4


def _url_host(host: str) -> str:
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    return host


async def _http(probe: HttpGet, pod_ip: str, timeout: float) -> ProbeResult:
    host = probe.host or pod_ip
    source = _source(host)
    tls: ssl.SSLContext | bool = False
    if probe.scheme == "HTTPS":  # as the kubelet: no certificate verification
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
    connector = aiohttp.TCPConnector(local_addr=(source, 0) if source else None, force_close=True, ssl=tls)
    headers = dict(probe.headers)
    url = f"{probe.scheme.lower()}://{_url_host(host)}:{probe.port}{probe.path}"
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout),
                                  trust_env=False) as session,
            session.get(url, headers=headers, allow_redirects=False) as resp,
        ):
            body = (await resp.content.read(1024)).decode(errors="replace")
            return ProbeResult(resp.status, body)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return ProbeResult(500, f"GET {url} failed: {type(exc).__name__}: {exc}")


async def _tcp(probe: TcpSocket, pod_ip: str, timeout: float) -> ProbeResult:
    host = probe.host or pod_ip
    source = _source(host)
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, probe.port, local_addr=(source, 0) if source else None)
    except (OSError, TimeoutError) as exc:
        return ProbeResult(500, f"TCP {host}:{probe.port} failed: {type(exc).__name__}: {exc}")
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ProbeResult(200, f"TCP {host}:{probe.port} accepts connections")


def _health_request(service: str) -> bytes:
    """grpc.health.v1.HealthCheckRequest{service} in protobuf wire format (field 1, length-delimited)."""
    data = service.encode()
    size, varint = len(data), bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        varint.append(byte | (0x80 if size else 0))
        if not size:
            break
    return (b"\x0a" + bytes(varint) + data) if data else b""


def _health_status(response: bytes) -> int:
    """`status` (field 1, varint) of a grpc.health.v1.HealthCheckResponse; 0 (UNKNOWN) if absent."""
    if len(response) >= 2 and response[0] == 0x08:
        return response[1] & 0x7F
    return 0


async def _grpc(probe: Grpc, pod_ip: str, timeout: float) -> ProbeResult:
    target = f"{_url_host(pod_ip)}:{probe.port}"
    async with grpc.aio.insecure_channel(target) as channel:
        check = channel.unary_unary(GRPC_HEALTH_METHOD)
        try:
            response = await check(_health_request(probe.service), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return ProbeResult(500, f"gRPC health {target}: {exc.code().name}: {exc.details()}")
    status = _health_status(response)
    return ProbeResult(200 if status == GRPC_SERVING else 500, f"gRPC health {target}: status {status}")


async def run_probe(probe: AppProbe, pod_ip: str) -> ProbeResult:
    """Run one original probe against the app (see the module docstring)."""
    action = probe.action
    if isinstance(action, HttpGet):
        return await _http(action, pod_ip, probe.timeout_s)
    if isinstance(action, TcpSocket):
        return await _tcp(action, pod_ip, probe.timeout_s)
    return await _grpc(action, pod_ip, probe.timeout_s)


# Why the sidecar is not ready yet, or None when it is.
Readiness = Callable[[], Awaitable[str | None]]


class StatusServer:
    """aiohttp on the status port: `/healthz/ready` and `/app-health/...`."""

    def __init__(self, probers: Mapping[str, AppProbe], pod_ip: str, readiness: Readiness) -> None:
        self.probers = dict(probers)
        self.pod_ip = pod_ip
        self._readiness = readiness
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        application = web.Application()
        application.router.add_get(READY_PATH, self._ready)
        application.router.add_get("/app-health/{container}/{kind}", self._app_health)
        return application

    async def _ready(self, _request: web.Request) -> web.Response:
        why = await self._readiness()
        if why is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {why}\n")

    async def _app_health(self, request: web.Request) -> web.Response:
        probe = self.probers.get(request.path)
        if probe is None:
            return web.Response(status=404, text=f"no app probe registered for {request.path}\n")
        result = await run_probe(probe, self.pod_ip)
        if result.status >= 400:
            log.info("app probe %s failed: %s %s", request.path, result.status, result.detail[:200])
        return web.Response(status=result.status, text=result.detail)

    async def start(self, host: str, port: int) -> int:
        """Listen on `host:port` (0: a free port); the bound port."""
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1]) if runner.addresses else port
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
