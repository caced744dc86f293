"""The route fast path: an edit of HTTP routes only regenerates one class per group of classes
sharing a route configuration; the others take its routes and keep every other type. The EDS
fast path groups the same way by endpoint part. The result must be exactly what a full
generation of every class gives."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from pilot.config.store import ConfigStore
from pilot.config.yaml_text import load_text
from pilot.fastpath import RoutesFastPath
from pilot.metrics import PushMetrics
from pilot.model.build import build_mesh
from pilot.model.conversions import Conversions
from pilot.model.diff import endpoints_only, http_routes_only
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.push import Pusher
from pilot.translate import generate, generate_endpoints, generate_parts, generate_routes
from pilot.translate.vhds import vhds_parts
from pilot.xds.cache import SnapshotCache
from pilot.xds.snapshot import Snapshot
from pilot.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE, VIRTUAL_HOST

SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: [{name}.{ns}.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: {proto}, protocol: {proto_upper}}}]
  workloadSelector: {{labels: {{app: {name}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}-v1, namespace: {ns}}}
spec: {{address: {address}, labels: {{app: {name}, version: v1}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: {ns}}}
spec:
  host: {name}.{ns}.svc.cluster.local
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
"""

HTTP_RULE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: [{hosts}]
  exportTo: [{export}]
  http:
  - {match}route:
    - destination: {{host: {name}.{ns}.svc.cluster.local, subset: v1}}
      weight: {weight}
    - destination: {{host: {name}.{ns}.svc.cluster.local, subset: v2}}
      weight: {rest}
"""

TCP_RULE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: data}
spec:
  hosts: [db.data.svc.cluster.local]
  tcp:
  - route:
    - destination: {host: db.data.svc.cluster.local, subset: v1}
"""

SIDECAR = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: narrow}
spec:
  egress: [{hosts: ["./*", "shop/web.shop.svc.cluster.local"]}]
