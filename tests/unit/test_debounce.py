"""The debounce (`pilot.debounce.settle`) against a real config store: which quiet time applies,
and that changes arriving while it waits are carried by the same push."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pilot.config.store import ConfigStore
from pilot.config.yaml_dir import load_dir
from pilot.debounce import settle

CANARY = Path(__file__).resolve().parents[2] / "examples" / "canary"


def _store() -> tuple[ConfigStore, list[Any]]:
    store = ConfigStore()
    objects = list(load_dir(CANARY).objects)
    store.replace_source("all", objects)
    return store, objects


def _only(objects: list[Any], kind: str) -> list[Any]:
    return [o for o in objects if o.key[0] == kind]


async def test_an_endpoint_move_takes_the_endpoint_quiet_time_and_a_rule_edit_the_full_one() -> None:
    store, objects = _store()
    built = store.revision
    entries = _only(objects, "WorkloadEntry")
    store.replace_source("all", [o for o in objects if o not in entries[:1]])
    # Quiet times far apart, and a bound longer than both: the flag tells which one ended the wait.
    revision, fast = await settle(store, built, built, quiet=30.0, endpoint_quiet=0.01, longest=60.0)
    assert (revision, fast) == (store.revision, True)

    built = store.revision
    rules = _only(objects, "VirtualService")
    store.replace_source("all", [o for o in objects if o not in rules])
    revision, fast = await asyncio.wait_for(
        settle(store, built, built, quiet=0.01, endpoint_quiet=30.0, longest=60.0), 10)
    assert (revision, fast) == (store.revision, False)


async def test_changes_during_the_wait_are_carried_and_the_wait_is_bounded() -> None:
    store, objects = _store()
    built = seen = store.revision
    store.replace_source("all", objects[1:])

    async def more() -> None:
        await asyncio.sleep(0.05)
        store.replace_source("all", objects[2:])

    task = asyncio.ensure_future(more())
    revision, fast = await settle(store, built, seen, quiet=0.5, endpoint_quiet=0.5, longest=30.0)
    await task
    assert revision == store.revision == built + 2 and not fast  # both changes, one push

    async def keep_changing(stop: asyncio.Event) -> None:
        while not stop.is_set():
            store.replace_source("all", objects[store.revision % 2:])
            await asyncio.sleep(0.01)

    stop = asyncio.Event()
    task = asyncio.ensure_future(keep_changing(stop))
    # Never quiet for 10 s: the bound ends the wait, with a revision of that stream of changes.
    built = store.revision
    revision, fast = await asyncio.wait_for(
        settle(store, built, built, quiet=10.0, endpoint_quiet=10.0, longest=0.2), 10)
    stop.set()
    await task
    assert built < revision <= store.revision and not fast


async def test_a_change_in_the_step_the_pusher_is_cancelled_does_not_keep_it_waiting() -> None:
    # The cancellation must win over a change that lands in the same loop step (Python 3.11's
    # asyncio.wait_for dropped it, and a pusher stopped right after a config change waited again).
    store, _ = _store()
    built = store.revision
    task = asyncio.create_task(settle(store, built, built, quiet=30.0, endpoint_quiet=30.0, longest=60.0))
    for _ in range(5):
        await asyncio.sleep(0)
    store.touch()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done == {task} and task.cancelled()
