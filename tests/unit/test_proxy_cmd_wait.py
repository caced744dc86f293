"""`meshctl proxy run` waits for a pilot that is still starting (an example's whole command block);
`meshctl proxy wait` reads pilot's sync status as it should."""

from __future__ import annotations

import asyncio

import click
import pytest
from aiohttp import web

from meshctl.localmesh import free_port
from meshctl.proxy_cmd import fetch_workload, unsynced


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


def _row(**types: str) -> dict[str, object]:
    """A `/debug/syncz` row of proxy default/a, its types in the given states."""
    return {
        "namespace": "default",
        "workload": "a",
        "types": {t: {"state": s, "nack": "Invalid regex" if s == "NACKED" else None} for t, s in types.items()},
    }


def test_wait_reads_syncz_as_in_sync_only_when_every_type_is_synced() -> None:
    assert unsynced([_row(CDS="SYNCED", EDS="SYNCED", LDS="SYNCED", RDS="SYNCED")], "default", "a") is None
    assert unsynced([], "default", "a") == "its proxy is not connected to pilot yet"
    assert unsynced([_row(CDS="SYNCED", LDS="SYNCED")], "other", "a") == "its proxy is not connected to pilot yet"
    stale = unsynced([_row(CDS="SYNCED", EDS="STALE", LDS="SYNCED")], "default", "a")
    assert stale == "not in sync with pilot yet (EDS STALE)"
    assert unsynced([_row(CDS="SYNCED")], "default", "a") == "not in sync with pilot yet (LDS not asked for)"


def test_wait_gives_up_at_once_on_a_nack_and_quotes_envoy() -> None:
    with pytest.raises(click.ClickException, match="default/a: the proxy rejected its RDS config: Invalid regex"):
        unsynced([_row(CDS="SYNCED", LDS="SYNCED", RDS="NACKED")], "default", "a")
