from __future__ import annotations

import pytest

from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.xds.cache import SnapshotCache
from pilot.xds.snapshot import InconsistentSnapshotError, Serializer, Snapshot
from pilot.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.conformance.builders import cluster, endpoints, listener, route, snapshot

KEY = ProxyClass(ProxyKind.SIDECAR, "default")


def test_cluster_without_endpoints_is_refused_and_last_good_kept() -> None:
    cache = SnapshotCache()
    good = snapshot({"c1": 1})
    cache.set(KEY, good)
    broken = Snapshot.from_resources({CLUSTER: {"c1": cluster("c1"), "c2": cluster("c2")},
                                      ENDPOINT: {"c1": endpoints("c1", 1)}})
    with pytest.raises(InconsistentSnapshotError, match="EDS name 'c2' is referenced"):
        cache.set(KEY, broken)
    assert cache.get(KEY) is good


def test_listener_naming_a_missing_route_is_refused() -> None:
    snap = Snapshot.from_resources({LISTENER: {"l": listener("l", 1, "nowhere")}, ROUTE: {"r": route("r", "c")}})
    errors = snap.consistency_errors()
    assert "RDS name 'nowhere' is referenced but not in the snapshot" in errors
    assert "RDS resource 'r' is in the snapshot but nothing references it" in errors


def test_same_content_gives_same_versions() -> None:
    a, b = snapshot({"c1": 1, "c2": 2}, routes={"r1": "c1"}), snapshot({"c2": 2, "c1": 1}, routes={"r1": "c1"})
    assert all(a.version(t) == b.version(t) for t in (CLUSTER, ENDPOINT, LISTENER, ROUTE))
    assert snapshot({"c1": 1}).version(ENDPOINT) != snapshot({"c1": 2}).version(ENDPOINT)


def test_watchers_are_woken_on_change_only() -> None:
    cache = SnapshotCache()
    first = snapshot({"c1": 1})
    cache.set(KEY, first)
    woken: list[object] = []
    with cache.watch(KEY, lambda: woken.append(cache.get(KEY))):
        cache.set(KEY, snapshot({"c1": 1}))  # equal content: no wake-up
        assert woken == []
        second = snapshot({"c1": 2})
        cache.set(KEY, second)
        assert woken == [second]
    cache.set(KEY, snapshot({"c1": 3}))  # no longer watching
    assert woken == [second]


def test_demand_listener_fires_on_first_watcher_only() -> None:
    cache = SnapshotCache()
    demanded: list[ProxyClass] = []
    cache.on_demand(demanded.append)
    with cache.watch(KEY), cache.watch(KEY):
        assert cache.watched() == [KEY]
    assert demanded == [KEY] and cache.watched() == []


def test_a_message_shared_by_two_classes_is_serialized_once() -> None:
    shared = cluster("c1")
    memo = Serializer()
    a = Snapshot.from_resources({CLUSTER: {"c1": shared}, ENDPOINT: {"c1": endpoints("c1", 1)}}, memo)
    b = Snapshot.from_resources({CLUSTER: {"c1": shared}, ENDPOINT: {"c1": endpoints("c1", 1)}}, memo)
    assert a.of(CLUSTER).resources["c1"] is b.of(CLUSTER).resources["c1"]  # reused
    assert a.of(ENDPOINT).resources["c1"] is not b.of(ENDPOINT).resources["c1"]  # distinct objects
    assert a.versions() == b.versions()


def test_a_proxy_class_hashes_by_its_fields_once_and_pickles_without_the_cached_hash() -> None:
    import pickle

    from pilot.model.proxy import ProxyClass, ProxyKind

    a = ProxyClass(ProxyKind.SIDECAR, "ns", (("app", "x"),), "127.0.0.9", "w")
    b = ProxyClass(ProxyKind.SIDECAR, "ns", (("app", "x"),), "127.0.0.9", "w")
    other = ProxyClass(ProxyKind.SIDECAR, "ns", (("app", "y"),), "127.0.0.9", "w")
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert other != a and other not in {a}
    assert "_hash" not in pickle.loads(pickle.dumps(a)).__dict__  # another process hashes strings otherwise


def test_a_reconnecting_proxy_looks_its_class_up_by_the_object_the_cache_keys_it_by() -> None:
    """Each stream classifies its Node into a new ProxyClass. A proxy back before its class was let
    go watches the class under the cache's own object (lookups stop at the identity check, no
    field-by-field `__eq__`); once the class is dropped, the next newcomer's object becomes it."""
    from pilot.xds.cache import ClassWatch

    def fresh() -> ProxyClass:
        return ProxyClass(ProxyKind.SIDECAR, "default", (("app", "a"),))

    cache = SnapshotCache()
    first = fresh()
    demanded: list[ProxyClass] = []
    cache.on_demand(demanded.append)
    with ClassWatch(cache, first, lambda: None) as watch:
        assert watch.key is first and demanded[-1] is first
        cache.set(demanded[-1], snapshot({"c1": 1}))
    back = fresh()
    with ClassWatch(cache, back, lambda: None) as watch:  # the snapshot is still there
        assert watch.key is first and watch.key is not back
        assert demanded[-1] is first and cache.watched()[0] is first
    assert cache.drop_unwatched() == [first]
    later = fresh()
    with ClassWatch(cache, later, lambda: None) as watch:
        assert watch.key is later and demanded[-1] is later
    assert cache.canonical(fresh()) is not later  # no snapshot, no watcher: nothing kept for it
