"""The pusher: debounced rebuilds, the endpoint fast path, and last-good config on failure."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from pilot.config.store import ConfigStore
from pilot.config.yaml_dir import load_dir
from pilot.fastpath import RoutesFastPath
from pilot.metrics import PushMetrics
from pilot.model.build import build_mesh
from pilot.model.diff import http_routes_only
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.push import Pusher
from pilot.quiet import WhenQuiet
from pilot.translate import generate, generate_parts, generate_routes
from pilot.translate.prepare import prepare_shared
from pilot.xds.cache import SnapshotCache
from pilot.xds.typeurls import ENDPOINT, ROUTE

CANARY = Path(__file__).resolve().parents[2] / "examples" / "canary"
KEY = ProxyClass(ProxyKind.SIDECAR, "default", (("app", "x"),))


def _objects() -> list[Any]:
    return list(load_dir(CANARY).objects)


def _moved(objects: list[Any], kind: str) -> list[Any]:
    """The same config with one WorkloadEntry moved, or one VirtualService's weights swapped."""
    return [_changed(obj, kind) for obj in objects]


def _changed(obj: Any, kind: str) -> Any:
    if obj.key[0] == kind == "WorkloadEntry" and obj.key[2] == "reviews-v1":
        return obj.model_copy(update={"spec": obj.spec.model_copy(update={"address": "127.0.0.99"})})
    if obj.key[0] == kind == "VirtualService":
        route = obj.spec.http[0].route
        swapped = [d.model_copy(update={"weight": w.weight}) for d, w in zip(route, reversed(route), strict=True)]
        http = [obj.spec.http[0].model_copy(update={"route": swapped})]
        return obj.model_copy(update={"spec": obj.spec.model_copy(update={"http": http})})
    return obj


def test_store_reports_the_kinds_changed_since_a_revision() -> None:
    store = ConfigStore()
    objects = _objects()
    store.replace_source("f", objects)
    base = store.revision
    store.replace_source("f", _moved(objects, "WorkloadEntry"))
    assert store.kinds_changed_since(base) == frozenset({"WorkloadEntry"})
    assert store.kinds_changed_since(store.revision) == frozenset()
    store.touch()
    assert store.kinds_changed_since(base) is None  # a touch says nothing about kinds


@contextlib.asynccontextmanager
async def running(pusher: Pusher, objects: list[Any]) -> AsyncIterator[None]:
    """`pusher` running on `objects` (one store source) with KEY watched, after its first push."""
    pusher.store.replace_source("f", objects)
    with pusher.cache.watch(KEY):
        task = asyncio.create_task(pusher.run())
        try:
            await asyncio.wait_for(pusher.ready.wait(), 5)
            yield
        finally:
            task.cancel()


@pytest.mark.parametrize(
    ("kind", "fast", "changed_type"), [("WorkloadEntry", 1, ENDPOINT), ("VirtualService", 0, ROUTE)]
)
async def test_endpoint_only_changes_take_the_fast_path(kind: str, fast: int, changed_type: str) -> None:
    store, cache, registry = ConfigStore(), SnapshotCache(), CollectorRegistry()
    metrics = PushMetrics(registry)
    pusher = Pusher(store, cache, build_mesh, generate, metrics, debounce=0.2, endpoint_debounce=0.01)
    objects = _objects()
    async with running(pusher, objects):
        before = cache.get(KEY)
        assert before is not None
        revision = store.revision
        store.replace_source("f", _moved(objects, kind))
        await asyncio.wait_for(pusher.wait_built(revision + 1), 5)
    after = cache.get(KEY)
    assert after is not None and after.version(changed_type) != before.version(changed_type)
    assert metrics.endpoint_fast_pushes._value.get() == fast


async def test_a_failing_generator_keeps_the_last_good_snapshot() -> None:
    store, cache = ConfigStore(), SnapshotCache()
    calls = {"n": 0}

    def flaky(mesh: Any, proxy: ProxyClass) -> Any:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("boom")
        return generate(mesh, proxy)

    pusher = Pusher(store, cache, build_mesh, flaky, PushMetrics(CollectorRegistry()))
    store.replace_source("f", _objects())
    with cache.watch(KEY):
        pusher.rebuild()
        good = cache.get(KEY)
        store.replace_source("f", _moved(_objects(), "WorkloadEntry"))
        pusher.rebuild()
    assert cache.get(KEY) is good and "boom" in pusher.errors[KEY]


