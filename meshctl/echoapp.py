"""A small HTTP app for demos and tests that says who answered, and misbehaves on request.

`GET /<anything>` answers JSON naming the app, its version and the request it saw, so a test
can tell which version a route picked and which headers the mesh added. `POST /_control` sets
a failure rate, failure status and delay for every other path; `GET /_control` shows them with
request counters (so a test can check, say, that a mirror received traffic). With an upstream
(its own sidecar's outbound address plus a Host), `/call` — or every request — calls another
service through the mesh and includes that answer.

Concurrency: one aiohttp server on one event loop; handlers read the current `Behaviour`, which
a control POST replaces as a whole, and bump plain counters, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import aiohttp
import click
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONTROL_PATH = "/_control"
CALL_PATH = "/call"
# Forwarded on upstream calls so traces join up and header-based routing (end-user) works.
PROPAGATED_HEADERS = (
    "x-request-id",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "end-user",
)
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


@dataclass(frozen=True)
class Behaviour:
    """How the app misbehaves on every path but `/_control`."""

    fail_rate: float = 0.0
    fail_status: int = 503
    delay_ms: int = 0


@dataclass(frozen=True)
class Upstream:
    """Where `/call` goes: `url` is the caller's sidecar outbound address, `host` the service."""

    url: str
    host: str
    path: str = "/"


class _ControlUpdate(BaseModel):
    """Body of `POST /_control`: only the fields given change."""

    model_config = ConfigDict(extra="forbid")

    fail_rate: float | None = Field(None, ge=0, le=1)
    fail_status: int | None = Field(None, ge=200, le=599)
    delay_ms: int | None = Field(None, ge=0, le=600_000)
    reset_counters: bool = False


@dataclass
class _State:
    name: str
    version: str
    upstream: Upstream | None
    call_always: bool
    rng: random.Random
    behaviour: Behaviour = field(default_factory=Behaviour)
    by_path: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)
    session: aiohttp.ClientSession | None = None

    def counters(self) -> dict[str, Any]:
        return {
            "total": sum(self.by_path.values()),
            "by_path": dict(sorted(self.by_path.items())),
            "by_status": dict(sorted(self.by_status.items())),
        }


_STATE = web.AppKey("echo_state", _State)


def make_app(
    name: str,
    version: str = "v1",
    *,
    upstream: Upstream | None = None,
    call_always: bool = False,
    seed: int | None = None,
) -> web.Application:
    """The echo app; `seed` makes fractional fail rates reproducible in tests."""
    if call_always and upstream is None:
        raise ValueError("call_always needs an upstream")
    app = web.Application()
    app[_STATE] = _State(name, version, upstream, call_always, random.Random(seed))
    app.cleanup_ctx.append(_client_session)
    app.router.add_route("GET", CONTROL_PATH, _get_control)
    app.router.add_route("POST", CONTROL_PATH, _post_control)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    state = app[_STATE]
    if state.upstream is None:
        yield
        return
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        state.session = session
        yield
        state.session = None


def _reply(state: _State, body: dict[str, Any], status: int = 200) -> web.Response:
    headers = {"x-app-name": state.name, "x-app-version": state.version}
    return web.json_response(body, status=status, headers=headers)


