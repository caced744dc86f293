"""What a routing edit patches from the last mesh version instead of computing again: the visible
mesh of a namespace (`pilot.translate.generate._visible`) and the outbound route configuration
(`pilot.translate.routes.carried_outbound_config`). Each must equal what computing afresh gives,
byte for byte, and the patch must rebuild the virtual hosts of the edited hosts alone."""

from __future__ import annotations

from typing import Any

import pytest

from pilot.config.store import ConfigStore
from pilot.config.yaml_text import load_text
from pilot.model.build import build_mesh
from pilot.model.conversions import Conversions
from pilot.model.mesh import MeshSnapshot
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import routes
from pilot.translate.encoded import Encoded, as_message
from pilot.translate.generate import _seen, generate_endpoints, generate_parts
from pilot.translate.scope import proxy_view
from pilot.xds.typeurls import ROUTE
from tests.unit.test_route_fast_path import CLASSES, mesh_text
from tests.unit.test_visible_patch import seen_and_fresh

# Plain, uncaptured sidecars: the classes with an outbound route configuration of their own.
PLAIN = [k for k in CLASSES if k.kind == ProxyKind.SIDECAR and not k.captured]
WEB = "web.shop.svc.cluster.local"
BIG_BODY = "x" * 5000  # over Envoy's 4 KB default for direct-response bodies

DIRECT = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: cart, namespace: shop}}
spec:
  hosts: [cart.shop.svc.cluster.local]
  http:
  - directResponse: {{status: 503, body: {{string: "{body}"}}}}