def test_mesh_warnings_are_logged_once_when_they_appear(caplog: pytest.LogCaptureFixture) -> None:
    store, cache = ConfigStore(), SnapshotCache()
    pusher = Pusher(store, cache, build_mesh, generate, PushMetrics(CollectorRegistry()))
    objects = _objects()
    store.replace_source("f", objects)
    pusher.rebuild()
    assert "mesh:" not in caplog.text
    dangling = [o for o in objects if o.key[0] != "DestinationRule"]  # the route's subsets now dangle
    store.replace_source("f", dangling)
    pusher.rebuild()
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mesh:")]
    assert logged and all("is not defined by a DestinationRule" in m for m in logged)
    store.replace_source("f", _moved(dangling, "WorkloadEntry"))
    pusher.rebuild()  # the same warnings again: not logged again
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("mesh:")] == logged


async def test_memory_is_released_once_after_a_burst_of_pushes() -> None:
    store, cache = ConfigStore(), SnapshotCache()
    released: list[int] = []
    pusher = Pusher(store, cache, build_mesh, generate, PushMetrics(CollectorRegistry()), debounce=0.01,
                    release_memory=lambda: released.append(store.revision))
    pusher.quiet.delay = 0.2
    objects = _objects()
    async with running(pusher, objects):
        for kind in ("WorkloadEntry", "VirtualService"):  # two pushes in quick succession
            revision = store.revision
            store.replace_source("f", _moved(objects, kind))
            await asyncio.wait_for(pusher.wait_built(revision + 1), 5)
        assert released == []  # not during the burst
        await asyncio.sleep(0.5)
    assert released == [store.revision]  # once, after the last push


async def test_memory_is_not_released_while_streams_still_take_responses() -> None:
    """The release after a push waits until the ADS server, sharing the pusher's `quiet`, stops
    reporting responses handed over and calls ended: publishing ends long before a large fan-out's
    writes do."""
    store, cache = ConfigStore(), SnapshotCache()
    released: list[int] = []
    quiet = WhenQuiet(delay=0.1)
    pusher = Pusher(store, cache, build_mesh, generate, PushMetrics(CollectorRegistry()), debounce=0.01,
                    release_memory=lambda: released.append(store.revision), quiet=quiet)
    objects = _objects()
    async with running(pusher, objects):
        revision = store.revision
        store.replace_source("f", _moved(objects, "VirtualService"))
        await asyncio.wait_for(pusher.wait_built(revision + 1), 5)
        for _ in range(8):  # streams keep writing for 0.4 s after the push was published
            quiet.touch(250)  # what the ADS server reports per batch of writes
            await asyncio.sleep(0.05)
        assert released == []
        await asyncio.sleep(0.4)
    assert released == [store.revision]  # once the writes stopped


async def test_the_mesh_is_built_while_a_change_settles_and_used_only_if_nothing_came_after() -> None:
    """The early build takes the build off a lone change's latency; a change arriving during the
    debounce makes it stale, and the push then carries that later change, not the early mesh."""
    store, cache = ConfigStore(), SnapshotCache()
    built_from: list[int] = []

    def counting_build(objects: Any) -> Any:
        built_from.append(len(objects))
        return build_mesh(objects)

    metrics = PushMetrics(CollectorRegistry())
    pusher = Pusher(store, cache, counting_build, generate, metrics, debounce=0.3, endpoint_debounce=0.3)
    objects = _objects()
    async with running(pusher, objects):
        start = cache.get(KEY)
        assert start is not None

        # A lone change: built once, during the debounce, and that build is the one published.
        revision = store.revision
        builds = len(built_from)
        store.replace_source("f", _moved(objects, "VirtualService"))
        await asyncio.sleep(0.15)  # still settling: the build has already run
        assert len(built_from) == builds + 1 and pusher.built_revision < revision + 1
        await asyncio.wait_for(pusher.wait_built(revision + 1), 5)
        assert len(built_from) == builds + 1 and metrics.early_builds._value.get() == 1
        lone = cache.get(KEY)
        assert lone is not None and lone.version(ROUTE) != start.version(ROUTE)

        # A second change during the debounce: the early build is stale, the push has both changes.
        revision = store.revision
        store.replace_source("f", _moved(_moved(objects, "VirtualService"), "WorkloadEntry"))
        await asyncio.sleep(0.1)
        store.replace_source("f", objects)  # back to the start
        await asyncio.wait_for(pusher.wait_built(revision + 2), 5)
    final = cache.get(KEY)
    assert metrics.early_builds._value.get() == 1  # the stale early build was not used
    assert final is not None and final.version(ROUTE) == start.version(ROUTE)
    assert final.version(ENDPOINT) == start.version(ENDPOINT)


