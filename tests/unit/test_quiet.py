"""`pilot.quiet.WhenQuiet`: actions run once per burst of activity, after it settles, never during."""

from __future__ import annotations

import asyncio

from pilot.quiet import WhenQuiet


async def test_a_burst_of_touches_runs_the_actions_once_after_the_last() -> None:
    quiet = WhenQuiet(delay=0.1)
    ran: list[str] = []
    quiet.on_quiet(lambda: ran.append("release"))
    quiet.on_quiet(lambda: ran.append("trim"))
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert not quiet.busy()
    while loop.time() - began < 0.35:  # touches every 20 ms: over three delays' worth
        quiet.touch()
        await asyncio.sleep(0.02)
        assert ran == [] and quiet.busy()
    last = loop.time()
    await asyncio.sleep(0.4)
    assert ran == ["release", "trim"]  # once, in the order added
    assert not quiet.busy()  # settled: what waits for quiet may run
    quiet.touch()
    await asyncio.sleep(0.3)
    assert ran == ["release", "trim"] * 2  # the next burst runs them again
    assert last > began


async def test_nothing_runs_after_close() -> None:
    quiet = WhenQuiet(delay=0.05)
    ran: list[int] = []
    quiet.on_quiet(lambda: ran.append(1))
    quiet.touch()
    quiet.close()
    quiet.touch()
    await asyncio.sleep(0.2)
    assert ran == []


def test_a_synchronous_caller_arms_nothing() -> None:
    quiet = WhenQuiet(delay=0.01)
    quiet.on_quiet(lambda: None)
    quiet.touch()  # no running loop: nothing to wait for, and no error
