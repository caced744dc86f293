"""From config changes to published snapshots: debounce, build the mesh, generate, publish.

Concurrency: one pusher task per pilot. It waits on the store's change event, lets changes
settle (debounce, bounded by a maximum delay), builds one MeshSnapshot and regenerates the
snapshot of every class that has a connected proxy. Publishing yields to the event loop
every `slice` seconds (default 10 ms), so streams write the snapshots already published, ACKs
are read and new proxies are served while thousands of classes are still being regenerated.
A class seen for the first time is generated immediately from the current mesh (cache demand
callback). A generator failure for one class is logged and counted; that class keeps its last
good snapshot.

Cost: generators return each type as parts, shared parts being the same objects for every
class (see `pilot.translate.generate.generate_parts`), and the `Serializer` serializes each
part once per mesh version and each message once while it lives. A class's publication then
costs its own few resources plus references; its CPU time (no socket writes) is recorded in
`pilot_class_publish_cpu_seconds`.

Fast paths: when the new mesh differs only in endpoints (`endpoints_only`) or only in HTTP-only
VirtualServices (`RoutesFastPath`), no class is generated in full. Each keeps its snapshot with one
type replaced, and classes that shared a part at their last generation share its next version:
one `generate_endpoints` / `generate_routes` per group, a lookup for the rest (see
`_publish_routes`, `pilot.fastpath`). At mission scale that is 2,000 classes in ~30 ms instead of ~0.5 s.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from pilot.debounce import ENDPOINT_KINDS, settle
from pilot.fastpath import DONE, EDS_ONLY, REPLACED, ROUTES_ONLY, GeneratePart, Groups, RoutesFastPath, next_part
from pilot.logs import change_id
from pilot.metrics import PushMetrics, trigger_types
from pilot.model.conversions import Conversions
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.quiet import WhenQuiet
from pilot.tracing import Change, ChangeTracker
from pilot.xds import typeurls
from pilot.xds.cache import SnapshotCache
from pilot.xds.snapshot import ProxyParts, ProxyResources, Serializer, Snapshot

log = logging.getLogger(__name__)

BuildMesh = Callable[[Iterable[Any]], Any]
# Flat resources per type, or parts per type (`generate_parts`); both are accepted.
Generate = Callable[[Any, ProxyClass], ProxyResources | ProxyParts]
EndpointsOnly = Callable[[Any, Any], bool]
Prepare = Callable[[Any, Sequence[ProxyClass]], object]


class Pusher:
    """Keeps the snapshot cache in step with the config store."""

    def __init__(self, store: Any, cache: SnapshotCache, build_mesh: BuildMesh, generate: Generate,
                 metrics: PushMetrics, debounce: float = 0.1, debounce_max: float = 1.0,
                 endpoint_debounce: float = 0.01, endpoints_only: EndpointsOnly | None = None,
                 generate_endpoints: GeneratePart | None = None, slice_seconds: float = 0.01,
                 release_memory: Callable[[], object] | None = None, carry: Conversions | None = None,
                 changes: ChangeTracker | None = None, routes: RoutesFastPath | None = None,
                 quiet: WhenQuiet | None = None, prepare: Prepare | None = None) -> None:
        """`endpoints_only(old_mesh, new_mesh)` and `generate_endpoints(mesh, proxy)` enable the EDS
        fast path: when only endpoints moved, classes get new EDS and keep their other types.
        `routes` enables the route fast path (`_publish_routes`); both fast paths then share parts
        between classes, for as long as `generate` is the generator given here.
        `changes` follows each config change (ids, traces, /debug/push_status; pilot.tracing).
        `quiet` (shared with the ADS server, which reports its writes there) runs the release once
        pushes and writes have settled; without one the pusher keeps its own. `prepare(mesh, classes)`
        generates, with the mesh and in the same thread, the parts the watched classes share
        (`pilot.translate.prepare.prepare_shared`), so a full push's first class of each view does
        not hold the event loop for its shared parts (~0.5 s at 1,000 services)."""
        self.changes = changes or ChangeTracker()
        self.store = store
        self.cache = cache
        self.build_mesh = build_mesh
        self.generate = generate
        self.metrics = metrics
        self.debounce = debounce
        self.debounce_max = debounce_max
        self.endpoint_debounce = endpoint_debounce
        self.endpoints_only = endpoints_only
        self.generate_endpoints = generate_endpoints
        self.routes = routes
        self.prepare = prepare
        self._fast_for = generate  # the generator the fast paths were given for (see `_grouping`)
        # Route fast path: class -> the route part (generator output) of its last full generation,
        # for plain sidecars only; classes that shared one object share the next one too.
        self.route_parts: dict[ProxyClass, Mapping[str, Any]] = {}
        # EDS fast path, the same way: class -> the endpoint part of its last generation.
        self.eds_parts: dict[ProxyClass, Mapping[str, Any]] = {}
        self.mesh: Any = None
        self.slice = slice_seconds  # longest stretch of publishing between two yields to the event loop
        self.serializer = Serializer()  # each message serialized once while it lives, each part once per mesh
        # What generators carry across mesh versions (the one `build_mesh` hands them); a push ends
        # its generation, so what no class asked for any more is let go.
        self.carry = carry
        # Called a second after a push settles, to give the memory it freed back to the OS.
        self.release_memory = release_memory
        # Pushes, new classes and leaving proxies are reported here (as the ADS server reports its
        # writes), and the release runs once they have all settled (`pilot.quiet`).
        self.quiet = quiet or WhenQuiet()
        self.quiet.on_quiet(self._released)
        self.errors: dict[ProxyClass, str] = {}  # last generation error per class, for /debug
        self.ready = asyncio.Event()
        self.built_revision = -1  # the store revision the current mesh was built from
        self.mesh_revision = -1  # the store revision `self.mesh` was built from (set before publishing it)
        # class -> (store revision of the mesh, time.monotonic_ns()) when its snapshot last changed
        # content: what `pilot.distribution` needs to tell affected proxies from untouched ones.
        self.class_changes: dict[ProxyClass, tuple[int, int]] = {}
        self._built = asyncio.Event()
        cache.on_demand(self._on_demand)
        # When proxies leave, their classes' snapshots go with the next release (a second later,
        # coalesced), so a wave of disconnects gives its memory back without waiting for a push.
        cache.on_idle(lambda _key: self.quiet.touch())

    def _on_demand(self, key: ProxyClass) -> None:
        if self.mesh is not None and self.cache.get(key) is None:
            self.publish(key, new_class=True)
            self.quiet.touch()  # a wave of new proxies is a load spike too

    def rebuild(self) -> None:
        """Build the mesh from the store now and publish every watched class, without yielding."""
        self._begin_change()
        started, revision, objects, known_kinds = self._prepare()
        mesh, fast = self._build(objects, self.mesh, known_kinds, self.cache.watched())
        for _ in self._publish_all(started, revision, mesh, fast):
            pass

    async def rebuild_yielding(self, early: _EarlyBuild | None = None) -> None:
        """`rebuild` without holding the event loop: the mesh is built in a worker thread (a pure
        function of the store's objects), then publishing yields every `slice` seconds.

        `early` is a build started while the changes settled (`_build_early`): used when the
        store has not moved since it started, otherwise waited for (builds never overlap, as
        they share the conversion memos) and replaced."""
        built: tuple[Any, str] | None = None
        if self.changes.open is not None or self.changes.current is None:  # `run` began it after the debounce
            self._begin_change()
        if early is not None:
            began = time.perf_counter()  # the push's latency runs from the end of the debounce
            try:
                result = await early.task
            except Exception:  # the build below fails the same way, where it is reported
                result = None
            if result is not None and early.revision == self.store.revision:
                self.metrics.early_builds.inc()
                started, revision, built = began, early.revision, result
        if built is None:
            started, revision, objects, known_kinds = self._prepare()
            built = await asyncio.to_thread(self._build, objects, self.mesh, known_kinds, self.cache.watched())
        for _ in self._publish_all(started, revision, *built):
            await asyncio.sleep(0)

    def _build_early(self) -> _EarlyBuild:
        """Start building the mesh now, in a worker thread, while the debounce lets changes settle.

        The debounce (100 ms by default) exists to batch bursts of edits, not to delay a lone one:
        building during it takes the build (~100 ms at 1,000 services) off a change's latency.
        It costs one wasted build (with its preparation, `prepare`) when more changes arrive
        meanwhile (at most one per settle)."""
        _, revision, objects, known_kinds = self._prepare()
        task = asyncio.ensure_future(asyncio.to_thread(self._build, objects, self.mesh, known_kinds,
                                                       self.cache.watched()))
        return _EarlyBuild(revision, task)

    def _prepare_routes(self, early: _EarlyBuild, _done: object = None) -> None:
        """While the debounce lets a route edit settle: the early mesh's route part for the first
        group of classes, generated and serialized now, so the push finds it ready.

        Why: the first response of a route change waits for that part (~25 ms for a 1,000-host
        route configuration) after the debounce; made during the debounce, it is off the change's
        latency. Only the first group, to keep the loop free (the others follow while publishing,
        as before). Exact: generation is memoized on the mesh, so the push, given this very mesh
        (the early build is used only when nothing came after it), gets the same part object.
        Wasted (one generation) when another change arrives before the debounce ends.
        """
        task = early.task
        if task.cancelled() or task.exception() is not None or early.revision != self.store.revision:
            return
        mesh, fast = task.result()
        if fast != ROUTES_ONLY or self.routes is None or not self._grouping():
            return
        for key in self.cache.watched():
            if key in self.route_parts and key not in self.errors:
                try:
                    part = self.routes.generate(mesh, key)
                    for name, message in part.items():
                        self.serializer.resource(typeurls.ROUTE, name, message)
                except Exception:  # the push generates it again and reports what failed
                    log.debug("preparing routes for %s failed", key.describe(), exc_info=True)
                return

    def _prepare(self) -> tuple[float, int, list[Any], bool]:
        started = time.perf_counter()
        # A touch (kinds unknown) is an operator asking for a rebuild: never the fast path then.
        known_kinds = self.store.kinds_changed_since(self.built_revision) is not None
        return started, self.store.revision, self.store.objects(), known_kinds

    def _build(self, objects: list[Any], old: Any, known_kinds: bool,
               classes: Sequence[ProxyClass] = ()) -> tuple[Any, str]:
        """The new mesh, and which fast path its difference from `old` allows (`EDS_ONLY`,
        `ROUTES_ONLY`, or "" for a full push). Pure: may run in a thread. For a full push, what
        the watched `classes` share is generated here too (`prepare`), off the event loop."""
        began = time.perf_counter()
        with self.changes.span("build", attributes={"meshctl.objects": len(objects)}):
            mesh = self.build_mesh(objects)
            fast = ""
            if known_kinds and old is not None:
                if self._eds_only(old, mesh):
                    fast = EDS_ONLY
                elif self.routes is not None and self._grouping() and self.routes.applies(old, mesh):
                    fast = ROUTES_ONLY
        self.metrics.istio.init_time.observe(time.perf_counter() - began)
        if not fast and self.prepare is not None:
            try:
                self.prepare(mesh, classes)
            except Exception:  # publishing generates the same classes and reports what fails
                log.debug("preparing shared parts failed", exc_info=True)
        return mesh, fast

    def _begin_change(self) -> Change:
        """The change this push carries (pilot.tracing): its id goes on every log line from here on."""
        kinds = self.store.kinds_changed_since(self.built_revision)
        triggers = trigger_types(kinds, ENDPOINT_KINDS) if self.mesh is not None else ["global"]
        for trigger in triggers:
            self.metrics.istio.triggers.inc(trigger)
        change = self.changes.begin(kinds, triggers)
        change_id.set(change.id)  # this task's log lines (and the build thread's) now name the change
        return change

    def _publish_all(self, started: float, revision: int, mesh: Any, fast: str) -> Iterator[None]:
        """Publish every watched class from `mesh`; yields whenever a time slice is used up."""
        eds_only = fast == EDS_ONLY
        regrouped: Groups = {}
        old, self.mesh, self.mesh_revision = self.mesh, mesh, revision
        self._log_new_warnings(old)
        self.serializer.next_mesh()
        self.metrics.builds.inc()
        self._count_config(mesh)
        built = time.perf_counter()
        watched = self.cache.watched()
        change = self.changes.current
        if change is not None:
            self.changes.publishing(change)
        errors = len(self.errors)
        fast_published = 0  # classes a fast path served
        # Endpoint parts are shared only with the generator the fast paths were given for (asked
        # once per push, not per class).
        eds_groups = regrouped if eds_only and self._grouping() else None
        queue_time = self.metrics.istio.queue_time
        deadline = time.perf_counter() + self.slice
        with self.changes.span("generate", change, {"meshctl.classes": len(watched), "meshctl.eds_only": eds_only,
                                                     "meshctl.routes_only": fast == ROUTES_ONLY}) as span:
            for key in watched:
                if fast == ROUTES_ONLY:
                    fast_published += self._publish_routes(key, regrouped)
                elif eds_only and self._publish_endpoints(key, eds_groups):
                    fast_published += 1
                else:
                    self.publish(key)
                now = time.perf_counter()
                queue_time.observe(now - built)
                if now > deadline:
                    yield
                    deadline = time.perf_counter() + self.slice
            if span is not None:
                span.set_attribute("meshctl.errors", len(self.errors))
        if fast_published:  # once per push: a metric update per class costs ~3 µs
            (self.metrics.eds_only_pushes if eds_only else self.metrics.route_only_pushes).inc(fast_published)
        self._drop_unwatched()
        # A fast path leaves most classes' other types untouched: keep their conversions too.
        self.serializer.advance(complete=not fast, replaced=REPLACED.get(fast, ()))
        if self.carry is not None:
            self.carry.advance(complete=not fast)
        done = time.perf_counter()
        self.metrics.push_seconds.observe(done - started)
        if change is not None:
            self.changes.published(change, {
                "revision": revision, "classes": len(watched), "eds_only": eds_only, "routes_only": fast == ROUTES_ONLY,
                "generate_errors": len(self.errors), "new_generate_errors": max(0, len(self.errors) - errors),
                "build_ms": round((built - started) * 1000, 3), "generate_ms": round((done - built) * 1000, 3),
                "duration_ms": round((done - started) * 1000, 3), "pushed_at": time.time()})
        log.info("revision %d: mesh built in %.1f ms, %d classes %s in %.1f ms", revision, (built - started) * 1000,
                 len(watched), DONE.get(fast, "generated and published"),
                 (done - built) * 1000)
        self.built_revision = revision
        self._built.set()
        self._built = asyncio.Event()
        self.ready.set()

    def _count_config(self, mesh: Any) -> None:
        """Istio's `pilot_services` (services in the mesh) and `pilot_virt_services` (VirtualService objects)."""
        self.metrics.istio.services.set(len(getattr(mesh, "services", ())))
        self.metrics.istio.virt_services.set(len(self.store.objects("VirtualService")))

    def _log_new_warnings(self, old: Any) -> None:
        """Log each mesh warning once, when it first appears (all stay listed in /debug/configz)."""
        before = set(getattr(old, "warnings", ()))
        for warning in getattr(self.mesh, "warnings", ()):
            if warning not in before:
                log.warning("mesh: %s", warning)

    async def wait_built(self, revision: int) -> None:
        """Wait until a mesh built from `revision` or later is published."""
        while self.built_revision < revision:
            await self._built.wait()

    def _eds_only(self, old: Any, new: Any) -> bool:
        if self.endpoints_only is None or self.generate_endpoints is None:
            return False
        return self.endpoints_only(old, new)

    def _publish_endpoints(self, key: ProxyClass, groups: Groups | None) -> bool:
        """EDS fast path: the class's current snapshot with new endpoints; False if not applicable.

        With `groups` (one push's groups, None when parts may not be shared: see `_grouping`),
        classes share their new endpoint part as they shared the last one (see `_publish_routes`:
        endpoint parts are memoized on what a namespace sees and the mesh certificates, which an
        endpoint move does not regroup). The first class of each group runs `generate_endpoints`;
        the others cost a lookup.
        """
        previous = self.cache.get(key)
        generate = self.generate_endpoints
        if previous is None or generate is None or (self.errors and key in self.errors):
            return False  # no good snapshot of the current config to patch
        old = self.eds_parts.get(key) if groups is not None else None
        try:
            eds = next_part(groups, old, lambda: generate(self.mesh, key))
            self._set(key, previous.with_type(typeurls.ENDPOINT, self.serializer.set_of(typeurls.ENDPOINT, eds)))
        except Exception:
            log.exception("EDS fast path failed for %s; doing a full push", key.describe())
            return False
        if groups is not None:
            self.eds_parts[key] = eds
        return True

    def _publish_routes(self, key: ProxyClass, regrouped: Groups) -> bool:
        """Route fast path (an edit of HTTP routes only, `RoutesFastPath.applies`): a plain sidecar
        gets the new route configurations of its group and keeps its other types.

        Why it is exact: a class's route part is memoized on (what its namespace sees, the labels
        routes select on, its egress and outbound policy), so classes holding one route part object
        had equal inputs to it; such an edit changes neither those inputs' grouping nor any other
        type of a plain sidecar (`pilot.model.diff.http_routes_only`). The first class of each
        group gets its route part from `RoutesFastPath.generate` (the very object `generate_parts`
        would return); the others cost a lookup and a snapshot with one type replaced, instead of a
        generation each (2,000 classes at mission scale: ~30 ms instead of ~0.5 s of CPU).
        """
        previous, old = self.cache.get(key), self.route_parts.get(key)
        split = self.routes.split if self.routes is not None and key.vhds else None
        if (previous is None or old is None or self.routes is None or (self.errors and key in self.errors)
                or (key.vhds and split is None)):  # a VHDS class needs the split `generate_parts` makes
            self.publish(key)  # captured sidecars, gateways, classes without a good snapshot
            return False
        generate = self.routes.generate
        try:
            part = next_part(regrouped, old, lambda: generate(self.mesh, key))
            routes, set_of = part, self.serializer.set_of
            if split is not None:  # a VHDS class: its route configurations stay, its virtual hosts change
                routes, hosts = split(self.mesh, part)
                previous = previous.with_type(typeurls.VIRTUAL_HOST, set_of(typeurls.VIRTUAL_HOST, hosts))
            self._set(key, previous.with_type(typeurls.ROUTE, set_of(typeurls.ROUTE, routes)))
        except Exception:  # an inconsistent result: generate this class in full instead
            log.exception("route fast path failed for %s; generating it in full", key.describe())
            self.publish(key)
            return False
        self.route_parts[key] = part
        return True

    def _grouping(self) -> bool:
        """Whether the fast paths may share parts between classes: only with the generator they were
        given for (`routes` set means the real one), not after `generate` was replaced (tests inject
        faulty generators that way)."""
        return self.routes is not None and self.generate is self._fast_for

    def publish(self, key: ProxyClass, new_class: bool = False) -> bool:
        """Generate and publish one class; on failure keep its last good snapshot.

        For a class seen for the first time, its CPU time is recorded (`pilot_class_publish_cpu_seconds`).
        """
        cpu = time.thread_time() if new_class else 0.0
        try:
            parts = _as_parts(self.generate(self.mesh, key))
            snapshot = Snapshot.from_parts(parts, self.serializer)
            self._set(key, snapshot)
        except Exception as exc:
            self.metrics.generate_errors.inc()
            self.metrics.istio.internal_errors.inc("snapshot")
            self.errors[key] = f"{type(exc).__name__}: {exc}"
            self.route_parts.pop(key, None)
            self.eds_parts.pop(key, None)
            log.exception("config for %s not published; it keeps its last good config", key.describe())
            return False
        self.errors.pop(key, None)
        routes, endpoints = parts.get(typeurls.ROUTE, ()), parts.get(typeurls.ENDPOINT, ())
        grouping = self._grouping()
        if grouping and key.kind == ProxyKind.SIDECAR and not key.captured and len(routes) == 1:
            # A VHDS class's route part is split for publishing; the fast path groups by the part whole.
            self.route_parts[key] = self.routes.generate(self.mesh, key) if key.vhds and self.routes else routes[0]
        else:
            self.route_parts.pop(key, None)
        if grouping and len(endpoints) == 1:
            self.eds_parts[key] = endpoints[0]
        else:
            self.eds_parts.pop(key, None)
        if new_class:
            self.metrics.class_cpu.observe(time.thread_time() - cpu)
        return True

    def _set(self, key: ProxyClass, snapshot: Snapshot) -> None:
        """Publish, noting when the class's content really changed (the cache keeps an identical one)."""
        if self.cache.set(key, snapshot):
            self.class_changes[key] = (self.mesh_revision, time.monotonic_ns())

    async def run(self) -> None:
        """Rebuild after every settled burst of changes, forever."""
        revision = self.store.revision
        await self.rebuild_yielding()
        self.quiet.touch()
        while True:
            revision = await self.store.wait_for_change(revision)
            entered = time.perf_counter()
            early = self._build_early()
            early.task.add_done_callback(functools.partial(self._prepare_routes, early))
            revision = await self._settle(revision)
            self.metrics.istio.debounce_time.observe(time.perf_counter() - entered)
            self._begin_change()
            await self.rebuild_yielding(early)
            self.quiet.touch()

    def _released(self) -> None:
        """Once pushes and their writes have settled (`quiet`): drop unwatched classes and the
        responses kept for sharing, then hand free memory back (`release_memory`).

        Why only then: publishing ends long before its writes do at mission scale (2,000 streams
        write a route change for about a second after the last class is published); forgetting the
        shared responses earlier would make the streams still due encode their own copies."""
        self._drop_unwatched()
        self.cache.forget_responses()
        if self.release_memory is not None:
            self.release_memory()

    def _drop_unwatched(self) -> None:
        """Drop the snapshots of classes no proxy watches, and with each what the pusher keeps for it
        (route and endpoint parts, when its content changed), at once rather than at the next push.

        Why with it: a class whose proxies come back would otherwise be found under the old, equal
        key object, and every lookup with the new proxies' key would compare the two field by field
        (~10 ms per push for 2,000 classes, `__eq__` in py-spy after a reconnect). Cost: O(dropped)."""
        for key in self.cache.drop_unwatched():
            for table in (self.class_changes, self.route_parts, self.eds_parts):
                table.pop(key, None)

    async def _settle(self, revision: int) -> int:
        """Wait for changes to settle (`pilot.debounce.settle`); counts endpoint-only pushes that
        took the short quiet time."""
        revision, fast = await settle(self.store, self.built_revision, revision, quiet=self.debounce,
                                      endpoint_quiet=self.endpoint_debounce, longest=self.debounce_max)
        if fast:
            self.metrics.endpoint_fast_pushes.inc()
        return revision


class _EarlyBuild(NamedTuple):
    """A mesh build started before the debounce ended: `task` gives (mesh, endpoints only)."""

    revision: int
    task: asyncio.Future[tuple[Any, str]]


def _as_parts(resources: ProxyResources | ProxyParts) -> ProxyParts:
    """Parts as they are; flat resources (a generator of `generate`'s shape) as one part per type."""
    return {t: v if isinstance(v, tuple | list) else (v,) for t, v in resources.items()}