async def test_a_class_whose_proxies_all_left_is_forgotten_a_moment_later() -> None:
    """Snapshots of classes nobody watches any more go with the next release (not at the next
    push, which may never come), and freed memory is handed back."""
    store, cache = ConfigStore(), SnapshotCache()
    released: list[int] = []
    pusher = Pusher(store, cache, build_mesh, generate_parts, PushMetrics(CollectorRegistry()),
                    release_memory=lambda: released.append(1), routes=RoutesFastPath(http_routes_only, generate_routes))
    pusher.quiet.delay = 0.1
    store.replace_source("f", _objects())
    pusher.rebuild()
    other = ProxyClass(ProxyKind.SIDECAR, "default", (("app", "y"),))
    with cache.watch(other):
        with cache.watch(KEY):
            assert cache.get(KEY) is not None  # published on demand
            assert KEY in pusher.route_parts and KEY in pusher.class_changes
        await asyncio.sleep(0.3)
        assert cache.get(KEY) is None and released  # its last stream left: forgotten, memory released
        # What the pusher kept for it goes too: a returning proxy's class is keyed by its own object.
        assert KEY not in pusher.route_parts and KEY not in pusher.eds_parts and KEY not in pusher.class_changes
        assert cache.get(other) is not None and other in pusher.class_changes  # still watched: kept
        again = ProxyClass(KEY.kind, KEY.namespace, KEY.labels)
        with cache.watch(again):
            assert next(k for k in pusher.route_parts if k == KEY) is again


async def test_a_route_edit_has_its_first_route_part_made_while_it_settles() -> None:
    """The route fast path's first group gets its new route part during the debounce (from the
    early mesh), and the push publishes that very part: it is off the change's latency."""
    store, cache = ConfigStore(), SnapshotCache()
    made: list[tuple[int, Any]] = []  # (pusher.built_revision when made, the part)

    def recording_routes(mesh: Any, proxy: ProxyClass) -> Any:
        part = generate_routes(mesh, proxy)
        made.append((pusher.built_revision, part))
        return part

    metrics = PushMetrics(CollectorRegistry())
    pusher = Pusher(store, cache, build_mesh, generate_parts, metrics, debounce=0.3,
                    routes=RoutesFastPath(http_routes_only, recording_routes))
    objects = _objects()
    async with running(pusher, objects):
        before = cache.get(KEY)
        assert before is not None and KEY in pusher.route_parts

        revision = store.revision
        store.replace_source("f", _moved(objects, "VirtualService"))
        await asyncio.sleep(0.2)  # still settling
        assert pusher.built_revision == revision and len(made) == 1  # made before the push
        await asyncio.wait_for(pusher.wait_built(revision + 1), 5)
    after = cache.get(KEY)
    assert after is not None and after.version(ROUTE) != before.version(ROUTE)
    assert metrics.route_only_pushes._value.get() == 1
    assert pusher.route_parts[KEY] is made[0][1]  # the push published the part made while settling
    assert all(part is made[0][1] for _, part in made)  # asked again while publishing: the same part


@pytest.mark.parametrize("connected", [True, False])
async def test_a_full_push_makes_what_classes_share_in_its_build_thread(
    connected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first class of a view pays for what its view shares (~0.5 s at 1,000 services, the
    outbound route configuration's skeleton among it). A full push makes that with the mesh, in its
    build thread, for one class of each view connected (or, with none yet, a sidecar of the first
    workload), so publishing on the event loop finds it made: the view's outbound clusters are made
    once per push, never on the loop's thread, for classes published by the push or connecting after
    it."""
    made_on_loop: list[bool] = []
    generate_module = importlib.import_module("pilot.translate.generate")  # the package exports its function
    real = generate_module.outbound_clusters

    def recording(*args: Any) -> Any:
        made_on_loop.append(threading.current_thread() is threading.main_thread())
        return real(*args)

    monkeypatch.setattr(generate_module, "outbound_clusters", recording)
    store, cache = ConfigStore(), SnapshotCache()
    pusher = Pusher(store, cache, build_mesh, generate_parts, PushMetrics(CollectorRegistry()),
                    routes=RoutesFastPath(http_routes_only, generate_routes), prepare=prepare_shared)
    store.replace_source("f", _objects())
    later = ProxyClass(ProxyKind.SIDECAR, "default", (("app", "reviews"), ("version", "v1")))
    with contextlib.ExitStack() as watching:
        if connected:
            watching.enter_context(cache.watch(KEY))
        task = asyncio.create_task(pusher.run())
        try:
            await asyncio.wait_for(pusher.ready.wait(), 5)
            watching.enter_context(cache.watch(later))  # a proxy connecting after the push
            assert cache.get(later) is not None and (not connected or cache.get(KEY) is not None)
            revision = store.revision
            store.touch()  # a full push with both connected
            await asyncio.wait_for(pusher.wait_built(revision + 1), 5)
        finally:
            task.cancel()
    assert made_on_loop == [False, False], made_on_loop  # once per full push, in the build thread
