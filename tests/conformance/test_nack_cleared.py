"""A NACK clears once the rejected change is undone (issue 8: "NACKED forever although acked equals current").

The proxy ACKed version A, NACKed B; the config goes back to A. Pilot sends nothing (the proxy holds
A already), so no ACK will ever come: the status must say SYNCED on its own, while the NACK stays
counted in metrics and in the row's history (`nacks`, `last_nack`). Over real gRPC, both protocols.
"""

from __future__ import annotations

import asyncio

from pilot.testing.ads_client import resource_names
from pilot.xds.typeurls import CLUSTER, ROUTE
from tests.conformance.builders import snapshot
from tests.conformance.conftest import Harness

GOOD = snapshot({"c1": 1, "c2": 1}, routes={"r1": "c1"})
BAD = snapshot({"c1": 1, "c2": 1}, routes={"r1": "c2"})  # r1 changes: the change a proxy rejects


def _nack_count(ads: Harness, short: str) -> float:
    value: float = ads.status.metrics.nacks.labels(short)._value.get()
    return value


async def test_sotw_nack_clears_when_the_rejected_route_change_is_undone(ads: Harness) -> None:
    ads.publish(GOOD)
    async with ads.client() as c:
        c.send(ROUTE, ["r1"])
        good = await c.recv()
        c.ack(good)
        await c.expect_silence()
        ads.publish(BAD)
        bad = await c.recv()
        c.send(ROUTE, ["r1"], nonce=bad.nonce, version=good.version_info, error="route r1: invalid regex")
        await c.expect_silence()
        assert ads.status_of("RDS")["state"] == "NACKED"
        ads.publish(GOOD)  # the bad VirtualService is removed again
        await c.expect_silence()  # the proxy already holds this version: nothing to send
        st = ads.status_of("RDS")
        assert st["state"] == "SYNCED", st
        assert st["acked_version"] == st["current_version"] == good.version_info
        assert st["nack"] == ""
        assert st["nacks"] == 1 and st["last_nack"] == "route r1: invalid regex"
        assert _nack_count(ads, "RDS") == 1


async def test_sotw_nack_stays_while_the_config_is_still_not_what_the_proxy_holds(ads: Harness) -> None:
    ads.publish(GOOD)
    async with ads.client() as c:
        c.send(ROUTE, ["r1"])
        good = await c.recv()
        c.ack(good)
        await c.expect_silence()
        ads.publish(BAD)
        bad = await c.recv()
        c.send(ROUTE, ["r1"], nonce=bad.nonce, version=good.version_info, error="route r1: invalid regex")
        await c.expect_silence()
        # Another change elsewhere (a new cluster) leaves RDS at the rejected version.
        ads.publish(snapshot({"c1": 1, "c2": 1, "c3": 1}, routes={"r1": "c2"}))
        await c.expect_silence()
        assert ads.status_of("RDS")["state"] == "NACKED"
        assert ads.status_of("RDS")["nack"] == "route r1: invalid regex"


async def test_sotw_after_an_undone_nack_the_next_change_is_sent_and_tracked(ads: Harness) -> None:
    ads.publish(GOOD)
    async with ads.client() as c:
        c.send(CLUSTER)
        good = await c.recv()
        c.ack(good)
        await c.expect_silence()
        ads.publish(snapshot({"c1": 1, "c2": 1, "bad": 1}, routes={"r1": "c1"}))
        bad = await c.recv()
        c.send(CLUSTER, nonce=bad.nonce, version=good.version_info, error="cluster bad: invalid")
        await c.expect_silence()
        ads.publish(GOOD)
        await c.expect_silence()
        assert ads.status_of("CDS")["state"] == "SYNCED"
        ads.publish(snapshot({"c1": 1, "c2": 1, "c9": 1}, routes={"r1": "c1"}))
        new = await c.recv()
        assert sorted(resource_names(new)) == ["c1", "c2", "c9"]
        assert ads.status_of("CDS")["state"] == "STALE"  # sent, not yet acknowledged; no old NACK shown
        c.ack(new)
        await asyncio.sleep(0.1)
        assert ads.status_of("CDS")["state"] == "SYNCED"
        assert _nack_count(ads, "CDS") == 1


async def test_delta_nack_clears_when_the_rejected_route_change_is_undone(ads: Harness) -> None:
    ads.publish(GOOD)
    async with ads.client(delta=True) as c:
        c.send_delta(ROUTE, subscribe=["r1"])
        good = await c.recv()
        c.send_delta(ROUTE, nonce=good.nonce)
        await c.expect_silence()
        ads.publish(BAD)
        bad = await c.recv()
        c.send_delta(ROUTE, nonce=bad.nonce, error="route r1: invalid regex")
        await c.expect_silence()
        assert ads.status_of("RDS")["state"] == "NACKED"
        ads.publish(GOOD)
        await c.expect_silence()
        st = ads.status_of("RDS")
        assert st["state"] == "SYNCED", st
        assert st["nacks"] == 1 and st["last_nack"] == "route r1: invalid regex"
        assert _nack_count(ads, "RDS") == 1
