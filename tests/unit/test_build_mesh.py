"""build_mesh: indexing, selection, port resolution and deterministic conflict resolution."""

from __future__ import annotations

import dataclasses
import gc
import itertools
from typing import Any

import pytest

from pilot.api import ApiObject, parse_object
from pilot.model.build import build_mesh


def obj(
    kind: str, name: str, spec: dict[str, Any], namespace: str = "default", created: str | None = None
) -> ApiObject:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if created:
        meta["creationTimestamp"] = created
    return parse_object({"apiVersion": "networking.istio.io/v1", "kind": kind, "metadata": meta, "spec": spec})


def workload(name: str, address: str, labels: dict[str, str], namespace: str = "default", **spec: Any) -> ApiObject:
    return obj("WorkloadEntry", name, {"address": address, "labels": labels, **spec}, namespace)


REVIEWS = "reviews.default.svc.cluster.local"
SE = obj(
    "ServiceEntry",
    "reviews",
    {
        "hosts": [REVIEWS],
        "resolution": "STATIC",
        "ports": [
            {"number": 9080, "name": "http", "protocol": "HTTP"},
            {"number": 9090, "name": "grpc-api", "targetPort": 19090},
        ],
        "workloadSelector": {"labels": {"app": "reviews"}},
    },
)
V1 = workload("v1", "127.0.0.11", {"app": "reviews", "version": "v1"}, ports={"http": 9081}, serviceAccount="rev")
V2 = workload("v2", "127.0.0.12", {"app": "reviews", "version": "v2"})
OTHER_NS = workload("v3", "127.0.0.13", {"app": "reviews"}, namespace="other")


def test_workload_lookup_for_the_cli() -> None:
    mesh = build_mesh([SE, V1])
    wl = mesh.workload("default", "v1")
    assert wl is not None
    assert (wl.address, dict(wl.labels), wl.service_account, dict(wl.ports)) == (
        "127.0.0.11",
        {"app": "reviews", "version": "v1"},
        "rev",
        {"http": 9081},
    )
    assert mesh.workload("default", "nope") is None


def test_selector_picks_same_namespace_workloads_and_resolves_ports() -> None:
    mesh = build_mesh([SE, V1, V2, OTHER_NS])
    service = mesh.service(REVIEWS)
    assert service is not None
    assert [p.number for p in service.ports] == [9080, 9090]
    assert [(p.protocol, p.is_http) for p in service.ports] == [("HTTP", True), ("GRPC", True)]
    got = [(e.address, dict(e.ports), e.workload) for e in service.endpoints]
    assert got == [
        # WorkloadEntry port by name wins, then targetPort, then the service port.
        ("127.0.0.11", {"http": 9081, "grpc-api": 19090}, "default/v1"),
        ("127.0.0.12", {"http": 9080, "grpc-api": 19090}, "default/v2"),
    ]
    assert [s.host for s in mesh.services_selecting("default", {"app": "reviews", "x": "y"})] == [REVIEWS]
    assert mesh.services_selecting("other", {"app": "reviews"}) == ()


def _behind(view: Any) -> Any:
    """The dict a read-only view shows (what CPython's collector sees it refer to)."""
    (mapping,) = gc.get_referents(view)
    return mapping


def test_equal_label_and_port_maps_share_one_dict_and_stay_read_only() -> None:
    twin = workload("v1b", "127.0.0.14", {"version": "v1", "app": "reviews"}, ports={"http": 9081})
    mesh = build_mesh([SE, V1, V2, twin, OTHER_NS])
    one, two, other = mesh.workload("default", "v1"), mesh.workload("default", "v1b"), mesh.workload("default", "v2")
    elsewhere = mesh.workload("other", "v3")
    assert one is not None and two is not None and other is not None and elsewhere is not None
    # Equal content, given in another order: one sorted dict behind both views.
    assert _behind(one.labels) is _behind(two.labels) and list(one.labels) == ["app", "version"]
    assert _behind(one.ports) is _behind(two.ports) and dict(one.ports) == {"http": 9081}
    assert _behind(other.labels) is not _behind(one.labels) and other.labels["version"] == "v2"
    assert not other.ports and other.ports is elsewhere.ports  # no ports given: the one empty map
    with pytest.raises(TypeError):
        one.labels["version"] = "v9"  # type: ignore[index]
    service = mesh.service(REVIEWS)
    assert service is not None
    v1_ports = [e.ports for e in service.endpoints if e.workload in ("default/v1", "default/v1b")]
    assert len(v1_ports) == 2 and _behind(v1_ports[0]) is _behind(v1_ports[1])


