"""The echo app over real HTTP on random loopback addresses."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from meshctl.echoapp import Upstream, check_loopback, make_app, start_echo_app


def _address() -> str:
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def reviews() -> AsyncIterator[str]:
    runner, url = await start_echo_app("reviews", "v2", host=_address())
    yield url
    await runner.cleanup()


async def _json(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with session.request(method, url, **kw) as resp:
        return resp.status, await resp.json()


async def test_reports_who_answered_and_what_it_saw(client: aiohttp.ClientSession, reviews: str) -> None:
    async with client.post(f"{reviews}/books/1?x=y", headers={"end-user": "jason"}, data=b"hi") as resp:
        assert resp.status == 200
        assert resp.headers["x-app-name"] == "reviews"
        assert resp.headers["x-app-version"] == "v2"
        body = await resp.json()
    assert body["name"] == "reviews"
    assert body["version"] == "v2"
    assert body["path"] == "/books/1?x=y"
    assert body["method"] == "POST"
    assert body["headers"]["end-user"] == "jason"
    assert body["host"] == reviews.removeprefix("http://")


async def test_fail_rate_one_returns_the_status_and_counts(
    client: aiohttp.ClientSession, reviews: str
) -> None:
    failing = {"fail_rate": 1.0, "fail_status": 418}
    status, control = await _json(client, "POST", f"{reviews}/_control", json=failing)
    assert status == 200
    assert (control["fail_rate"], control["fail_status"], control["delay_ms"]) == (1.0, 418, 0)
    for _ in range(3):
        async with client.get(f"{reviews}/a") as resp:
            assert resp.status == 418
            assert resp.headers["x-app-version"] == "v2"
    _, control = await _json(client, "GET", f"{reviews}/_control")
    assert control["requests"] == {"total": 3, "by_path": {"/a": 3}, "by_status": {"418": 3}}

    await _json(client, "POST", f"{reviews}/_control", json={"fail_rate": 0, "reset_counters": True})
    async with client.get(f"{reviews}/b") as resp:
        assert resp.status == 200
    _, control = await _json(client, "GET", f"{reviews}/_control")
    assert control["requests"] == {"total": 1, "by_path": {"/b": 1}, "by_status": {"200": 1}}
    assert control["fail_status"] == 418, "fields not posted keep their values"


async def test_fractional_fail_rate_is_reproducible_with_a_seed(client: aiohttp.ClientSession) -> None:
    runner, url = await start_echo_app("ratings", host=_address(), seed=7)
    try:
        await _json(client, "POST", f"{url}/_control", json={"fail_rate": 0.5})
        statuses = []
        for _ in range(40):
            async with client.get(f"{url}/r") as resp:
                statuses.append(resp.status)
    finally:
        await runner.cleanup()
    assert 5 < statuses.count(503) < 35
    assert set(statuses) == {200, 503}


async def test_delay_applies_to_traffic_not_control(client: aiohttp.ClientSession, reviews: str) -> None:
    await _json(client, "POST", f"{reviews}/_control", json={"delay_ms": 300})
    started = time.monotonic()
    await _json(client, "GET", f"{reviews}/slow")
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    await _json(client, "GET", f"{reviews}/_control")
    assert time.monotonic() - started < 0.25


@pytest.mark.parametrize(
    "body", [{"fail_rate": 1.5}, {"fail_status": 99}, {"delay_ms": -1}, {"nonsense": 1}, "not json"]
)
async def test_bad_control_is_400_and_changes_nothing(
    client: aiohttp.ClientSession, reviews: str, body: object
) -> None:
    kw: dict[str, Any] = {"data": body} if isinstance(body, str) else {"json": body}
    status, answer = await _json(client, "POST", f"{reviews}/_control", **kw)
    assert status == 400
    assert answer["error"]
    _, control = await _json(client, "GET", f"{reviews}/_control")
    assert (control["fail_rate"], control["fail_status"], control["delay_ms"]) == (0.0, 503, 0)


async def test_call_reaches_the_upstream_with_host_and_propagated_headers(
    client: aiohttp.ClientSession, reviews: str
) -> None:
    # No sidecar here: the "outbound port" is reviews itself, which still sees the Host we send.
    upstream = Upstream(url=reviews, host="reviews.bookinfo.svc.cluster.local", path="/reviews/1")
    runner, front = await start_echo_app("productpage", host=_address(), upstream=upstream)
    try:
        headers = {"end-user": "jason", "x-other": "1"}
        status, body = await _json(client, "GET", f"{front}/call", headers=headers)
        assert status == 200
        answer = body["upstream"]
        assert answer["status"] == 200
        assert answer["headers"]["x-app-version"] == "v2"
        assert answer["body"]["host"] == "reviews.bookinfo.svc.cluster.local"
        assert answer["body"]["path"] == "/reviews/1"
        assert answer["body"]["headers"]["end-user"] == "jason"
        assert "x-other" not in answer["body"]["headers"]

        await _json(client, "POST", f"{reviews}/_control", json={"fail_rate": 1})
        status, body = await _json(client, "GET", f"{front}/call?host=ratings&path=/x")
        assert status == 200, "an upstream's error answer is reported, not turned into ours"
        assert (body["upstream"]["status"], body["upstream"]["host"]) == (503, "ratings")
        _, control = await _json(client, "GET", f"{reviews}/_control")
        assert control["requests"]["by_path"] == {"/reviews/1": 1, "/x": 1}
    finally:
        await runner.cleanup()


async def test_call_always_and_unreachable_upstream(client: aiohttp.ClientSession) -> None:
    upstream = Upstream(url=f"http://{_address()}:9", host="nowhere")
    runner, front = await start_echo_app("front", host=_address(), upstream=upstream, call_always=True)
    try:
        status, body = await _json(client, "GET", f"{front}/anything")
    finally:
        await runner.cleanup()
    assert status == 502
    assert "nowhere" in body["upstream"]["error"]


async def test_call_without_upstream_is_502(client: aiohttp.ClientSession, reviews: str) -> None:
    status, body = await _json(client, "GET", f"{reviews}/call")
    assert status == 502
    assert "no upstream" in body["upstream"]["error"]


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "localhost", "::1"])
def test_binds_only_to_loopback_v4(host: str) -> None:
    with pytest.raises(ValueError, match=host):
        check_loopback(host)


def test_call_always_needs_an_upstream() -> None:
    with pytest.raises(ValueError, match="upstream"):
        make_app("x", call_always=True)


async def test_runs_as_a_module(client: aiohttp.ClientSession) -> None:
    host = _address()
    runner, probe = await start_echo_app("probe", host=host)  # find a free port on this address
    port = int(probe.rsplit(":", 1)[1])
    await runner.cleanup()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshctl.echoapp", "--name", "details", "--version", "v3",
        "--host", host, "--port", str(port),
    )  # fmt: skip
    try:
        body = await _wait_for_json(client, f"http://{host}:{port}/d")
        assert (body["name"], body["version"]) == ("details", "v3")
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) is not None


async def _wait_for_json(client: aiohttp.ClientSession, url: str) -> Any:
    for _ in range(100):
        try:
            return (await _json(client, "GET", url))[1]
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered")
