"""State-of-the-world ADS: one test per protocol rule, over real gRPC."""

from __future__ import annotations

import asyncio

from pilot.testing.ads_client import resource_names
from pilot.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.conformance.builders import snapshot
from tests.conformance.conftest import Harness


async def test_every_response_carries_a_fresh_nonce(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1}))
    async with ads.client() as c:
        c.send(CLUSTER)
        c.send(LISTENER)
        got = [await c.recv(), await c.recv()]
        ads.publish(snapshot({"c1": 2}))
        c.ack(got[0])
        c.ack(got[1])
        c.send(ENDPOINT, ["c1"])
        got += [await c.recv()]
        nonces = [r.nonce for r in got]
        assert all(nonces) and len(set(nonces)) == len(nonces)


async def test_request_with_stale_nonce_is_not_answered(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1}))
    async with ads.client() as c:
        c.send(ENDPOINT, ["c1"])
        first = await c.recv()
        ads.publish(snapshot({"c1": 2}))
        second = await c.recv()
        assert second.nonce != first.nonce
        # A request that still names the first nonce, asking for a new name: stale, ignored.
        c.send(ENDPOINT, ["c1", "c9"], nonce=first.nonce, version=first.version_info)
        await c.expect_silence()
        assert ads.status.metrics.stale_requests.labels("EDS")._value.get() == 1


async def test_ack_and_nack_are_told_apart_by_error_detail(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1}))
    async with ads.client() as c:
        c.send(CLUSTER)
        good = await c.recv()
        c.ack(good)
        await asyncio.sleep(0.1)
        assert ads.status_of("CDS")["state"] == "SYNCED"
        assert ads.status_of("CDS")["acked_version"] == good.version_info
        ads.publish(snapshot({"c1": 1, "bad": 2}))
        bad = await c.recv()
        c.send(CLUSTER, nonce=bad.nonce, version=good.version_info, error="cluster bad: invalid")
        await asyncio.sleep(0.1)
        st = ads.status_of("CDS")
        assert st["state"] == "NACKED"
        assert st["nack"] == "cluster bad: invalid"
        assert st["acked_version"] == good.version_info  # the last good config is what serves


async def test_after_nack_nothing_is_resent_until_config_changes(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1}))
    async with ads.client() as c:
        c.send(CLUSTER)
        bad = await c.recv()
        c.send(CLUSTER, nonce=bad.nonce, error="rejected")
        await c.expect_silence()
        assert ads.status.metrics.nacks.labels("CDS")._value.get() == 1
        ads.publish(snapshot({"c2": 1}))
        fixed = await c.recv()
        # The proxy rejected its only response, so it never held c1: nothing to phase out.
        assert resource_names(fixed) == ["c2"]
        c.ack(fixed)
        await c.expect_silence()
        assert ads.status_of("CDS")["nack"] == ""
        assert ads.status_of("CDS")["state"] == "SYNCED"


async def test_unchanged_snapshot_is_not_resent(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1}))
    async with ads.client() as c:
        c.send(CLUSTER)
        c.ack(await c.recv())
        ads.publish(snapshot({"c1": 1}))  # same content, new object
        await c.expect_silence()


async def test_versions_are_per_type(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1, "c2": 1}, routes={"r1": "c1"}))
    async with ads.client() as c:
        c.send(CLUSTER)
        cds = await c.recv()
        c.send(LISTENER)
        lds = await c.recv()
        c.send(ROUTE, ["r1"])
        rds = await c.recv()
        for r in (cds, lds, rds):
            c.ack(r)
        ads.publish(snapshot({"c1": 1, "c2": 1}, routes={"r1": "c2"}))  # only the route changes
        changed = await c.recv()
        assert changed.type_url == ROUTE and changed.version_info != rds.version_info
        await c.expect_silence()


async def test_eds_sends_only_changed_resources(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1, "c2": 1}))
    async with ads.client() as c:
        c.send(ENDPOINT, ["c1", "c2"])
        first = await c.recv()
        assert sorted(resource_names(first)) == ["c1", "c2"]
        c.ack(first)
        ads.publish(snapshot({"c1": 1, "c2": 7}))
        second = await c.recv()
        assert resource_names(second) == ["c2"]


async def test_newly_subscribed_names_are_sent_even_if_unchanged(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1, "c2": 1}))
    async with ads.client() as c:
        c.send(ENDPOINT, ["c1"])
        first = await c.recv()
        assert resource_names(first) == ["c1"]
        c.send(ENDPOINT, ["c1", "c2"], nonce=first.nonce, version=first.version_info)
        second = await c.recv()
        assert resource_names(second) == ["c2"]
        # Unsubscribe and subscribe again: the proxy dropped it, so it is sent again.
        c.send(ENDPOINT, ["c1"], nonce=second.nonce, version=second.version_info)
        await c.expect_silence()
        c.send(ENDPOINT, ["c1", "c2"], nonce=second.nonce, version=second.version_info)
        assert resource_names(await c.recv()) == ["c2"]