"""

# Plain sidecars in three namespaces (one narrowed by a Sidecar), with and without mesh
# certificates, a captured sidecar and a gateway: the last two always get a full generation.
CLASSES = [
    ProxyClass(ProxyKind.SIDECAR, "shop", (("app", "web"), ("version", "v1"))),
    ProxyClass(ProxyKind.SIDECAR, "shop", (("app", "cart"), ("version", "v1"))),
    ProxyClass(ProxyKind.SIDECAR, "shop", (("app", "cart"), ("version", "v1")), mtls=True),
    ProxyClass(ProxyKind.SIDECAR, "data", (("app", "db"), ("version", "v1"))),
    ProxyClass(ProxyKind.SIDECAR, "narrow", (("app", "n"),)),
    ProxyClass(ProxyKind.SIDECAR, "other", (("app", "x"), ("tier", "a"))),
    ProxyClass(ProxyKind.SIDECAR, "other", (("app", "y"), ("tier", "b")), captured=True),
    ProxyClass(ProxyKind.ROUTER, "shop", (("istio", "ingressgateway"),)),
    # Delta Envoys taking virtual hosts over VHDS (`pilot.translate.vhds`): a plain and a captured one.
    ProxyClass(ProxyKind.SIDECAR, "shop", (("app", "web"), ("version", "v1")), vhds=True),
    ProxyClass(ProxyKind.SIDECAR, "other", (("app", "y"), ("tier", "b")), captured=True, vhds=True),
]
FULL = [k for k in CLASSES if k.kind == ProxyKind.ROUTER or k.captured]  # generated in full on a route edit


def mesh_text(web_weight: int = 90, *, export: str = '"*"', hosts: str = "web.shop.svc.cluster.local",
              source_labels: bool = False, tcp: bool = True, cart_rule: bool = True, moved: int = 0) -> str:
    docs = [SERVICE.format(name=n, ns=ns, address=f"10.0.{moved}.{i + 1}", proto=p, proto_upper=p.upper())
            for i, (n, ns, p) in enumerate([("web", "shop", "http"), ("cart", "shop", "http"),
                                             ("db", "data", "tcp"), ("n", "narrow", "http")])]
    match = "match: [{sourceLabels: {tier: a}}]\n    " if source_labels else ""
    docs.append(HTTP_RULE.format(name="web", ns="shop", hosts=hosts, export=export, match=match,
                                 weight=web_weight, rest=100 - web_weight))
    if cart_rule:
        docs.append(HTTP_RULE.format(name="cart", ns="shop", hosts="cart.shop.svc.cluster.local", export='"*"',
                                     match="", weight=50, rest=50))
    if tcp:
        docs.append(TCP_RULE)
    docs.append(SIDECAR)
    return "---\n".join(docs)


def objects(**kw: Any) -> list[Any]:
    loaded = load_text(mesh_text(**kw))
    assert not loaded.errors, loaded.errors
    return list(loaded.objects)


class Pipeline:
    """Store, pusher and cache. With the fast paths it also carries conversions and generated parts
    from one mesh version to the next, as pilot does (`pilot.app`), so what is patched from a last
    version is compared with a pipeline that computes everything afresh."""

    def __init__(self, *, fast: bool) -> None:
        self.store, self.cache, self.metrics = ConfigStore(), SnapshotCache(), PushMetrics(CollectorRegistry())
        conversions, carry = (Conversions(), Conversions()) if fast else (None, None)

        def build(objs: Any) -> Any:
            return build_mesh(objs, conversions=conversions, carry=carry)
        self.generated: list[ProxyClass] = []
        self.endpoints_generated: list[ProxyClass] = []
        self.routes_generated: list[ProxyClass] = []

        def counting(mesh: Any, proxy: ProxyClass) -> Any:
            self.generated.append(proxy)
            return generate_parts(mesh, proxy)

        def counting_endpoints(mesh: Any, proxy: ProxyClass) -> Any:
            self.endpoints_generated.append(proxy)
            return generate_endpoints(mesh, proxy)

        def counting_routes(mesh: Any, proxy: ProxyClass) -> Any:
            self.routes_generated.append(proxy)
            return generate_routes(mesh, proxy)

        self.pusher = Pusher(self.store, self.cache, build, counting, self.metrics,
                             endpoints_only=endpoints_only, generate_endpoints=counting_endpoints,
                             routes=RoutesFastPath(http_routes_only, counting_routes, vhds_parts) if fast else None,
                             carry=carry)
        self._watching = ExitStack()
        for key in CLASSES:
            self._watching.enter_context(self.cache.watch(key))

    def push(self, objs: list[Any]) -> dict[ProxyClass, Snapshot]:
        self.generated.clear()
        self.endpoints_generated.clear()
        self.routes_generated.clear()
        self.store.replace_source("f", objs)
        self.pusher.rebuild()
        found = {k: self.cache.get(k) for k in CLASSES}
        assert all(s is not None for s in found.values())
        return found  # type: ignore[return-value]


@pytest.fixture
def fast() -> Iterator[Pipeline]:
    """A pipeline with the fast paths, after its first full push."""
    pipeline = Pipeline(fast=True)
    pipeline.push(objects())
    yield pipeline
    pipeline._watching.close()


def full_generation(objs: list[Any]) -> dict[ProxyClass, dict[str, str]]:
    mesh = build_mesh(objs)
    return {k: Snapshot.from_resources(generate(mesh, k)).versions() for k in CLASSES}


@pytest.mark.parametrize("edit", [
    {"web_weight": 70},  # the benchmark's change: weights
    {"export": '"."'},  # the rule hidden from other namespaces
    {"hosts": "web.shop.svc.cluster.local, cart.shop.svc.cluster.local"},  # a host taken over
    {"cart_rule": False},  # a rule removed
])
def test_a_route_edit_takes_the_fast_path_and_equals_a_full_generation(fast: Pipeline, edit: dict[str, Any]) -> None:
    before = {k: fast.cache.get(k) for k in CLASSES}
    after = fast.push(objects(**edit))
    assert {k: s.versions() for k, s in after.items()} == full_generation(objects(**edit))
    # Captured and router classes always in full; one plain sidecar per shared route configuration
    # gets its routes alone (`generate_routes`).
    plain = [k for k in CLASSES if k.kind == ProxyKind.SIDECAR and not k.captured]
    groups = {id(fast.pusher.route_parts[k]) for k in plain}
    assert len(fast.generated) == len(FULL) and len(fast.routes_generated) == len(groups) < len(plain)
    assert fast.metrics.route_only_pushes._value.get() == len(plain)
    for key in plain:
        if key not in fast.generated:  # took its group's routes: every other type is the same object
            for type_url in (CLUSTER, ENDPOINT, LISTENER):
                assert after[key].of(type_url) is before[key].of(type_url)  # type: ignore[union-attr]
    shop = [k for k in plain if k.namespace == "shop" and not k.vhds]
    assert len({id(after[k].of(ROUTE)) for k in shop}) == 1  # one route configuration, shared


@pytest.mark.parametrize(("edit", "why"), [
    ({"source_labels": True}, "sourceLabels decide which classes share routes"),
    ({"tcp": False}, "a rule with TCP routes changes listeners"),
])
def test_other_rule_edits_take_the_full_path(fast: Pipeline, edit: dict[str, Any], why: str) -> None:
    after = fast.push(objects(**edit))
    assert len(fast.generated) == len(CLASSES), why
    assert fast.metrics.route_only_pushes._value.get() == 0
    assert {k: s.versions() for k, s in after.items()} == full_generation(objects(**edit))


def test_a_sequence_of_edits_matches_a_pipeline_without_the_fast_path() -> None:
    """Fast and full pipelines fed the same edits (route, endpoint, source labels, route again)
    publish identical content every time."""
    fast, full = Pipeline(fast=True), Pipeline(fast=False)
    assert fast.pusher.routes is not None
    edits: list[dict[str, Any]] = [
        {}, {"web_weight": 60}, {"web_weight": 60, "export": '"."'}, {"web_weight": 60, "moved": 1},
        {"web_weight": 60, "source_labels": True, "moved": 1}, {"web_weight": 40, "source_labels": True},
        {"web_weight": 40}, {"web_weight": 40, "moved": 3}, {"web_weight": 10, "cart_rule": False}]
    for edit in edits:
        a, b = fast.push(objects(**edit)), full.push(objects(**edit))
        assert {k: s.versions() for k, s in a.items()} == {k: s.versions() for k, s in b.items()}, edit
    assert fast.metrics.route_only_pushes._value.get() > 0
    assert full.metrics.route_only_pushes._value.get() == 0


def test_which_changes_are_http_routes_only() -> None:
    old = build_mesh(objects())
    assert http_routes_only(old, build_mesh(objects(web_weight=10)))
    assert not http_routes_only(old, build_mesh(objects()))  # nothing changed
    assert not http_routes_only(old, build_mesh(objects(source_labels=True)))
    assert not http_routes_only(old, build_mesh(objects(tcp=False)))
    assert not http_routes_only(old, build_mesh(objects(hosts="db.data.svc.cluster.local")))  # a TCP rule's host
    moved = [o for o in objects() if o.key != ("WorkloadEntry", "shop", "web-v1")]
    assert not http_routes_only(old, build_mesh(moved))


def test_an_endpoint_move_generates_endpoints_once_per_group_and_equals_a_full_generation(fast: Pipeline) -> None:
    before = {k: fast.cache.get(k) for k in CLASSES}
    after = fast.push(objects(moved=1))
    assert fast.metrics.eds_only_pushes._value.get() == len(CLASSES) and not fast.generated
    assert {k: s.versions() for k, s in after.items()} == full_generation(objects(moved=1))
    groups = {id(fast.pusher.eds_parts[k]) for k in CLASSES}
    assert len(fast.endpoints_generated) == len(groups) < len(CLASSES)
    for key in CLASSES:
        assert after[key].of(ENDPOINT) is not before[key].of(ENDPOINT)  # type: ignore[union-attr]
        assert after[key].of(CLUSTER) is before[key].of(CLUSTER)  # type: ignore[union-attr]
    # A route edit, then a move again: groups recorded by either path stay exact.
    fast.push(objects(web_weight=20, moved=1))
    after = fast.push(objects(web_weight=20, moved=2))
    assert {k: s.versions() for k, s in after.items()} == full_generation(objects(web_weight=20, moved=2))


def test_generate_routes_is_the_route_part_of_generate_parts() -> None:
    mesh = build_mesh(objects())
    for key in CLASSES:
        if key.kind == ProxyKind.SIDECAR and not key.captured and key.vhds:  # split as generate_parts does
            bases, hosts = vhds_parts(mesh, generate_routes(mesh, key))
            parts = generate_parts(mesh, key)
            assert bases is parts[ROUTE][0] and hosts is parts[VIRTUAL_HOST][0]
        elif key.kind == ProxyKind.SIDECAR and not key.captured:
            assert generate_routes(mesh, key) is generate_parts(mesh, key)[ROUTE][0]
        else:
            with pytest.raises(ValueError, match="only plain sidecars"):
                generate_routes(mesh, key)


def test_a_replaced_generator_turns_the_fast_paths_off(fast: Pipeline) -> None:
    """The fast paths share what the configured generator shares; a generator swapped in later (a
    test's fault injection) gets every class generated by it."""
    calls: list[ProxyClass] = []

    def other(mesh: Any, proxy: ProxyClass) -> Any:
        calls.append(proxy)
        return generate_parts(mesh, proxy)

    fast.pusher.generate = other
    after = fast.push(objects(web_weight=30))
    assert sorted(calls, key=str) == sorted(CLASSES, key=str)
    assert fast.metrics.route_only_pushes._value.get() == 0 and not fast.routes_generated
    assert {k: s.versions() for k, s in after.items()} == full_generation(objects(web_weight=30))


def test_fast_path_pushes_keep_no_serialized_routes_or_endpoints_they_replaced(fast: Pipeline) -> None:
    """A fast-path push keeps every other conversion, but the resources of the type it replaced
    that no published set holds go: route changes one after another would otherwise keep every
    old route configuration (0.57 MB each at mission scale) until the next full push."""
    serializer = fast.pusher.serializer

    def held(type_url: str) -> int:
        return serializer.held(type_url)

    fast.push(objects(web_weight=70))
    routes, endpoints = held(ROUTE), held(ENDPOINT)
    for weight in (60, 50, 40, 30):
        fast.push(objects(web_weight=weight))
        assert fast.metrics.route_only_pushes._value.get() > 0
        assert held(ROUTE) == routes, weight
    for moved in (1, 2, 3):
        fast.push(objects(web_weight=30, moved=moved))
        assert held(ENDPOINT) == endpoints, moved
    assert held(ROUTE) == routes
