"""The pusher's cost per class and change, without streams: what `stream_fanout` leaves out.

    python -m benchmarks.publish_fanout --services 1000

Why: at mission scale every workload is its own config class, so whatever the pusher does per
class for a change is paid 2,000 times on the event loop, before and between the streams' writes.
`stream_fanout` publishes each change with one `SnapshotCache.set` per class; this runs the rest,
the pusher pilot runs (`pilot.app.Pilot`'s, fast paths included) on the benchmark mesh.

Every (namespace, labels) workload of the mesh is watched as one class, as `ads_load
--classes per-workload` connects them. Then, alternating, a route change (new weights in one
VirtualService) and an endpoint change (a WorkloadEntry moved) are written into the config and
loaded into the store; the mesh is built (timed apart: `build`) and published to every class
(`publish`: the fast path's generation for each group, the class's new snapshot, the cache's check,
waking its streams, the bookkeeping after). Printed per change kind: the build in milliseconds, the
publish in microseconds per class (the fastest of the rounds), and Python calls per class (counted
in the last round: the same on any machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from benchmarks import meshgen
from pilot.app import Pilot
from pilot.config import load_dir
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.settings import PilotSettings
from pilot.xds.cache import ClassWatch

SOURCE = "bench"


@dataclass
class Result:
    """Per change kind: build milliseconds and publish microseconds per class of each timed round,
    Python calls per class in the counted round, and the fast path each change took."""

    classes: int = 0
    build_ms: dict[str, list[float]] = field(default_factory=dict)
    micros: dict[str, list[float]] = field(default_factory=dict)
    calls: dict[str, float] = field(default_factory=dict)
    fast: dict[str, str] = field(default_factory=dict)
    woken: dict[str, int] = field(default_factory=dict)


async def run(services: int, rounds: int) -> Result:
    """Publish `rounds` route and endpoint changes to one class per workload; the last round counted."""
    result = Result()
    with tempfile.TemporaryDirectory(prefix="publish-fanout-") as tmp, contextlib.ExitStack() as watching:
        config = meshgen.generate(Path(tmp), services=services)
        pilot = Pilot(PilotSettings())
        store, pusher = pilot.store, pilot.pusher
        store.replace_source(SOURCE, load_dir(config.directory).objects)
        keys = [ProxyClass(ProxyKind.SIDECAR, w.namespace, w.labels) for w in config.workloads()]
        woken = [0]

        def wake() -> None:
            woken[0] += 1

        for key in keys:  # one watching stream per class, as a connected fleet's
            watching.enter_context(ClassWatch(pilot.cache, key, wake))
        result.classes = len(keys)
        pusher.rebuild()  # every class generated in full, as when the fleet has connected
        for i in range(rounds):
            for kind in ("route", "endpoint"):
                service = i * 7 + (0 if kind == "route" else 3)
                (config.route_change if kind == "route" else config.endpoint_change)(service)
                config.write_service(service)
                store.replace_source(SOURCE, load_dir(config.directory).objects)
                _measure(pusher, kind, counted=i == rounds - 1, result=result, woken=woken)
    return result


def _measure(pusher: Any, kind: str, counted: bool, result: Result, woken: list[int]) -> None:
    """One change: the build, then publishing to every watched class (timed, or its calls counted)."""
    pusher._begin_change()
    started, revision, objects, known_kinds = pusher._prepare()
    began = time.perf_counter()
    mesh, fast = pusher._build(objects, pusher.mesh, known_kinds, pusher.cache.watched())
    built = time.perf_counter()
    classes = len(pusher.cache.watched())
    calls, woken[0] = 0, 0

    def count(frame: Any, event: str, arg: Any) -> None:
        nonlocal calls
        if event == "call":
            calls += 1

    publishing = time.perf_counter()
    if counted:
        sys.setprofile(count)
    for _ in pusher._publish_all(started, revision, mesh, fast):
        pass
    sys.setprofile(None)
    took = time.perf_counter() - publishing
    result.fast[kind] = fast or "full"
    result.woken[kind] = woken[0]
    if counted:
        result.calls[kind] = calls / classes
    else:
        result.build_ms.setdefault(kind, []).append((built - began) * 1000)
        result.micros.setdefault(kind, []).append(took / classes * 1e6)


@click.command()
@click.option("--services", default=1000, show_default=True)
@click.option("--rounds", default=4, show_default=True, help="Changes of each kind (>= 2; the last is counted).")
def main(services: int, rounds: int) -> None:
    """The pusher's cost per class and change (lower is better)."""
    if rounds < 2:
        raise click.BadParameter("at least 2 rounds: one timed, one counted", param_hint="--rounds")
    result = asyncio.run(run(services, rounds))
    print(f"{services} services, {result.classes} classes (one per workload); per change: the build (ms, fastest "
          f"of {rounds - 1}), publishing per class (us, fastest) and Python calls per class (counted)")
    for kind in ("route", "endpoint"):
        print(f"  {kind:9} fast path {result.fast[kind]:7} build {min(result.build_ms[kind]):6.1f} ms   publish "
              f"{min(result.micros[kind]):5.1f} us {result.calls[kind]:5.1f} calls per class, "
              f"{result.woken[kind]} classes woken")


if __name__ == "__main__":
    main()