"""


class Builds:
    """Successive meshes built as pilot builds them (conversions and generated parts carried)."""

    def __init__(self) -> None:
        self.conversions, self.carry = Conversions(), Conversions()
        self.store = ConfigStore()  # keeps unchanged objects as the same instances

    def mesh(self, text: str, *, after_partial: bool = False) -> MeshSnapshot:
        """The next mesh version; `after_partial`: the last one was only partly generated (as by a
        fast-path push), so the carry keeps what that generation did not ask for."""
        self.carry.advance(complete=not after_partial)
        loaded = load_text(text)
        assert not loaded.errors, loaded.errors
        self.store.replace_source("f", list(loaded.objects))
        return build_mesh(self.store.objects(), conversions=self.conversions, carry=self.carry)


def route_bytes(mesh: MeshSnapshot, key: ProxyClass) -> dict[str, bytes]:
    (part,) = generate_parts(mesh, key)[ROUTE]
    return {name: m.SerializeToString(deterministic=True) for name, m in part.items()}


def fresh_route_bytes(text: str, key: ProxyClass) -> dict[str, bytes]:
    """The same config built and generated with nothing carried from an earlier version."""
    return route_bytes(build_mesh(list(load_text(text).objects)), key)


def test_a_routing_edit_keeps_the_visible_services_and_rules_and_equals_a_fresh_narrowing() -> None:
    builds = Builds()
    first = builds.mesh(mesh_text())
    before = {k: seen_and_fresh(first, k)[0] for k in CLASSES}
    edited = builds.mesh(mesh_text(web_weight=70))
    assert edited.services is first.services and edited.scoping is not first.scoping  # what lets it apply
    for key in CLASSES:
        seen, fresh = seen_and_fresh(edited, key)
        assert seen == fresh, key
        assert seen.virtual_services[WEB] is not before[key].virtual_services[WEB], key
        if key.namespace != "narrow":  # a Sidecar's egress host list narrows afresh
            assert seen.services is before[key].services, key
            assert seen.destination_rules is before[key].destination_rules, key


@pytest.mark.parametrize("edit", [
    {"web_weight": 70},
    {"web_weight": 70, "export": '"."'},  # the rule leaves every namespace but its own
    {"cart_rule": False},  # a rule removed: its host falls back to the default route
])
def test_a_routing_edit_patches_each_route_configuration_in_its_hosts_alone(
    edit: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = Builds()
    first = builds.mesh(mesh_text())
    old = {key: route_bytes(first, key) for key in PLAIN}
    asked: list[str] = []
    real = routes.vhost_routes

    def counting(mesh: MeshSnapshot, service: Any, *args: Any) -> Any:
        asked.append(service.host)
        return real(mesh, service, *args)

    fresh = {key: fresh_route_bytes(mesh_text(**edit), key) for key in PLAIN}
    monkeypatch.setattr(routes, "vhost_routes", counting)
    edited = builds.mesh(mesh_text(**edit))
    patched = {key: route_bytes(edited, key) for key in PLAIN}
    monkeypatch.undo()
    assert patched == fresh
    changed = WEB if "web_weight" in edit else "cart.shop.svc.cluster.local"
    # Only the edited host's virtual host was made again, once per route configuration that
    # changed; a full generation would have asked for web, cart and n in each of them.
    assert set(asked) == {changed}, asked
    assert sum(patched[k] != old[k] for k in PLAIN) > 0
    assert len(asked) <= len({(k.namespace, k.labels) for k in PLAIN})  # at most once per configuration


@pytest.mark.parametrize("moved", [1, 2])  # endpoints moved once, twice, before the routing edit
def test_a_routing_edit_after_endpoint_moves_still_patches_in_its_hosts_alone(
    moved: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint move makes new Service objects (here every service's endpoint moves), which no
    virtual host reads: the routing edit that follows still patches the last configuration, so
    only the edited host is made again, and the bytes equal a fresh generation. Before, the first
    routing edit after any endpoint change generated whole configurations again."""
    builds = Builds()
    first = builds.mesh(mesh_text())
    for key in PLAIN:
        route_bytes(first, key)
    for step in range(1, moved + 1):
        endpoints = builds.mesh(mesh_text(moved=step), after_partial=step > 1)
        assert endpoints.services[WEB] is not first.services[WEB]  # what the patch must look past
        for key in PLAIN:  # as pilot's endpoint fast path: new endpoints, routes left as they are
            generate_endpoints(endpoints, key)
    asked: list[str] = []
    skeletons: list[object] = []
    real_routes, real_skeleton = routes.vhost_routes, routes._make_skeleton

    def counting(mesh: MeshSnapshot, service: Any, *args: Any) -> Any:
        asked.append(service.host)
        return real_routes(mesh, service, *args)

    def skeleton(mesh: MeshSnapshot) -> Any:
        skeletons.append(mesh)
        return real_skeleton(mesh)

    text = mesh_text(moved=moved, web_weight=70)
    fresh = {key: fresh_route_bytes(text, key) for key in PLAIN}
    monkeypatch.setattr(routes, "vhost_routes", counting)
    monkeypatch.setattr(routes, "_make_skeleton", skeleton)
    edited = builds.mesh(text, after_partial=True)
    patched = {key: route_bytes(edited, key) for key in PLAIN}
    monkeypatch.undo()
    assert patched == fresh
    assert not skeletons
    assert set(asked) == {WEB}, asked


def test_a_port_change_is_not_patched_over() -> None:
    """A service whose ports changed (what virtual hosts do read) is not an endpoint move: the
    configuration is made again, and equals a fresh generation."""
    builds = Builds()
    first = builds.mesh(mesh_text())
    for key in PLAIN:
        route_bytes(first, key)
    text = mesh_text(web_weight=70).replace("number: 8080, name: http,", "number: 9090, name: http,", 1)
    assert text != mesh_text(web_weight=70)
    edited = builds.mesh(text)
    assert {key: route_bytes(edited, key) for key in PLAIN} == {key: fresh_route_bytes(text, key) for key in PLAIN}


