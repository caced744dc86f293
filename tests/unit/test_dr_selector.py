"""DestinationRule workloadSelector: which proxies a selected rule reaches, and how it layers."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2

from pilot.api import ApiObject, parse_object
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate.generate import generate
from pilot.translate.visibility import destination_rule_for
from pilot.xds import typeurls

HOST = "pay.example.com"
SE = parse_object({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                   "metadata": {"name": "pay", "namespace": "shop"},
                   "spec": {"hosts": [HOST], "ports": [{"number": 80, "name": "http"}], "resolution": "DNS"}})


def rule(name: str, spec: dict[str, Any], namespace: str = "shop") -> ApiObject:
    return parse_object({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                         "metadata": {"name": name, "namespace": namespace}, "spec": {"host": HOST, **spec}})


BASE = rule("pay", {"trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
                    "subsets": [{"name": "v1", "labels": {"version": "v1"}}]})
BILLING = rule("pay-billing", {"workloadSelector": {"matchLabels": {"app": "billing"}},
                               "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
                               "subsets": [{"name": "canary", "labels": {"version": "v2"}}]})


def lookup(namespace: str, labels: dict[str, str], *rules: ApiObject) -> Any:
    mesh = build_mesh([SE, *rules])
    return destination_rule_for(mesh, namespace, mesh.services[HOST], labels)


def test_match_labels_is_the_selector_field_as_in_istio() -> None:
    assert BILLING.warnings == ()
    wrong = rule("x", {"workloadSelector": {"labels": {"app": "billing"}}})
    assert [str(w) for w in wrong.warnings] == ["spec.workloadSelector.labels: unknown field, ignored"]


def test_a_selected_proxy_gets_the_selected_rule_layered_over_the_namespace_rule() -> None:
    found = lookup("shop", {"app": "billing"}, BASE, BILLING)
    assert found.name == "pay-billing"
    assert found.policy.load_balancer.simple == "ROUND_ROBIN"  # its own policy
    assert sorted(found.subsets) == ["canary", "v1"]  # the base rule's subsets stay usable


def test_a_selected_rule_without_a_policy_keeps_the_base_policy() -> None:
    subsets_only = rule("pay-billing", {"workloadSelector": {"matchLabels": {"app": "billing"}},
                                        "subsets": [{"name": "canary", "labels": {"version": "v2"}}]})
    found = lookup("shop", {"app": "billing"}, BASE, subsets_only)
    assert found.policy.load_balancer.simple == "LEAST_REQUEST"


def test_unselected_proxies_and_other_namespaces_get_the_plain_rule() -> None:
    assert lookup("shop", {"app": "frontend"}, BASE, BILLING).name == "pay"
    assert lookup("other", {"app": "billing"}, BASE, BILLING).name == "pay"  # selectors stay in their namespace
    assert lookup("shop", {"app": "frontend"}, BILLING) is None  # nothing else applies


def test_export_to_beyond_its_namespace_is_reported_as_ignored() -> None:
    exported = rule("x", {"workloadSelector": {"matchLabels": {"app": "a"}}, "exportTo": ["*"]})
    assert [str(w) for w in exported.warnings] == [
        "spec.exportTo: a rule with a workloadSelector applies in its own namespace only; exportTo is ignored"]


def test_two_proxies_of_one_namespace_get_their_own_clusters_from_one_shared_mesh() -> None:
    mesh = build_mesh([SE, BASE, BILLING])
    billing = ProxyClass(ProxyKind.SIDECAR, "shop", (("app", "billing"),))
    frontend = ProxyClass(ProxyKind.SIDECAR, "shop", (("app", "frontend"),))
    name = f"outbound|80||{HOST}"
    for proxy, policy in ((billing, cluster_pb2.Cluster.ROUND_ROBIN), (frontend, cluster_pb2.Cluster.LEAST_REQUEST),
                          (billing, cluster_pb2.Cluster.ROUND_ROBIN)):
        clusters = generate(mesh, proxy)[typeurls.CLUSTER]
        assert clusters[name].lb_policy == policy, proxy
    assert f"outbound|80|canary|{HOST}" in generate(mesh, billing)[typeurls.CLUSTER]
    assert f"outbound|80|canary|{HOST}" not in generate(mesh, frontend)[typeurls.CLUSTER]
