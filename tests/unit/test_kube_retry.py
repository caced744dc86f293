"""GETs against the API server are tried again when it asks for it (429 / 5xx with Retry-After).

The API server answers 429 "storage is (re)initializing" for a moment after a CRD is installed;
`meshctl analyze --k8s` and `describe --k8s` failed on it (seen in CI). A small HTTP server here
answers as the API server does, since the real one cannot be made to on demand.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from meshctl.kubeapply import Applier
from meshctl.localmesh import free_port
from pilot.kube import retry
from pilot.kube.client import make_client
from pilot.kube.discovery import get_json
from pilot.kube.retry import retry_after
from pilot.kube.watch import WatchError
from tests.unit.kubeconfigs import token_kubeconfig

STATUS_429 = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "storage is (re)initializing",
              "reason": "TooManyRequests", "details": {"retryAfterSeconds": 1}, "code": 429}


class ApiServer:
    """Answers /apis/x (any method) with the queued (status, Retry-After) answers, then 200."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, str | None]] = []
        self.seen: list[float] = []
        self.methods: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(time.monotonic())
        self.methods.append(request.method)
        if self.answers:
            status, after = self.answers.pop(0)
            headers = {"Retry-After": after} if after is not None else {}
            return web.json_response({**STATUS_429, "code": status}, status=status, headers=headers)
        return web.json_response({"kind": "APIGroup", "name": "x"})


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[ApiServer, Path]]:
    api = ApiServer()
    app = web.Application()
    app.router.add_route("*", "/apis/x", api.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    kubeconfig = token_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")
    try:
        yield api, kubeconfig
    finally:
        await runner.cleanup()


async def test_a_429_with_retry_after_is_tried_again_after_that_long(server: tuple[ApiServer, Path]) -> None:
    api, kubeconfig = server
    api.answers = [(429, "1")]
    client = await make_client(kubeconfig)
    try:
        found = await get_json(client, "/apis/x")
    finally:
        await client.close()
    assert found == {"kind": "APIGroup", "name": "x"}
    assert len(api.seen) == 2 and api.seen[1] - api.seen[0] >= 0.9


async def test_an_answer_without_retry_after_is_final(server: tuple[ApiServer, Path]) -> None:
    api, kubeconfig = server
    api.answers = [(500, None)]
    client = await make_client(kubeconfig)
    try:
        with pytest.raises(WatchError) as failed:
            await get_json(client, "/apis/x")
    finally:
        await client.close()
    assert failed.value.status == 500 and len(api.seen) == 1
    assert json.loads(str(failed.value).split(": ", 1)[1])["code"] == 500  # the server's words, not ours


async def test_the_retries_are_bounded(server: tuple[ApiServer, Path]) -> None:
    api, kubeconfig = server
    api.answers = [(503, "0")] * 5
    client = await make_client(kubeconfig)
    try:
        with pytest.raises(WatchError) as failed:
            await get_json(client, "/apis/x", retries=3)
    finally:
        await client.close()
    assert failed.value.status == 503 and len(api.seen) == 4  # the first try and three more


async def test_install_requests_are_tried_again_too(server: tuple[ApiServer, Path]) -> None:
    api, kubeconfig = server
    api.answers = [(429, "0"), (503, "0")]
    client = await make_client(kubeconfig)
    try:
        status, body = await Applier(client).request("GET", "/apis/x")
    finally:
        await client.close()
    assert (status, body["kind"], len(api.seen)) == (200, "APIGroup", 3)


async def test_leader_election_status_and_ca_store_requests_wait_as_asked_too(server: tuple[ApiServer, Path]) -> None:
    """`pilot.kube.leader.api_request` carries the Lease reads and writes, the status writer's GET
    and PATCH and the CA store's Secret requests: a 429 with Retry-After is sent again after that
    long (it used to come back to them as a failure at once), and a 409 is final."""
    from pilot.kube.leader import api_request

    api, kubeconfig = server
    api.answers = [(429, "1"), (503, "0")]
    client = await make_client(kubeconfig)
    try:
        status, body = await api_request(client, "PATCH", "/apis/x", {"status": {}},
                                         content_type="application/merge-patch+json")
        assert (status, body["kind"], api.methods) == (200, "APIGroup", ["PATCH"] * 3)
        assert api.seen[1] - api.seen[0] >= 0.9
        api.answers, api.seen, api.methods = [(409, "1")], [], []
        status, body = await api_request(client, "GET", "/apis/x")
        assert (status, body["code"], len(api.seen)) == (409, 409, 1)
    finally:
        await client.close()


def test_only_429_and_5xx_with_seconds_are_retried_and_waits_are_capped() -> None:
    assert retry_after(429, "2") == 2.0
    assert retry_after(503, " 1 ") == 1.0
    assert retry_after(429, "3600") == retry.MAX_RETRY_AFTER
    assert retry_after(429, None) is None
    assert retry_after(429, "Wed, 21 Oct 2026 07:28:00 GMT") is None  # an HTTP date: not waited for
    assert retry_after(404, "1") is None and retry_after(403, "1") is None


def test_the_cli_does_not_load_the_kubernetes_client_models() -> None:
    """`kubernetes_asyncio.client` loads every model class (~36 MB of RSS): `meshctl up` on the local
    mesh, and every other command that does not talk to a cluster, must not pay for it. The retry
    rule lives apart from it for that reason (measured: empty RSS 98 MB, 134 MB when it did)."""
    probe = ("import sys, meshctl.cli; "
             "print(sorted(m for m in sys.modules if m.startswith('kubernetes_asyncio.client')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:500]
