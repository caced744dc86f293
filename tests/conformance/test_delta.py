"""Delta (incremental) ADS: one test per protocol rule, over real gRPC."""

from __future__ import annotations

import asyncio

from pilot.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.conformance.builders import snapshot
from tests.conformance.conftest import Harness


def names(response: object) -> list[str]:
    return [r.name for r in response.resources]  # type: ignore[attr-defined]


async def test_wildcard_subscription_gets_everything_with_versions(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1, "c2": 1}))
    async with ads.client(delta=True) as c:
        c.send_delta(CLUSTER)
        r = await c.recv()
        assert names(r) == ["c1", "c2"]
        assert all(res.version for res in r.resources) and r.nonce
        assert r.system_version_info == ads.cache.get(ads.key).version(CLUSTER)  # type: ignore[union-attr]


async def test_only_changed_resources_are_sent(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1, "c2": 1}))
    async with ads.client(delta=True) as c:
        c.send_delta(ENDPOINT, subscribe=["c1", "c2"])
        c.send_delta(ENDPOINT, nonce=(await c.recv()).nonce)
        ads.publish(snapshot({"c1": 1, "c2": 9}))
        r = await c.recv()
        assert names(r) == ["c2"] and not r.removed_resources


async def test_removed_resources_name_what_disappeared(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1, "c2": 1}))
    async with ads.client(delta=True) as c:
        c.send_delta(CLUSTER)
        c.send_delta(CLUSTER, nonce=(await c.recv()).nonce)
        ads.publish(snapshot({"c1": 1}))
        r = await c.recv()
        assert list(r.removed_resources) == ["c2"] and not r.resources


async def test_removals_wait_for_acks_of_updates(ads: Harness) -> None:
    ads.publish(snapshot({"old": 1}, routes={"r1": "old"}))
    async with ads.client(delta=True) as c:
        c.send_delta(CLUSTER)
        c.send_delta(ROUTE, subscribe=["r1"])
        first = [await c.recv(), await c.recv()]
        for r in first:
            c.send_delta(r.type_url, nonce=r.nonce)
        await asyncio.sleep(0.1)
        ads.publish(snapshot({"new": 1}, routes={"r1": "new"}))
        cds = await c.recv()
        assert names(cds) == ["new"] and not cds.removed_resources
        rds = await c.recv()
        assert rds.type_url == ROUTE
        await c.expect_silence()
        c.send_delta(CLUSTER, nonce=cds.nonce)
        c.send_delta(ROUTE, nonce=rds.nonce)
        removal = await c.recv()
        assert removal.type_url == CLUSTER and list(removal.removed_resources) == ["old"]


async def test_subscribe_and_unsubscribe(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1, "c2": 1, "c3": 1}))
    async with ads.client(delta=True) as c:
        c.send_delta(ENDPOINT, subscribe=["c1"])
        r = await c.recv()
        assert names(r) == ["c1"]
        c.send_delta(ENDPOINT, subscribe=["c2"], nonce=r.nonce)
        r = await c.recv()
        assert names(r) == ["c2"]  # c1 unchanged: not resent
        c.send_delta(ENDPOINT, unsubscribe=["c1"], nonce=r.nonce)
        await c.expect_silence()
        ads.publish(snapshot({"c1": 5, "c2": 1, "c3": 1}))
        await c.expect_silence()  # c1 changed but is no longer subscribed
        c.send_delta(ENDPOINT, subscribe=["c1"])
        assert names(await c.recv()) == ["c1"]


async def test_subscribed_name_that_does_not_exist_is_reported_removed_then_sent_when_it_appears(
    ads: Harness,
) -> None:
    ads.publish(snapshot({"c1": 1}))
    async with ads.client(delta=True) as c:
        c.send_delta(ENDPOINT, subscribe=["ghost"])
        r = await c.recv()
        assert list(r.removed_resources) == ["ghost"] and not r.resources
        c.send_delta(ENDPOINT, nonce=r.nonce)
        ads.publish(snapshot({"c1": 1, "ghost": 3}))
        assert names(await c.recv()) == ["ghost"]


