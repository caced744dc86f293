"""The sidecar's status port: ISTIO_KUBE_APP_PROBERS parsing, and real probes against real servers on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from aiohttp import web

from meshctl.app_probes import (
    AppProbe,
    Grpc,
    HttpGet,
    ProbeConfigError,
    StatusServer,
    TcpSocket,
    parse_app_probers,
    run_probe,
)
from meshctl.localmesh import free_port

POD_IP = "127.0.0.1"


def test_parse_istio_format() -> None:
    text = json.dumps({
        "/app-health/web/readyz": {"httpGet": {"path": "healthz", "port": 8080, "scheme": "HTTPS",
                                               "httpHeaders": [{"name": "X-A", "value": "1"}]},
                                   "timeoutSeconds": 3},
        "/app-health/web/livez": {"tcpSocket": {"port": 8080}},
        "/app-health/db/startupz": {"grpc": {"port": 9000, "service": "db"}},
    })
    assert parse_app_probers(text) == {
        "/app-health/web/readyz": AppProbe(HttpGet(8080, "/healthz", "HTTPS", None, (("X-A", "1"),)), 3.0),
        "/app-health/web/livez": AppProbe(TcpSocket(8080), 1.0),
        "/app-health/db/startupz": AppProbe(Grpc(9000, "db"), 1.0),
    }
    assert parse_app_probers("") == {}


@pytest.mark.parametrize(("probers", "message"), [
    ({"/healthz": {"tcpSocket": {"port": 1}}}, "path '/healthz' is not /app-health/"),
    ({"/app-health/a/livez": {"tcpSocket": {"port": "http"}}}, r"tcpSocket.port 'http' must be a port number"),
    ({"/app-health/a/livez": {"tcpSocket": {"port": 1}, "httpGet": {"port": 1}}}, "exactly one of"),
    ({"/app-health/a/livez": {"httpGet": {"port": 1, "scheme": "FTP"}}}, "httpGet.scheme 'FTP'"),
    ({"/app-health/a/livez": {"tcpSocket": {"port": 1}, "timeoutSeconds": -1}}, "timeoutSeconds -1"),
])
def test_parse_errors_name_path_and_field(probers: dict[str, object], message: str) -> None:
    with pytest.raises(ProbeConfigError, match=message):
        parse_app_probers(json.dumps(probers))


@pytest.fixture
async def app_port() -> AsyncIterator[int]:
    """A real HTTP app: /ok 200, /down 503, /moved 302; /echo answers 200 only with header X-Probe: yes."""
    async def handle(request: web.Request) -> web.Response:
        if request.path == "/echo":
            return web.Response(status=200 if request.headers.get("X-Probe") == "yes" else 400)
        if request.path == "/moved":
            return web.Response(status=302, headers={"Location": "/elsewhere"})
        return web.Response(status={"/ok": 200, "/down": 503}.get(request.path, 404), text=request.remote or "")
    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, POD_IP, port).start()
    yield port
    await runner.cleanup()


async def test_http_probe_passes_the_apps_status_on_from_the_inbound_source_address(app_port: int) -> None:
    ok = await run_probe(AppProbe(HttpGet(app_port, "/ok")), POD_IP)
    assert (ok.status, ok.detail) == (200, "127.0.0.6")  # the app saw the agent's inbound-bypass source
    assert (await run_probe(AppProbe(HttpGet(app_port, "/down")), POD_IP)).status == 503
    assert (await run_probe(AppProbe(HttpGet(app_port, "/moved")), POD_IP)).status == 302  # kubelet: success
    assert (await run_probe(AppProbe(HttpGet(app_port, "/echo")), POD_IP)).status == 400
    assert (await run_probe(AppProbe(HttpGet(app_port, "/echo", headers=(("X-Probe", "yes"),))), POD_IP)).status == 200
    closed = await run_probe(AppProbe(HttpGet(free_port(), "/ok")), POD_IP)
    assert closed.status == 500 and "failed" in closed.detail


async def test_tcp_probe(app_port: int) -> None:
    assert (await run_probe(AppProbe(TcpSocket(app_port)), POD_IP)).status == 200
    assert (await run_probe(AppProbe(TcpSocket(free_port())), POD_IP)).status == 500


@pytest.fixture
async def grpc_port() -> AsyncIterator[int]:
    """A real gRPC server whose health service says SERVING for "" and NOT_SERVING for "down"."""
    async def check(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        service = request[2:].decode() if request else ""
        if service not in ("", "down"):
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return b"\x08\x01" if service == "" else b"\x08\x02"
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(check)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("grpc.health.v1.Health",
                                                                          {"Check": handler}),))
    port = server.add_insecure_port(f"{POD_IP}:0")
    await server.start()
    yield port
    await server.stop(None)


async def test_grpc_health_probe(grpc_port: int) -> None:
    assert (await run_probe(AppProbe(Grpc(grpc_port)), POD_IP)).status == 200
    assert (await run_probe(AppProbe(Grpc(grpc_port, "down")), POD_IP)).status == 500
    missing = await run_probe(AppProbe(Grpc(grpc_port, "other")), POD_IP)
    assert missing.status == 500 and "NOT_FOUND" in missing.detail


async def test_status_server_serves_readiness_and_registered_app_probes(app_port: int) -> None:
    ready: list[str | None] = ["no certificate yet"]

    async def readiness() -> str | None:
        return ready[0]
    probers = parse_app_probers(json.dumps({"/app-health/web/readyz": {"httpGet": {"path": "/down", "port": app_port}},
                                            "/app-health/web/livez": {"tcpSocket": {"port": app_port}}}))
    server = StatusServer(probers, POD_IP, readiness)
    port = await server.start("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            async def status(path: str) -> int:
                async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                    return resp.status
            assert await status("/healthz/ready") == 503
            ready[0] = None
            assert await status("/healthz/ready") == 200
            assert await status("/app-health/web/readyz") == 503
            assert await status("/app-health/web/livez") == 200
            assert await status("/app-health/web/startupz") == 404
    finally:
        await server.stop()
