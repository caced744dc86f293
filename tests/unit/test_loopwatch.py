"""The event-loop watchdog (`pilot.loopwatch`): a real stall of a real loop is logged once, with the
stack of the code holding the loop, counted, and its end logged; a loop that keeps running is not."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pilot.app import Pilot
from pilot.loopwatch import LoopWatch
from pilot.settings import PilotSettings


def hold_the_loop_for(seconds: float) -> None:
    time.sleep(seconds)  # a blocking call on the loop thread: what the watchdog is for


async def test_a_stall_is_logged_once_with_the_stack_holding_the_loop_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    watch = LoopWatch(registry, threshold=0.3, interval=0.05)
    caplog.set_level(logging.WARNING, logger="pilot.loopwatch")
    watch.start()
    try:
        await asyncio.sleep(0.5)  # the loop runs: no stall
        assert registry.get_sample_value("pilot_event_loop_stalls_total") == 0
        assert caplog.records == []
        hold_the_loop_for(1.0)
        await asyncio.sleep(0.3)  # the loop beats again; the thread sees it
        assert registry.get_sample_value("pilot_event_loop_stalls_total") == 1
        stalled = [r.getMessage() for r in caplog.records if "stalled" in r.getMessage()]
        assert len(stalled) == 1, stalled  # once per stall, not once per check
        assert "hold_the_loop_for" in stalled[0] and "time.sleep(seconds)" in stalled[0], stalled[0]
        ended = [r.getMessage() for r in caplog.records if "ran again" in r.getMessage()]
        assert len(ended) == 1 and "stall of 1." in ended[0], ended
        await asyncio.sleep(0.5)
        assert registry.get_sample_value("pilot_event_loop_stalls_total") == 1
    finally:
        watch.stop()
    assert not watch.watching


async def test_pilot_watches_its_loop_from_start_to_stop_unless_turned_off() -> None:
    async with Pilot(PilotSettings(ads_port=0, debug_port=0)) as pilot:
        watch = pilot.loop_watch
        assert watch is not None and watch.watching
        assert watch._thread is not None and watch._thread.daemon  # never keeps the process alive
    assert not watch.watching  # stopped with pilot
    off = Pilot(PilotSettings(ads_port=0, debug_port=0, loop_stall_ms=0))
    assert off.loop_watch is None


async def test_pilot_watches_its_loop_from_after_its_first_config_load(tmp_path: Path) -> None:
    """The first load of the config directory runs on the loop before anything is served (at 1,000
    files ~2 s): the watchdog starts after it, so a large mesh's start is not reported as a stall."""
    (tmp_path / "se.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: se, namespace: default}\n"
        "spec: {hosts: [s.example.com], ports: [{number: 80, name: http, protocol: HTTP}]}\n")
    pilot = Pilot(PilotSettings(ads_port=0, debug_port=0, config_dir=tmp_path))
    files, watch = pilot.files, pilot.loop_watch
    assert files is not None and watch is not None
    watching_while_loading: list[bool] = []
    load = files.sync

    def observed_load() -> bool:  # the real load, noting whether the watchdog ran during it
        watching_while_loading.append(watch.watching)
        return load()

    files.sync = observed_load  # type: ignore[method-assign]
    async with pilot:
        assert watch.watching
        assert [o.metadata.name for o in pilot.store.objects("ServiceEntry")] == ["se"]
    assert watching_while_loading == [False]