async def _get_control(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    upstream = asdict(state.upstream) if state.upstream else None
    body = {"name": state.name, "version": state.version, **asdict(state.behaviour), "upstream": upstream}
    return _reply(state, {**body, "requests": state.counters()})


async def _post_control(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    try:
        update = _ControlUpdate.model_validate_json(await request.read())
    except ValidationError as exc:
        return _reply(state, {"error": json.loads(exc.json(include_url=False))}, status=400)
    changes = update.model_dump(exclude_none=True, exclude={"reset_counters"})
    state.behaviour = replace(state.behaviour, **changes)
    if update.reset_counters:
        state.by_path.clear()
        state.by_status.clear()
    return await _get_control(request)


async def _echo(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    behaviour = state.behaviour
    if behaviour.delay_ms:
        await asyncio.sleep(behaviour.delay_ms / 1000)
    body: dict[str, Any] = {
        "name": state.name,
        "version": state.version,
        "path": request.path_qs,
        "method": request.method,
        "headers": {key: ", ".join(request.headers.getall(key)) for key in request.headers},
        "host": request.host,
    }
    status = 200
    if behaviour.fail_rate and state.rng.random() < behaviour.fail_rate:
        status = behaviour.fail_status
        body["error"] = f"injected by {CONTROL_PATH}"
    elif request.path == CALL_PATH or state.call_always:
        body["upstream"] = await _call_upstream(request, state)
        status = 502 if "error" in body["upstream"] else 200
    state.by_path[request.path] += 1
    state.by_status[str(status)] += 1
    return _reply(state, body, status)


async def _call_upstream(request: web.Request, state: _State) -> dict[str, Any]:
    """Call the upstream through the mesh; `?host=` and `?path=` override the configured ones.

    Any answer, even a 503 the mesh injected, is reported in the body as the upstream's;
    only a transport failure (no answer at all) becomes an `error`.
    """
    if state.upstream is None or state.session is None:
        return {"error": "no upstream configured (--upstream URL --upstream-host HOST)"}
    host = request.query.get("host", state.upstream.host)
    path = request.query.get("path", state.upstream.path)
    headers = {name: request.headers[name] for name in PROPAGATED_HEADERS if name in request.headers}
    headers["Host"] = host
    url = state.upstream.url.rstrip("/") + "/" + path.lstrip("/")
    try:
        async with state.session.get(url, headers=headers) as resp:
            text = await resp.text()
            result: dict[str, Any] = {"status": resp.status, "host": host, "path": path}
            result["headers"] = {k.lower(): v for k, v in resp.headers.items() if k.lower().startswith("x-")}
    except (aiohttp.ClientError, TimeoutError) as exc:
        return {"error": f"{url} (Host: {host}): {exc!r}", "host": host, "path": path}
    try:
        result["body"] = json.loads(text)
    except ValueError:
        result["body"] = text
    return result


def check_loopback(host: str) -> None:
    """The app is for local meshes: refuse to listen anywhere but 127.0.0.0/8."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"host {host!r} must be an IPv4 address in 127.0.0.0/8") from exc
    if ip not in _LOOPBACK:
        raise ValueError(f"host {host!r} is outside 127.0.0.0/8; the echo app binds only to loopback")


async def start_echo_app(
    name: str,
    version: str = "v1",
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    upstream: Upstream | None = None,
    call_always: bool = False,
    seed: int | None = None,
) -> tuple[web.AppRunner, str]:
    """Serve the app in this event loop; returns the runner (`await runner.cleanup()`) and URL.

    `port=0` picks a free port; the URL carries the real one.
    """
    check_loopback(host)
    runner = web.AppRunner(make_app(name, version, upstream=upstream, call_always=call_always, seed=seed))
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return runner, f"http://{host}:{bound_port}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--name", required=True, help="Reported as `name` and x-app-name.")
@click.option("--version", "app_version", default="v1", show_default=True, help="Reported as `version`.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address in 127.0.0.0/8.")
@click.option("--port", type=click.IntRange(1, 65535), required=True)
@click.option("--upstream", help="URL of this app's sidecar outbound listener, e.g. http://127.0.0.5:15001.")
@click.option("--upstream-host", help="Host header for upstream calls, e.g. ratings.bookinfo.svc.")
@click.option("--upstream-path", default="/", show_default=True)
@click.option("--call-always", is_flag=True, help="Call the upstream on every request, not just /call.")
@click.option("--seed", type=int, help="Seed for fractional fail rates.")
def main(
    *,
    name: str,
    app_version: str,
    host: str,
    port: int,
    upstream: str | None,
    upstream_host: str | None,
    upstream_path: str,
    call_always: bool,
    seed: int | None,
) -> None:
    """Run the echo app until Ctrl-C or SIGTERM."""
    try:
        check_loopback(host)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--host") from exc
    if bool(upstream) != bool(upstream_host):
        raise click.UsageError("--upstream and --upstream-host go together")
    target = Upstream(upstream, upstream_host, upstream_path) if upstream and upstream_host else None
    try:
        app = make_app(name, app_version, upstream=target, call_always=call_always, seed=seed)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    banner = f"{name} {app_version} on http://{host}:{port}"
    web.run_app(app, host=host, port=port, print=lambda _: click.echo(banner))


if __name__ == "__main__":
    main()
