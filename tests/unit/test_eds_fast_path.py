"""The EDS fast path: when only endpoints move, proxies get new EDS and keep everything else,
and the result is exactly what a full generation would have produced."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from pilot.config.store import ConfigStore
from pilot.config.yaml_dir import load_dir
from pilot.config.yaml_text import load_text
from pilot.metrics import PushMetrics
from pilot.model.build import build_mesh
from pilot.model.diff import endpoints_only
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.push import Pusher
from pilot.translate import generate, generate_endpoints
from pilot.xds.cache import SnapshotCache
from pilot.xds.snapshot import Snapshot
from pilot.xds.typeurls import CLUSTER, ENDPOINT

CANARY = Path(__file__).resolve().parents[2] / "examples" / "canary"
CLASSES = [
    ProxyClass(ProxyKind.SIDECAR, "default", (("app", "frontend"),), "127.0.0.10", "frontend"),
    ProxyClass(ProxyKind.SIDECAR, "default", (("app", "reviews"), ("version", "v1")), "127.0.0.11", "reviews-v1"),
    ProxyClass(ProxyKind.SIDECAR, "other", (("app", "x"),)),
]


def edited(**spec: Any) -> list[Any]:
    """The canary example with reviews-v1's WorkloadEntry spec updated."""
    out = []
    for obj in load_dir(CANARY).objects:
        if obj.key == ("WorkloadEntry", "default", "reviews-v1"):
            obj = obj.model_copy(update={"spec": getattr(obj, "spec").model_copy(update=spec)})  # noqa: PLW2901, B009
        out.append(obj)
    return out


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"address": "127.0.0.99"}, True),
        ({"weight": 7}, True),
        ({"labels": {"app": "reviews", "version": "v9"}}, False),  # subset membership and inbound scope
        ({"ports": {"http": 19999}}, False),  # the workload's own inbound listener
        ({"service_account": "other"}, False),
    ],
)
def test_which_changes_are_endpoints_only(change: dict[str, Any], expected: bool) -> None:
    old = build_mesh(load_dir(CANARY).objects)
    assert endpoints_only(old, build_mesh(edited(**change))) is expected


def test_rule_changes_and_new_workloads_are_not_endpoints_only() -> None:
    objects = list(load_dir(CANARY).objects)
    old = build_mesh(objects)
    assert not endpoints_only(old, build_mesh([o for o in objects if o.key[0] != "VirtualService"]))
    assert not endpoints_only(old, build_mesh([o for o in objects if o.key[2] != "reviews-v2"]))


DNS = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext, namespace: default}}
spec:
  hosts: [ext.example.com]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: {resolution}
  endpoints: [{{address: {address}}}]
"""


@pytest.mark.parametrize("resolution", ["DNS", "STATIC"])
def test_inline_endpoint_moves_are_eds_only_unless_the_cluster_carries_them(resolution: str) -> None:
    old = build_mesh(load_text(DNS.format(resolution=resolution, address="127.0.7.1")).objects)
    new = build_mesh(load_text(DNS.format(resolution=resolution, address="127.0.7.2")).objects)
    assert endpoints_only(old, new) is (resolution == "STATIC")


def test_fast_path_snapshot_equals_a_full_generation() -> None:
    store, cache, metrics = ConfigStore(), SnapshotCache(), PushMetrics(CollectorRegistry())
    pusher = Pusher(store, cache, build_mesh, generate, metrics,
                    endpoints_only=endpoints_only, generate_endpoints=generate_endpoints)
    store.replace_source("f", load_dir(CANARY).objects)
    watches = [cache.watch(k) for k in CLASSES]
    for w in watches:
        w.__enter__()
    pusher.rebuild()
    before = {k: cache.get(k) for k in CLASSES}
    store.replace_source("f", edited(address="127.0.0.99"))
    pusher.rebuild()
    assert metrics.eds_only_pushes._value.get() == len(CLASSES)
    fresh_mesh = build_mesh(edited(address="127.0.0.99"))
    for key in CLASSES:
        patched, full = cache.get(key), Snapshot.from_resources(generate(fresh_mesh, key))
        assert patched is not None and patched.versions() == full.versions()
        assert patched.version(CLUSTER) == before[key].version(CLUSTER)  # type: ignore[union-attr]
        assert patched.version(ENDPOINT) != before[key].version(ENDPOINT)  # type: ignore[union-attr]
    # A label change is not endpoints-only: full generation, no fast-path count.
    store.replace_source("f", edited(address="127.0.0.99", labels={"app": "reviews", "version": "v9"}))
    pusher.rebuild()
    assert metrics.eds_only_pushes._value.get() == len(CLASSES)
    for w in watches:
        w.__exit__(None, None, None)


def test_a_touch_forces_a_full_push() -> None:
    store, cache, metrics = ConfigStore(), SnapshotCache(), PushMetrics(CollectorRegistry())
    calls: list[ProxyClass] = []

    def counting(mesh: Any, proxy: ProxyClass) -> Any:
        calls.append(proxy)
        return generate(mesh, proxy)

    pusher = Pusher(store, cache, build_mesh, counting, metrics,
                    endpoints_only=endpoints_only, generate_endpoints=generate_endpoints)
    store.replace_source("f", load_dir(CANARY).objects)
    with cache.watch(CLASSES[0]):
        pusher.rebuild()
        store.touch()  # nothing changed, but the operator asked for a rebuild
        pusher.rebuild()
    assert len(calls) == 2 and metrics.eds_only_pushes._value.get() == 0