async def test_names_that_do_not_exist_yet_are_sent_when_they_appear(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1}))
    async with ads.client() as c:
        c.send(ENDPOINT, ["c1", "later"])
        assert resource_names(await c.recv()) == ["c1"]
        ads.publish(snapshot({"c1": 1, "later": 5}))
        assert resource_names(await c.recv()) == ["later"]


async def test_wildcard_lds_and_cds(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1, "c2": 1}, routes={"r1": "c1", "r2": "c2"}))
    async with ads.client() as c:
        c.send(CLUSTER)  # empty names: wildcard
        assert resource_names(await c.recv()) == ["c1", "c2"]
        c.send(LISTENER, ["*"])  # explicit wildcard
        assert resource_names(await c.recv()) == ["l_r1", "l_r2"]


async def test_push_order_is_cds_eds_lds_rds_and_routes_wait_for_new_clusters_endpoints(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1}))
    async with ads.client() as c:
        c.send(ROUTE, ["r1"])
        c.send(LISTENER)
        c.send(ENDPOINT, ["c1"])
        c.send(CLUSTER)
        initial = [await c.recv() for _ in range(4)]
        for r in initial:
            c.ack(r)
        await asyncio.sleep(0.1)
        # c1's endpoint moves, c3 is new, listener l_r2 is new, route r1 points at c3.
        ads.publish(snapshot({"c1": 2, "c3": 3}, routes={"r1": "c3", "r2": "c1"}))
        cds, eds = await c.recv(), await c.recv()
        assert [cds.type_url, eds.type_url] == [CLUSTER, ENDPOINT]
        c.ack(cds)
        c.ack(eds)
        # Listeners and routes wait until the proxy asked for the new cluster's endpoints (as Envoy
        # does while c3 warms): a route to c3 before its endpoints would be a 503 (no cluster).
        await c.expect_silence()
        c.send(ENDPOINT, ["c1", "c3"], nonce=eds.nonce)
        order = [(await c.recv()).type_url for _ in range(3)]
        assert order == [ENDPOINT, LISTENER, ROUTE]


async def test_removals_wait_until_updates_are_acknowledged(ads: Harness) -> None:
    ads.publish(snapshot({"old": 1}, routes={"r1": "old"}))
    async with ads.client() as c:
        c.send(CLUSTER)
        c.send(ROUTE, ["r1"])
        for _ in range(2):
            c.ack(await c.recv())
        await asyncio.sleep(0.1)
        ads.publish(snapshot({"new": 1}, routes={"r1": "new"}))
        cds = await c.recv()
        assert resource_names(cds) == ["new", "old"]  # make: the old cluster stays for now
        rds = await c.recv()
        assert rds.type_url == ROUTE
        await c.expect_silence()  # nothing removed while the route change is unacknowledged
        c.ack(cds)
        c.ack(rds)
        removal = await c.recv()
        assert removal.type_url == CLUSTER and resource_names(removal) == ["new"]  # break


async def test_proxy_status_reports_identity_and_versions(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1}))
    async with ads.client() as c:
        c.send(CLUSTER)
        r = await c.recv()
        c.ack(r)
        await asyncio.sleep(0.1)
        row = ads.status.syncz()[0]
        assert row["proxy"] == ads.node.id
        assert row["namespace"] == "default" and row["workload"] == "app"
        assert row["labels"] == {"app": "a"}
        assert row["types"]["CDS"]["sent_nonce"] == r.nonce
        assert row["types"]["CDS"]["acked_version"] == r.version_info == row["types"]["CDS"]["current_version"]
        assert 0 < row["types"]["CDS"]["sent_at"] <= row["types"]["CDS"]["acked_at"]


async def test_a_client_that_vanishes_is_forgotten_and_others_keep_being_served(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1}))
    c1 = ads.client()
    await c1.__aenter__()
    c1.send(CLUSTER)
    await c1.recv()
    await c1.close()  # gone mid-stream without ACKing
    async with ads.client() as c2:
        c2.send(CLUSTER)
        assert resource_names(await c2.recv()) == ["c1"]
        for _ in range(50):
            if len(ads.status.streams()) == 1:
                break
            await asyncio.sleep(0.02)
        assert len(ads.status.streams()) == 1


