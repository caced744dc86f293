"""Generation shares what does not depend on the proxy, and stays pure."""

from __future__ import annotations

from pathlib import Path

from pilot.config.files import load_dir
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate
from pilot.xds.snapshot import Snapshot
from pilot.xds.typeurls import CLUSTER, ENDPOINT, ROUTE

CANARY = Path(__file__).resolve().parents[2] / "examples" / "canary"


def test_classes_of_one_namespace_share_cluster_and_endpoint_messages() -> None:
    mesh = build_mesh(load_dir(CANARY).objects)
    a = generate(mesh, ProxyClass(ProxyKind.SIDECAR, "default", (("app", "a"),)))
    b = generate(mesh, ProxyClass(ProxyKind.SIDECAR, "default", (("app", "b"),)))
    name = next(iter(a[ENDPOINT]))
    assert a[ENDPOINT][name] is b[ENDPOINT][name]
    shared = set(a[CLUSTER]) & set(b[CLUSTER])
    assert shared and all(a[CLUSTER][n] is b[CLUSTER][n] for n in shared)


def test_memoized_output_equals_a_fresh_generation() -> None:
    objects = load_dir(CANARY).objects
    proxy = ProxyClass(ProxyKind.SIDECAR, "default", (("app", "frontend"),), "127.0.0.10", "frontend")
    warm = build_mesh(objects)
    generate(warm, ProxyClass(ProxyKind.SIDECAR, "default", (("app", "x"),)))  # fill the memo
    again = Snapshot.from_resources(generate(warm, proxy))
    fresh = Snapshot.from_resources(generate(build_mesh(objects), proxy))
    assert again.versions() == fresh.versions()
    assert fresh.of(ROUTE).resources  # not vacuous


SIDECARS = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.5.1}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: strict}
spec:
  egress: [{hosts: ["*/*"]}]
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"""


def test_namespaces_that_see_the_same_services_differ_by_their_outbound_policy() -> None:
    from pilot.config.files import load_text

    mesh = build_mesh(load_text(SIDECARS).objects)
    loose = generate(mesh, ProxyClass(ProxyKind.SIDECAR, "loose"))
    strict = generate(mesh, ProxyClass(ProxyKind.SIDECAR, "strict"))
    assert set(loose[CLUSTER]) == set(strict[CLUSTER])  # same visible services (shared view)
    pairs = [("loose", loose), ("strict", strict)]
    vhosts = {ns: [v.name for v in r[ROUTE]["outbound"].virtual_hosts] for ns, r in pairs}
    assert len(vhosts["strict"]) == len(vhosts["loose"]) + 1, vhosts  # REGISTRY_ONLY's catch-all
