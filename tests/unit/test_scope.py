"""Host resolution, exportTo, Sidecar egress scoping and DestinationRule lookup, as Istio documents them."""

from __future__ import annotations

from typing import Any

import pytest

from pilot.api import ApiObject, InvalidObjectError, parse_object
from pilot.model import hosts
from pilot.model.build import build_mesh
from pilot.model.mesh import MeshSnapshot
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate
from pilot.translate.scope import proxy_view
from pilot.translate.visibility import destination_rule_for, visible_mesh
from pilot.xds import typeurls


def obj(kind: str, name: str, spec: dict[str, Any], namespace: str = "default", ts: str | None = None) -> ApiObject:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if ts:
        meta["creationTimestamp"] = ts
    return parse_object({"apiVersion": "networking.istio.io/v1", "kind": kind, "metadata": meta, "spec": spec})


def service(name: str, namespace: str, export_to: list[str] | None = None) -> ApiObject:
    spec: dict[str, Any] = {
        "hosts": [f"{name}.{namespace}.svc.cluster.local"],
        "resolution": "STATIC",
        "ports": [{"number": 80, "name": "http"}],
        "endpoints": [{"address": "127.0.0.80", "labels": {"version": "v1"}}],
    }
    if export_to is not None:
        spec["exportTo"] = export_to
    return obj("ServiceEntry", name, spec, namespace)


def sidecar_proxy(namespace: str, **labels: str) -> ProxyClass:
    return ProxyClass(ProxyKind.SIDECAR, namespace, labels=tuple(sorted(labels.items())))


def seen(mesh: MeshSnapshot, proxy: ProxyClass) -> list[str]:
    view = proxy_view(mesh, proxy)
    return list(visible_mesh(mesh, proxy.namespace, view.egress).services)


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("*", "a.b.c", True),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.com", "*.example.com", True),
        ("*.example.com", "*.com", False),
        ("a.example.com", "b.example.com", False),
    ],
)
def test_host_matches(pattern: str, host: str, expected: bool) -> None:
    assert hosts.host_matches(pattern, host) is expected


def test_export_set_and_visibility() -> None:
    assert hosts.export_set([], "a") == {"*"}
    assert hosts.export_set(["."], "a") == {"a"}
    assert hosts.visible_to(hosts.export_set([".", "b"], "a"), "b")
    assert not hosts.visible_to(hosts.export_set(["~"], "a"), "a")
    assert hosts.split_scoped_host("./x.com", "ns") == ("ns", "x.com")
    assert hosts.split_scoped_host("x.com", "ns") == ("*", "x.com")


@pytest.mark.parametrize(
    ("export_to", "reason"),
    [
        (["*", "a"], "'*' cannot be combined with other entries"),
        (["a", "a"], "duplicate entry 'a'"),
        (["Not_A_Namespace"], "is not '.', '*', '~' or a namespace name"),
    ],
)
def test_export_to_validation(export_to: list[str], reason: str) -> None:
    with pytest.raises(InvalidObjectError) as err:
        service("x", "default", export_to)
    assert err.value.issues[0].path == "spec.exportTo"
    assert reason in err.value.issues[0].message


def test_service_export_to_limits_which_namespaces_get_clusters() -> None:
    mesh = build_mesh([service("open", "a"), service("private", "a", ["."]), service("shared", "a", ["b"])])
    assert seen(mesh, sidecar_proxy("a")) == ["open.a.svc.cluster.local", "private.a.svc.cluster.local"]
    assert seen(mesh, sidecar_proxy("b")) == ["open.a.svc.cluster.local", "shared.a.svc.cluster.local"]
    out = generate(mesh, sidecar_proxy("c"))
    assert [n for n in out[typeurls.CLUSTER] if "private" in n or "shared" in n] == []
    assert [n for n in out[typeurls.ENDPOINT] if "private" in n or "shared" in n] == []


def scope(
    name: str, namespace: str, egress: list[str], selector: dict[str, str] | None = None, ts: str = ""
) -> ApiObject:
    spec: dict[str, Any] = {"egress": [{"hosts": egress}]}
    if selector:
        spec["workloadSelector"] = {"labels": selector}
    return obj("Sidecar", name, spec, namespace, ts or None)


def test_sidecar_precedence_selector_then_namespace_then_root_default() -> None:
    services = [service("one", "a"), service("two", "a"), service("three", "b"), service("tools", "istio-system")]
    objs = [
        *services,
        scope("narrow", "a", ["./one.a.svc.cluster.local"], {"app": "x"}),
        scope("default", "a", ["./*"]),
        scope("default", "istio-system", ["./*", "istio-system/*"]),
    ]
    mesh = build_mesh(objs)
    assert seen(mesh, sidecar_proxy("a", app="x")) == ["one.a.svc.cluster.local"]
    assert seen(mesh, sidecar_proxy("a", app="y")) == ["one.a.svc.cluster.local", "two.a.svc.cluster.local"]
    # No Sidecar in b: the root namespace's default applies, with "." meaning b.
    assert seen(mesh, sidecar_proxy("b")) == ["three.b.svc.cluster.local", "tools.istio-system.svc.cluster.local"]


