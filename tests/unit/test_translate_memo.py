"""Generation shares what does not depend on the proxy, and stays pure."""

from __future__ import annotations

from pathlib import Path

from pilot.config.yaml_dir import load_dir
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate, generate_parts
from pilot.translate.clusters import service_clusters
from pilot.translate.encoded import Encoded
from pilot.xds.snapshot import Snapshot
from pilot.xds.typeurls import CLUSTER, ENDPOINT, ROUTE

CANARY = Path(__file__).resolve().parents[2] / "examples" / "canary"


def test_classes_of_one_namespace_share_cluster_and_endpoint_messages() -> None:
    mesh = build_mesh(load_dir(CANARY).objects)
    a = generate_parts(mesh, ProxyClass(ProxyKind.SIDECAR, "default", (("app", "a"),)))
    b = generate_parts(mesh, ProxyClass(ProxyKind.SIDECAR, "default", (("app", "b"),)))
    # The shared parts are the same mappings, holding the same objects: kept as encodings.
    assert a[ENDPOINT][0] is b[ENDPOINT][0] and a[CLUSTER][0] is b[CLUSTER][0]
    assert a[ENDPOINT][0] and a[CLUSTER][0]
    for held in (*a[ENDPOINT][0].values(), *a[CLUSTER][0].values()):
        assert isinstance(held, Encoded)
    # and each is the encoding of what the pure generator makes (the goldens check the fields)
    service = mesh.services["reviews.default.svc.cluster.local"]
    made = service_clusters(service, mesh.destination_rules.get(service.host))
    assert made and all(a[CLUSTER][0][n].value == m.SerializeToString(deterministic=True) for n, m in made.items())


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
    from pilot.config.yaml_text import load_text

    mesh = build_mesh(load_text(SIDECARS).objects)
    loose = generate(mesh, ProxyClass(ProxyKind.SIDECAR, "loose"))
    strict = generate(mesh, ProxyClass(ProxyKind.SIDECAR, "strict"))
    assert set(loose[CLUSTER]) == set(strict[CLUSTER])  # same visible services (shared view)
    pairs = [("loose", loose), ("strict", strict)]
    vhosts = {ns: [v.name for v in r[ROUTE]["outbound"].virtual_hosts] for ns, r in pairs}
    assert len(vhosts["strict"]) == len(vhosts["loose"]) + 1, vhosts  # REGISTRY_ONLY's catch-all


SENDERS = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.default.svc.cluster.local]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.6.1}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: default}
spec:
  hosts: [api]
  http:
  - {name: canary, match: [{sourceLabels: {env: canary}}], route: [{destination: {host: api}}]}
  - {name: shop, match: [{sourceNamespace: shop}], route: [{destination: {host: api}}]}
  - {name: all, route: [{destination: {host: api}}]}
"""


def test_shared_route_memo_keeps_sender_specific_routes_apart() -> None:
    from pilot.config.yaml_text import load_text

    mesh = build_mesh(load_text(SENDERS).objects)  # one mesh object: every class below shares its memo

    def route_names(namespace: str, **labels: str) -> list[str]:
        out = generate(mesh, ProxyClass(ProxyKind.SIDECAR, namespace, tuple(sorted(labels.items()))))
        vhost = next(v for v in out[ROUTE]["outbound"].virtual_hosts if v.name.startswith("api."))
        return [r.name.split(".")[0] for r in vhost.routes]

    assert route_names("default", env="canary", app="x") == ["canary", "all"]
    assert route_names("default", app="x") == ["all"]
    assert route_names("shop", env="prod") == ["shop", "all"]
    assert route_names("shop", env="canary") == ["canary", "shop", "all"]
    assert route_names("default", env="canary") == ["canary", "all"]
