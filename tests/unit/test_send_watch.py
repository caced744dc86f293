"""The server-wide send timeout (`pilot.xds.sendwatch.SendWatch`): one timer for every write in
flight. A write that outlives the timeout is cancelled within timeout + tick and recognised as
expired; a write that completes in time, or a cancellation from elsewhere, is left alone."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pilot.xds.sendwatch import SendWatch


async def _write(watch: SendWatch, done: asyncio.Future[None]) -> str:
    """What `AdsServer._write` does around `context.write`: the outcome as a word."""
    task: Any = asyncio.current_task()
    watch.begin(task)
    try:
        await done
    except asyncio.CancelledError:
        if not watch.expired(task):
            raise
        return "timed out"
    finally:
        watch.end(task)
    return "written"


async def test_a_stuck_write_times_out_and_a_prompt_one_does_not() -> None:
    watch = SendWatch(0.2)
    loop = asyncio.get_running_loop()
    stuck, prompt = loop.create_future(), loop.create_future()
    began = time.monotonic()
    writes = [asyncio.create_task(_write(watch, stuck)), asyncio.create_task(_write(watch, prompt))]
    await asyncio.sleep(0.05)
    prompt.set_result(None)
    assert await writes[1] == "written"
    assert await writes[0] == "timed out"
    took = time.monotonic() - began
    assert 0.2 <= took <= 0.2 + watch.tick + 0.2, took
    assert not writes[0].cancelling()  # the cancellation was taken back: the writer closes its stream itself
    assert watch.writing == {}
    await asyncio.sleep(watch.tick * 2)
    assert watch._timer is None  # no writes in flight: no timer either


async def test_a_cancellation_from_elsewhere_is_not_a_timeout() -> None:
    watch = SendWatch(5.0)
    write = asyncio.create_task(_write(watch, asyncio.get_running_loop().create_future()))
    await asyncio.sleep(0.01)
    write.cancel()
    with pytest.raises(asyncio.CancelledError):
        await write
    assert watch.writing == {}
    watch.close()