async def test_a_burst_of_requests_is_all_processed(ads: Harness) -> None:
    """Forty requests sent without waiting: each is applied, and the answers cover them all."""
    ads.publish(snapshot({f"c{i}": i + 1 for i in range(40)}))
    async with ads.client() as c:
        c.send(ENDPOINT, ["c0"])
        last = await c.recv()
        for i in range(1, 40):  # grow the subscription one name per fresh request (no nonce)
            c.send(ENDPOINT, [f"c{j}" for j in range(i + 1)])
        seen = set(resource_names(last))
        while len(seen) < 40:
            r = await c.recv()
            seen |= set(resource_names(r))
            last = r
        assert len(seen) == 40


async def test_a_node_without_namespace_is_refused_with_a_reason(ads: Harness) -> None:
    from envoy.config.core.v3 import base_pb2

    async with ads.client(node=base_pb2.Node(id="nobody")) as c:
        c.send(CLUSTER)
        try:
            await c.recv()
        except Exception as exc:  # grpc.aio.AioRpcError
            assert "namespace" in str(exc)
        else:
            raise AssertionError("stream was not refused")


async def test_after_a_nack_the_next_change_resends_what_the_proxy_rejected(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1, "c2": 1}))
    async with ads.client() as c:
        c.send(ENDPOINT, ["c1", "c2"])
        c.ack(await c.recv())
        ads.publish(snapshot({"c1": 2, "c2": 2}))
        rejected = await c.recv()
        assert sorted(resource_names(rejected)) == ["c1", "c2"]
        c.send(ENDPOINT, ["c1", "c2"], nonce=rejected.nonce, error="c2: bad endpoint")
        await c.expect_silence()
        # c2 is fixed; c1 is unchanged since the rejected response, but the proxy never applied it.
        ads.publish(snapshot({"c1": 2, "c2": 3}))
        assert sorted(resource_names(await c.recv())) == ["c1", "c2"]


async def test_a_changed_cluster_gets_its_endpoints_again(ads: Harness) -> None:
    """Envoy warms an updated cluster until EDS arrives for it, even if the endpoints did not change."""
    ads.publish(snapshot({"c1": 1, "c2": 1}))
    async with ads.client() as c:
        c.send(CLUSTER)
        c.ack(await c.recv())
        c.send(ENDPOINT, ["c1", "c2"])
        c.ack(await c.recv())
        ads.publish(snapshot({"c1": 1, "c2": 1}, timeouts={"c1": 5}))  # c1's cluster changes, not its endpoints
        cds = await c.recv()
        assert cds.type_url == CLUSTER
        eds = await c.recv()
        assert eds.type_url == ENDPOINT and resource_names(eds) == ["c1"]


async def test_a_type_pilot_does_not_serve_is_ignored_and_the_stream_keeps_working(ads: Harness) -> None:
    ads.publish(snapshot({"c1": 1}))
    async with ads.client() as c:
        c.send("type.googleapis.com/envoy.service.runtime.v3.Runtime", ["rtds"])
        c.send("type.googleapis.com/not.a.Type")
        await c.expect_silence()
        c.send(CLUSTER)
        assert resource_names(await c.recv()) == ["c1"]


async def test_an_unsubscribe_needs_no_response_and_leaves_the_proxy_synced(ads: Harness) -> None:
    """A removed cluster takes its endpoints along: the proxy holds the rest, in sync, with no response."""
    ads.publish(snapshot({"c1": 1, "c2": 1}))
    async with ads.client() as c:
        c.send(ENDPOINT, ["c1", "c2"])
        first = await c.recv()
        c.ack(first)
        await c.expect_silence()
        ads.publish(snapshot({"c1": 1}))  # c2 is gone from the config
        c.send(ENDPOINT, ["c1"], nonce=first.nonce, version=first.version_info)
        await c.expect_silence()
        assert ads.status_of("EDS")["state"] == "SYNCED"


async def test_a_named_cds_subscription_gets_the_whole_subscribed_set_and_removals(ads: Harness) -> None:
    """LDS/CDS responses carry every subscribed resource, named or wildcard: a left-out one is removed."""
    ads.publish(snapshot({"c1": 1, "c2": 1, "c3": 1}))
    async with ads.client() as c:
        c.send(CLUSTER, ["c1", "c2"])
        first = await c.recv()
        assert resource_names(first) == ["c1", "c2"]
        c.ack(first)
        ads.publish(snapshot({"c1": 1, "c2": 1, "c3": 1}, timeouts={"c2": 7}))  # only c2 changes
        second = await c.recv()
        assert resource_names(second) == ["c1", "c2"]  # c1 too: leaving it out would remove it
        c.ack(second)
        ads.publish(snapshot({"c1": 1, "c3": 1}, timeouts={"c2": 7}))  # c2 goes away
        third = await c.recv()
        assert resource_names(third) == ["c1"]
        c.ack(third)
        await c.expect_silence()
        assert ads.status_of("CDS")["state"] == "SYNCED"
