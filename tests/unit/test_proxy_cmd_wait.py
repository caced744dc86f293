"""`meshctl proxy run` waits for a pilot that is still starting (an example's whole command block)."""

from __future__ import annotations

import asyncio

import click
import pytest
from aiohttp import web

from meshctl.localmesh import free_port
from meshctl.proxy_cmd import fetch_workload


async def test_a_debug_api_that_comes_up_late_is_still_found() -> None:
    port = free_port()

    async def workload(request: web.Request) -> web.Response:
        return web.json_response({"namespace": "default", "name": "a", "address": "127.0.8.1", "labels": {}})

    async def start_late() -> web.AppRunner:
        await asyncio.sleep(0.6)
        app = web.Application()
        app.router.add_get("/debug/workload/default/a", workload)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    late = asyncio.create_task(start_late())
    try:
        found = await fetch_workload(f"127.0.0.1:{port}", "default", "a", wait=5)
        assert found["address"] == "127.0.8.1"
    finally:
        await (await late).cleanup()


async def test_without_waiting_an_absent_pilot_is_a_clear_error_at_once() -> None:
    with pytest.raises(click.ClickException, match="cannot reach pilot's debug API"):
        await fetch_workload(f"127.0.0.1:{free_port()}", "default", "a")