def test_maps_share_only_when_keys_and_values_are_exactly_strings_or_integers() -> None:
    from pilot.model.mesh import frozen_map

    assert _behind(frozen_map({"a": 1})) is _behind(frozen_map({"a": 1}))
    assert frozen_map({}) is frozen_map(None)
    flag = frozen_map({"a": True})  # equal to {"a": 1}, but a bool stays a bool
    assert _behind(flag) is not _behind(frozen_map({"a": 1})) and type(flag["a"]) is bool
    assert type(frozen_map({"a": 1})["a"]) is int
    nested = {"a": (1, 2)}
    assert _behind(frozen_map(nested)) is not _behind(frozen_map(nested)) and frozen_map(nested) == nested


def test_a_shared_map_goes_when_its_last_view_does() -> None:
    from pilot.model import mesh as m

    key = (("test-only", "x"),)
    view = m.frozen_map(dict(key))
    assert key in m._SHARED_MAPS
    del view
    assert key not in m._SHARED_MAPS  # freed by reference counting, no collection needed


def test_inline_endpoints() -> None:
    se = obj(
        "ServiceEntry",
        "pay",
        {
            "hosts": ["pay.example.com", "pay2.example.com"],
            "resolution": "STATIC",
            "ports": [{"number": 80, "name": "http", "targetPort": 8080}],
            "endpoints": [{"address": "10.0.0.2", "ports": {"http": 9000}, "weight": 5}, {"address": "10.0.0.1"}],
        },
    )
    mesh = build_mesh([se])
    assert sorted(mesh.services) == ["pay.example.com", "pay2.example.com"]
    service = mesh.services["pay.example.com"]
    assert [(e.address, e.ports["http"], e.weight, e.workload) for e in service.endpoints] == [
        ("10.0.0.1", 8080, 1, None),
        ("10.0.0.2", 9000, 5, None),
    ]


def _conflicting() -> list[ApiObject]:
    def se(name: str, port: int, created: str | None, ns: str = "default") -> ApiObject:
        spec = {"hosts": ["dup.example.com"], "ports": [{"number": port, "name": "http"}]}
        return obj("ServiceEntry", name, spec, ns, created)

    return [
        se("newer", 1, "2024-05-01T00:00:00Z"),
        se("oldest", 2, "2024-01-01T00:00:00Z"),
        se("no-timestamp", 3, None),
        se("same-age-b", 4, "2024-02-01T00:00:00Z", "b"),
        se("same-age-a", 5, "2024-02-01T00:00:00Z", "a"),
    ]


def test_conflicts_resolve_the_same_way_in_any_order() -> None:
    results = {
        (build_mesh(order).services["dup.example.com"].name, build_mesh(order).warnings)
        for order in itertools.permutations(_conflicting())
    }
    assert len(results) == 1
    ((winner, warnings),) = results
    assert winner == "oldest"
    assert warnings == tuple(
        f"ServiceEntry {ref}: host dup.example.com is already defined by ServiceEntry default/oldest; "
        "ignored for this host"
        for ref in ("a/same-age-a", "b/same-age-b", "default/newer", "default/no-timestamp")
    )


def test_destination_rule_conflict_and_short_host() -> None:
    first = obj("DestinationRule", "a", {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]})
    second = obj("DestinationRule", "b", {"host": REVIEWS})
    mesh = build_mesh([second, first, SE])
    rule = mesh.destination_rules[REVIEWS]
    assert (rule.name, list(rule.subsets)) == ("a", ["v1"])
    # Istio merges DestinationRules for one host within a namespace; the merge is reported.
    assert any("DestinationRule default/b" in w and "merged into DestinationRule default/a" in w for w in mesh.warnings)