def test_sidecar_egress_validation() -> None:
    with pytest.raises(InvalidObjectError) as err:
        obj("Sidecar", "s", {"egress": [{"hosts": ["reviews.default.svc.cluster.local"]}, {"hosts": ["*/*"]}]})
    assert str(err.value.issues[0]).startswith("spec.egress[0].hosts[0]: 'reviews.default.svc.cluster.local' must be")
    with pytest.raises(InvalidObjectError) as err:
        obj("Sidecar", "s", {"egress": [{"hosts": ["*/*"]}, {"port": {"number": 80}, "hosts": ["*/*"]}]})
    assert [str(i) for i in err.value.issues] == [
        "spec.egress[0].port: the egress listener without a port must be the last one"
    ]


def rule(name: str, namespace: str, host: str, ts: str, **spec: Any) -> ApiObject:
    return obj("DestinationRule", name, {"host": host, **spec}, namespace, ts)


def test_destination_rule_lookup_path_and_export_to() -> None:
    svc = service("api", "svc-ns")
    objs = [
        svc,
        rule("root", "istio-system", "*.svc.cluster.local", "2024-01-01T00:00:00Z"),
        rule("service-ns", "svc-ns", "api", "2024-01-02T00:00:00Z"),
        rule("client-ns", "client", "api.svc-ns.svc.cluster.local", "2024-01-03T00:00:00Z"),
        rule("private", "svc-ns", "*.svc-ns.svc.cluster.local", "2024-01-04T00:00:00Z", exportTo=["."]),
    ]
    mesh = build_mesh(objs)
    service_model = mesh.services["api.svc-ns.svc.cluster.local"]

    def chosen(namespace: str) -> str | None:
        found = destination_rule_for(mesh, namespace, service_model)
        return found.name if found else None

    assert chosen("client") == "client-ns"  # the client's own namespace first
    assert chosen("elsewhere") == "service-ns"  # then the service's namespace
    assert chosen("svc-ns") == "service-ns"  # exact host beats the (visible here) wildcard
    without_service_ns = build_mesh([o for o in objs if o.metadata.name != "service-ns"])
    found = destination_rule_for(without_service_ns, "elsewhere", service_model)
    assert found is not None and found.name == "root"  # then the root namespace


def test_destination_rules_merge_within_a_namespace_oldest_first() -> None:
    objs = [
        service("api", "default"),
        rule("a", "default", "api", "2024-01-01T00:00:00Z", subsets=[{"name": "v1", "labels": {"version": "v1"}}]),
        rule(
            "b",
            "default",
            "api",
            "2024-01-02T00:00:00Z",
            trafficPolicy={"loadBalancer": {"simple": "RANDOM"}},
            subsets=[{"name": "v1", "labels": {"version": "x"}}, {"name": "v2", "labels": {"version": "v2"}}],
        ),
    ]
    mesh = build_mesh(objs)
    merged = mesh.destination_rules["api.default.svc.cluster.local"]
    assert (merged.name, sorted(merged.subsets), dict(merged.subsets["v1"].labels)) == (
        "a",
        ["v1", "v2"],
        {"version": "v1"},
    )
    (note,) = [w for w in mesh.warnings if "merged into" in w]
    assert "subsets ['v1'] are already defined" in note and "trafficPolicy is ignored" in note


def test_virtual_service_export_to_and_conflicts() -> None:
    def vs(name: str, namespace: str, subset: str, ts: str, **spec: Any) -> ApiObject:
        route = [{"destination": {"host": "api.default.svc.cluster.local", "subset": subset}}]
        return obj(
            "VirtualService",
            name,
            {"hosts": ["api.default.svc.cluster.local"], "http": [{"route": route}], **spec},
            namespace,
            ts,
        )

    objs = [
        service("api", "default"),
        vs("old-private", "team", "v1", "2024-01-01T00:00:00Z", exportTo=["."]),
        vs("new-public", "default", "v2", "2024-01-02T00:00:00Z"),
    ]
    mesh = build_mesh(objs)
    assert visible_mesh(mesh, "team").virtual_services["api.default.svc.cluster.local"].name == "old-private"
    assert visible_mesh(mesh, "other").virtual_services["api.default.svc.cluster.local"].name == "new-public"
    assert any(
        "VirtualService default/new-public: host api.default.svc.cluster.local is already routed" in w
        for w in mesh.warnings
    )
    disjoint = build_mesh([*objs[:2], vs("new-public", "default", "v2", "2024-01-02T00:00:00Z", exportTo=["."])])
    assert not any("already routed" in w for w in disjoint.warnings)  # no namespace sees both