def test_with_a_carry_configurations_are_bytes_made_of_virtual_hosts_encoded_once(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pilot keeps an outbound configuration as its encoding (`Encoded`), not as a message (~2.1 MB
    per namespace at 1,000 services), equal byte for byte to the message generated afresh. It is
    joined from its virtual hosts' encodings, and a virtual host identical in several namespaces'
    configurations is encoded once."""
    encoded: list[str] = []
    real = routes._entry

    def counting(vhost: Any) -> Any:
        encoded.append(vhost.name)
        return real(vhost)

    monkeypatch.setattr(routes, "_entry", counting)
    mesh = Builds().mesh(mesh_text())
    parts = {key: generate_parts(mesh, key)[ROUTE][0]["outbound"] for key in PLAIN}
    monkeypatch.undo()
    assert all(isinstance(p, Encoded) for p in parts.values())
    assert {k: route_bytes(mesh, k) for k in PLAIN} == {k: fresh_route_bytes(mesh_text(), k) for k in PLAIN}
    configs = {id(p): as_message(p) for p in parts.values()}
    assert len(configs) >= 3  # several namespaces: something to share
    for name in {v.name for c in configs.values() for v in c.virtual_hosts if ".svc." in v.name}:
        distinct = {v.SerializeToString(deterministic=True) for c in configs.values() for v in c.virtual_hosts
                    if v.name == name}
        assert encoded.count(name) == len(distinct), name
    assert sum(encoded.count(n) for n in set(encoded) if ".svc." in n) < sum(
        len([v for v in c.virtual_hosts if ".svc." in v.name]) for c in configs.values())


def test_a_large_direct_body_raises_the_limit_and_leaving_lowers_it_again() -> None:
    """Envoy refuses a body over 4 KB unless the route configuration allows it: the patched
    configuration sets the limit when an edit brings such a body and clears it when it goes."""
    base = mesh_text(cart_rule=False)
    builds = Builds()
    builds.mesh(base + "---\n" + DIRECT.format(body="short"))
    key = PLAIN[0]
    for body in (BIG_BODY, "short again", BIG_BODY):
        text = base + "---\n" + DIRECT.format(body=body)
        mesh = builds.mesh(text)
        (part,) = generate_parts(mesh, key)[ROUTE]
        assert as_message(part["outbound"]).HasField("max_direct_response_body_size_bytes") == (body == BIG_BODY)
        assert route_bytes(mesh, key) == fresh_route_bytes(text, key), body


def test_an_edit_leaving_routing_alone_keeps_the_very_route_configuration() -> None:
    """A rebuild where no service, DestinationRule or routing rule a configuration reads changed
    (here a Sidecar for another namespace) hands back the last configuration object, so its
    serialized bytes are reused as they are."""
    builds = Builds()
    first = builds.mesh(mesh_text())
    before = {k: generate_parts(first, k)[ROUTE][0]["outbound"] for k in PLAIN}
    again = builds.mesh(mesh_text() + "---\n" + OTHER_SIDECAR)
    assert again.scoping is not first.scoping
    for key in PLAIN:
        assert generate_parts(again, key)[ROUTE][0]["outbound"] is before[key], key


OTHER_SIDECAR = """\
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: default, namespace: elsewhere}
spec:
  egress: [{hosts: ["./*"]}]
"""


TRICKY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: shop, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local, cart.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 8080, name: http-alt, protocol: HTTP}]
  endpoints: [{address: 10.1.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: data}
spec:
  hosts: [db.data.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.1.0.2}]
---
# Full names that collide with short forms: a bare "web" and a dotted "cart.shop".
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external, namespace: other}
spec:
  hosts: [web, cart.shop]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: by-namespace, namespace: data}
spec:
  hosts: [db.data.svc.cluster.local]
  http:
  - match: [{sourceNamespace: shop}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: db.data.svc.cluster.local}}]
  - route: [{destination: {host: db.data.svc.cluster.local}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: by-label, namespace: shop}
spec:
  hosts: [cart.shop.svc.cluster.local]
  http:
  - match: [{sourceLabels: {tier: a}}]
    route: [{destination: {host: cart.shop.svc.cluster.local, port: {number: 8080}}}]
  - route: [{destination: {host: cart.shop.svc.cluster.local, port: {number: WEIGHT}}}]
"""

TRICKY_CLASSES = [ProxyClass(ProxyKind.SIDECAR, ns, labels) for ns in ("shop", "data", "other", "empty")
                  for labels in ((("app", "x"),), (("app", "x"), ("tier", "a")))]