def test_traffic_policy_layers() -> None:
    spec = {
        "host": "reviews",
        "trafficPolicy": {
            "connectionPool": {"tcp": {"connectTimeout": "1s", "maxConnections": 10}},
            "loadBalancer": {"simple": "RANDOM"},
            "portLevelSettings": [{"port": {"number": 9090}, "connectionPool": {"tcp": {"connectTimeout": "2s"}}}],
        },
        "subsets": [{"name": "v1", "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "3s"}}}}],
    }
    rule = build_mesh([obj("DestinationRule", "r", spec)]).destination_rules[REVIEWS]
    pools = {(p, s): rule.policy_for(p, s).connection_pool for p in (9080, 9090) for s in ("", "v1")}
    timeouts = {k: pool.connect_timeout.total_seconds() for k, pool in pools.items()}  # type: ignore[union-attr]
    assert timeouts == {(9080, ""): 1, (9090, ""): 2, (9080, "v1"): 3, (9090, "v1"): 3}
    # Istio: sections replace whole (no field merge), and port-level settings do not inherit.
    assert pools[(9080, "v1")].max_connections is None  # type: ignore[union-attr]
    assert rule.policy_for(9080, "v1").load_balancer.simple == "RANDOM"  # type: ignore[union-attr]
    assert rule.policy_for(9090, "v1").load_balancer is None


def test_virtual_services_are_qualified_and_mesh_only() -> None:
    vs = obj(
        "VirtualService",
        "r",
        {
            "hosts": ["reviews"],
            "http": [
                {
                    "route": [
                        {"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                        {"destination": {"host": "reviews", "subset": "v9"}, "weight": 20},
                    ]
                },
            ],
        },
    )
    gateway_only = obj(
        "VirtualService",
        "g",
        {"hosts": ["other.example.com"], "gateways": ["gw"], "http": [{"route": [{"destination": {"host": "x"}}]}]},
    )
    dr = obj("DestinationRule", "r", {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]})
    mesh = build_mesh([vs, gateway_only, dr, SE])
    assert list(mesh.virtual_services) == [REVIEWS]
    dests = mesh.virtual_services[REVIEWS].http[0].destinations
    assert [(d.host, d.subset, d.weight) for d in dests] == [(REVIEWS, "v1", 80), (REVIEWS, "v9", 20)]
    assert mesh.warnings == (
        "VirtualService default/g: gateway default/gw does not exist",
        f"VirtualService default/r: destination {REVIEWS}: subset 'v9' is not defined by a DestinationRule",
    )


def test_single_destination_gets_all_traffic() -> None:
    vs = obj("VirtualService", "r", {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]})
    assert build_mesh([vs]).virtual_services[REVIEWS].http[0].destinations[0].weight == 100


def test_sidecar_with_selector_beats_namespace_default() -> None:
    default = obj("Sidecar", "default", {"ingress": [{"port": {"number": 80}, "defaultEndpoint": "127.0.0.1:1"}]})
    specific = obj(
        "Sidecar",
        "specific",
        {
            "workloadSelector": {"labels": {"app": "a"}},
            "ingress": [{"port": {"number": 80}, "defaultEndpoint": "127.0.0.1:2"}],
        },
    )
    mesh = build_mesh([default, specific])
    found = mesh.sidecar_for("default", {"app": "a"})
    assert found is not None and found.name == "specific"
    found = mesh.sidecar_for("default", {"app": "b"})
    assert found is not None and found.name == "default"
    assert mesh.sidecar_for("other", {"app": "a"}) is None


def test_snapshot_is_frozen() -> None:
    mesh = build_mesh([SE, V1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        mesh.cluster_domain = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        mesh.services["x"] = mesh.services[REVIEWS]  # type: ignore[index]


def test_cluster_domain_is_used_for_short_names() -> None:
    vs = obj("VirtualService", "r", {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]})
    assert list(build_mesh([vs], cluster_domain="corp.local").virtual_services) == ["reviews.default.svc.corp.local"]


def test_a_routing_edit_keeps_the_merged_destination_rules_and_their_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scoping reruns on any VirtualService edit; the DestinationRule merge, which reads no routing
    rule, is kept (and so is its warning) while the DestinationRules are the same objects."""
    from pilot.model import build_scoping
    from pilot.model.conversions import Conversions

    merges: list[int] = []
    real = build_scoping.merged_destination_rules

    def counting(rules: Any, *args: Any) -> Any:
        merges.append(len(rules))
        return real(rules, *args)

    monkeypatch.setattr(build_scoping, "merged_destination_rules", counting)
    first = obj("DestinationRule", "a", {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]})
    second = obj("DestinationRule", "b", {"host": REVIEWS})

    def route(weight: int) -> ApiObject:
        return obj("VirtualService", "r", {"hosts": ["reviews"], "http": [{"route": [
            {"destination": {"host": "reviews", "subset": "v1"}, "weight": weight},
            {"destination": {"host": "reviews"}, "weight": 100 - weight}]}]})

    memo = Conversions()
    merged = "DestinationRule default/b: merged into DestinationRule default/a"
    before = build_mesh([SE, first, second, route(10)], conversions=memo)
    after = build_mesh([SE, first, second, route(20)], conversions=memo)
    assert merges == [2]  # the edit did not merge again
    assert any(w.startswith(merged) for w in before.warnings) and any(w.startswith(merged) for w in after.warnings)
    assert after.destination_rules[REVIEWS] is before.destination_rules[REVIEWS]
    edited = obj("DestinationRule", "b", {"host": REVIEWS, "subsets": [{"name": "v2", "labels": {"version": "v2"}}]})
    again = build_mesh([SE, first, edited, route(20)], conversions=memo)
    assert merges == [2, 2] and list(again.destination_rules[REVIEWS].subsets) == ["v1", "v2"]