async def test_initial_resource_versions_on_reconnect(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1, "c2": 1, "c3": 1}))
    wanted = ["c1", "c2", "c3", "c4"]
    async with ads.client(delta=True) as c:
        c.send_delta(ENDPOINT, subscribe=wanted)
        held = {res.name: res.version for res in (await c.recv()).resources}
    assert sorted(held) == ["c1", "c2", "c3"]
    ads.publish(snapshot({"c1": 1, "c2": 4, "c4": 1}))  # c2 changed, c3 gone, c4 new
    async with ads.client(delta=True) as c:
        c.send_delta(ENDPOINT, subscribe=wanted, initial_versions=held)
        r = await c.recv()
        assert names(r) == ["c2", "c4"]  # c1 is unchanged: not resent
        c.send_delta(ENDPOINT, nonce=r.nonce)
        assert list((await c.recv()).removed_resources) == ["c3"]


async def test_a_proxy_back_holding_exactly_the_current_resources_gets_nothing_and_is_synced(
    ads: Harness,
) -> None:
    """As after a pilot restart or a failover with unchanged config: nothing is resent, and
    `proxy-status` shows the proxy in sync, not waiting for a first response."""
    ads.publish(snapshot({"c1": 1, "c2": 1}))
    async with ads.client(delta=True) as c:
        c.send_delta(CLUSTER)
        held = {res.name: res.version for res in (await c.recv()).resources}
    async with ads.client(delta=True) as c:
        c.send_delta(CLUSTER, initial_versions=held)
        await c.expect_silence()
        assert ads.status_of("CDS")["state"] == "SYNCED"
        ads.publish(snapshot({"c1": 1, "c2": 1}, timeouts={"c2": 5}))
        r = await c.recv()
        assert names(r) == ["c2"]
        c.send_delta(CLUSTER, nonce=r.nonce)
        await asyncio.sleep(0.1)
        assert ads.status_of("CDS")["state"] == "SYNCED"


async def test_nack_is_recorded_and_nothing_resent(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1}))
    async with ads.client(delta=True) as c:
        c.send_delta(LISTENER)
        r = await c.recv()
        c.send_delta(LISTENER, nonce=r.nonce, error="listener l_r1: bad port")
        await c.expect_silence()
        st = ads.status_of("LDS")
        assert st["state"] == "NACKED" and st["nack"] == "listener l_r1: bad port"


async def test_ack_marks_synced(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1}))
    async with ads.client(delta=True) as c:
        c.send_delta(CLUSTER)
        c.send_delta(CLUSTER, nonce=(await c.recv()).nonce)
        await asyncio.sleep(0.1)
        assert ads.status_of("CDS")["state"] == "SYNCED"
        assert ads.status.syncz()[0]["protocol"] == "delta"


async def test_after_a_nack_the_next_change_resends_what_the_proxy_rejected(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1, "c2": 1}))
    async with ads.client(delta=True) as c:
        c.send_delta(ENDPOINT, subscribe=["c1", "c2"])
        c.send_delta(ENDPOINT, nonce=(await c.recv()).nonce)
        ads.publish(snapshot({"c1": 2, "c2": 2}))
        rejected = await c.recv()
        assert names(rejected) == ["c1", "c2"]
        c.send_delta(ENDPOINT, nonce=rejected.nonce, error="c2: bad endpoint")
        await c.expect_silence()
        ads.publish(snapshot({"c1": 2, "c2": 3}))
        assert names(await c.recv()) == ["c1", "c2"]


async def test_a_changed_cluster_gets_its_endpoints_again(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1, "c2": 1}))
    async with ads.client(delta=True) as c:
        c.send_delta(CLUSTER)
        c.send_delta(CLUSTER, nonce=(await c.recv()).nonce)
        c.send_delta(ENDPOINT, subscribe=["c1", "c2"])
        c.send_delta(ENDPOINT, nonce=(await c.recv()).nonce)
        ads.publish(snapshot({"c1": 1, "c2": 1}, timeouts={"c1": 5}))
        cds = await c.recv()
        assert cds.type_url == CLUSTER and names(cds) == ["c1"]
        eds = await c.recv()
        assert eds.type_url == ENDPOINT and names(eds) == ["c1"]


async def test_an_unsubscribe_needs_no_response_and_leaves_the_proxy_synced(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1, "c2": 1}))
    async with ads.client(delta=True) as c:
        c.send_delta(ENDPOINT, subscribe=["c1", "c2"])
        r = await c.recv()
        c.ack(r)
        await c.expect_silence()
        c.send_delta(ENDPOINT, unsubscribe=["c2"])  # c2 still exists; the proxy no longer wants it
        await c.expect_silence()
        assert ads.status_of("EDS")["state"] == "SYNCED"