@pytest.mark.parametrize("edit", ["routing", "services"])
def test_namespaces_share_a_skeleton_yet_each_gets_exactly_its_own_configuration(edit: str) -> None:
    """The carried configurations of several namespaces (built from one shared skeleton plus each
    namespace's own virtual hosts and sender-selecting rules) equal fresh generations byte for
    byte: bare short names only in their own namespace and never over a full name, a dotted full
    name winning over a short form, sourceNamespace and sourceLabels rules per sender. So do
    they after a routing edit (patched) and after a service change (built again)."""
    builds = Builds()
    first = TRICKY.replace("WEIGHT", "80")
    mesh = builds.mesh(first)
    for key in TRICKY_CLASSES:
        assert route_bytes(mesh, key) == fresh_route_bytes(first, key), key
    by_namespace = {k.namespace: as_message(generate_parts(mesh, k)[ROUTE][0]["outbound"]) for k in TRICKY_CLASSES}
    domains = {ns: {v.name: set(v.domains) for v in c.virtual_hosts} for ns, c in by_namespace.items()}
    shop_web = "web.shop.svc.cluster.local"
    assert "db" in domains["data"]["db.data.svc.cluster.local:80"]  # a bare short name in its own namespace
    assert "db" not in domains["shop"]["db.data.svc.cluster.local:80"]  # and nowhere else
    assert "web:8080" in domains["shop"][f"{shop_web}:8080"]
    assert not {"web", "web:80"} & domains["shop"][f"{shop_web}:80"]  # the full name "web" keeps them
    assert {"web", "web:80"} <= domains["shop"]["web:80"]
    assert not {"cart.shop", "cart.shop:80"} & domains["other"]["cart.shop.svc.cluster.local:80"]
    second = (TRICKY.replace("WEIGHT", "8080") if edit == "routing"
              else TRICKY.replace("10.1.0.2", "10.1.0.3").replace("WEIGHT", "80"))
    mesh = builds.mesh(second)
    for key in TRICKY_CLASSES:
        assert route_bytes(mesh, key) == fresh_route_bytes(second, key), (edit, key)


def test_after_a_routing_edit_namespaces_seeing_the_same_rules_share_one_patched_view(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each namespace's visible mesh is patched from its last one; namespaces that saw one shared
    view match the rules to hosts once between them, and still share one view afterwards."""
    from pilot.translate import visibility

    builds = Builds()
    first = builds.mesh(mesh_text())
    alike = [k for k in PLAIN if k.namespace in ("shop", "data", "other")]
    assert len({k.namespace for k in alike}) == 3
    assert len({id(seen_and_fresh(first, k)[0]) for k in alike}) == 1  # one view to start with
    matched: list[int] = []
    real = visibility.routes_by_host

    def counting(rules: Any, services: Any) -> Any:
        matched.append(len(services))
        return real(rules, services)

    monkeypatch.setattr(visibility, "routes_by_host", counting)
    edited = builds.mesh(mesh_text(web_weight=70))
    views = {k: _seen(edited, k, proxy_view(edited, k)) for k in alike}
    monkeypatch.undo()
    assert len(matched) == 1, matched
    assert len({id(s) for s in views.values()}) == 1
    for key, view in views.items():
        seen, fresh = seen_and_fresh(edited, key)
        assert seen is view and seen == fresh, key


def test_the_flat_generate_hands_over_messages_even_with_a_carry() -> None:
    """`generate` (tools, tests, custom generators wrapping it in pilot) reads fields: it parses a
    configuration that `generate_parts` hands over as its encoding."""
    from envoy.config.route.v3 import route_pb2

    from pilot.translate.generate import generate

    mesh = Builds().mesh(mesh_text())
    for key in PLAIN:
        config = generate(mesh, key)[ROUTE]["outbound"]
        assert isinstance(config, route_pb2.RouteConfiguration), key
        assert config.SerializeToString(deterministic=True) == route_bytes(mesh, key)["outbound"]
