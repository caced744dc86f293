"""Canary releases through real Envoy sidecars: weighted split accuracy and a live shift."""

from __future__ import annotations

import asyncio
import collections
import time

import pytest

from meshctl.localmesh import http_session
from tests.e2e.conftest import Canary

pytestmark = pytest.mark.e2e
HOST = {"Host": "reviews:9080"}


async def test_canary_90_10_lands_within_3_points_over_2000_requests(canary: Canary) -> None:
    before = canary.mesh.pilot.store.revision
    canary.set_weights(90, 10)
    await canary.mesh.wait_applied(before)
    counts: collections.Counter[str] = collections.Counter()
    async with http_session() as session:
        for _ in range(2000):
            async with session.get(canary.outbound + "/", headers=HOST) as resp:
                assert resp.status == 200
                counts[(await resp.json())["version"]] += 1
    share = counts["v1"] / 2000
    assert abs(share - 0.90) <= 0.03, counts


async def test_shift_to_0_100_moves_all_traffic_within_a_second_without_failures(canary: Canary) -> None:
    failures: list[str] = []
    answers: list[tuple[float, str]] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        async with http_session() as session:
            while not stop.is_set():
                try:
                    async with session.get(canary.outbound + "/", headers=HOST) as resp:
                        body = await resp.json()
                        if resp.status != 200:
                            failures.append(f"{resp.status}: {body}")
                        else:
                            answers.append((time.monotonic(), body["version"]))
                except Exception as exc:
                    failures.append(repr(exc))

    task = asyncio.create_task(traffic())
    await asyncio.sleep(0.5)
    edited = time.monotonic()
    canary.set_weights(0, 100)
    await asyncio.sleep(2.0)
    stop.set()
    await task
    last_v1 = max((t for t, v in answers if v == "v1"), default=edited)
    after = [v for t, v in answers if t > edited + 1.0]
    assert failures == [], failures[:5]
    assert len(after) > 50 and set(after) == {"v2"}, collections.Counter(after)
    assert last_v1 - edited < 1.0, f"v1 still answered {last_v1 - edited:.2f}s after the edit"
