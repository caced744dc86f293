"""The service registry from Kubernetes, without an API server: the pure conversion
(`pilot.kube.registry`) and the handlers that keep the store in step (`pilot.kube.registry_source`),
fed the JSON objects a watch delivers.

Golden cases: ``kube_registry_goldens/<case>/input.yaml`` holds Kubernetes objects (Service,
EndpointSlice, Pod, through the registry) and Istio objects (through the API parser);
``expected.golden.yaml`` the store objects, the mesh services and the EDS a sidecar gets.
Regenerate with ``pytest tests/unit/test_kube_registry.py --update-goldens`` and review the diff.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from pilot.api import parse_object
from pilot.config.store import ConfigStore
from pilot.debounce import ENDPOINT_KINDS
from pilot.kube.meshconfig import NamespaceSelector
from pilot.kube.namespaces import NamespaceFilter
from pilot.kube.registry import (
    KubeService,
    PodFacts,
    RegistryError,
    ServiceEndpoints,
    agreed_target_ports,
    kube_service,
    port_protocol,
    service_endpoints,
)
from pilot.kube.registry_source import KubeRegistry
from pilot.metrics import PushMetrics
from pilot.model.build import build_mesh
from pilot.model.conversions import Conversions
from pilot.model.diff import endpoints_only
from pilot.model.mesh import MeshSnapshot
from pilot.model.proxy import NodeError, ProxyClass, ProxyKind, pod_of_node
from pilot.push import Pusher
from pilot.translate import generate, generate_endpoints
from pilot.xds.cache import SnapshotCache
from pilot.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE

GOLDENS = Path(__file__).parent / "kube_registry_goldens"
CLIENT = ProxyClass(ProxyKind.SIDECAR, "shop", (("app", "productpage"),), mtls=True)
KUBE_KINDS = ("Service", "EndpointSlice", "Pod")


def read_case(case: Path) -> tuple[dict[str, list[dict[str, Any]]], list[Any]]:
    """(Kubernetes objects by kind, parsed Istio objects) of a case's input."""
    kube: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KUBE_KINDS}
    istio = []
    for doc in yaml.safe_load_all((case / "input.yaml").read_text()):
        if doc is None:
            continue
        if doc["kind"] in kube:
            kube[doc["kind"]].append(doc)
        else:
            istio.append(parse_object(doc))
    return kube, istio


def synced(kube: dict[str, list[dict[str, Any]]], store: ConfigStore | None = None) -> KubeRegistry:
    """A registry that has seen the three lists (copies: handlers may keep what they are given)."""
    registry = KubeRegistry(store or ConfigStore())
    registry.services.replace(copy.deepcopy(kube["Service"]))
    registry.endpoint_slices.replace(copy.deepcopy(kube["EndpointSlice"]))
    registry.pods.replace(copy.deepcopy(kube["Pod"]))
    return registry


def _service_summary(mesh: MeshSnapshot) -> dict[str, Any]:
    return {host: {
        "resolution": s.resolution, "location": s.location, "addresses": list(s.addresses),
        "selector": dict(s.selector) if s.selector is not None else None,
        "ports": [{"name": p.name, "number": p.number, "protocol": p.protocol, "targetPort": p.target_port}
                  for p in s.ports],
        "endpoints": [{"address": e.address, "ports": dict(e.ports), "labels": dict(e.labels),
                       "serviceAccount": e.service_account} for e in s.endpoints],
    } for host, s in mesh.services.items()}


def render(case: Path) -> str:
    kube, istio = read_case(case)
    store = ConfigStore()
    synced(kube, store)
    for obj in istio:
        store.apply(obj)
    mesh = build_mesh(store.objects())
    eds = generate(mesh, CLIENT)[ENDPOINT]
    doc = {
        "storeObjects": [o.to_dict() for o in store.objects() if isinstance(o, KubeService | ServiceEndpoints)],
        "meshServices": _service_summary(mesh),
        "meshWarnings": list(mesh.warnings),
        "endpoints": [json.loads(json_format.MessageToJson(eds[name])) for name in eds],
    }
    return yaml.safe_dump(doc, sort_keys=True, width=120)


@pytest.mark.parametrize("case", sorted(p for p in GOLDENS.iterdir() if p.is_dir()), ids=lambda p: p.name)
def test_golden(case: Path, update_goldens: bool) -> None:
    assert (case / "input.yaml").is_file(), f"{case.name}: golden case without input.yaml"
    golden = case / "expected.golden.yaml"
    actual = render(case)
    if update_goldens:
        golden.write_text(actual)
        return
    assert golden.is_file(), f"{case.name}: no golden; run with --update-goldens"
    assert actual == golden.read_text(), f"{case.name}: output differs from golden"


# -- protocol selection (Istio's pkg/config/kube ConvertProtocol) -------------------------------------

@pytest.mark.parametrize(("port", "expected"), [
    ({"name": "http", "port": 80}, "HTTP"),
    ({"name": "http-web", "port": 80}, "HTTP"),
    ({"name": "HTTP2-x", "port": 80}, "HTTP2"),
    ({"name": "https", "port": 443}, "HTTPS"),
    ({"name": "grpc", "port": 9000}, "GRPC"),
    ({"name": "grpc-web", "port": 9000}, "GRPC-WEB"),
    ({"name": "grpc-webapp", "port": 9000}, "GRPC-WEB"),  # Istio checks the grpc-web prefix first
    ({"name": "tcp-db", "port": 5432}, "TCP"),
    ({"name": "tls-x", "port": 8443}, "TLS"),
    ({"name": "mongo", "port": 27017}, "MONGO"),
    ({"name": "redis-cache", "port": 6379}, "REDIS"),
    ({"name": "mysql", "port": 3306}, "MYSQL"),
    ({"name": "udp-dns", "port": 53}, "UDP"),
    ({"name": "web", "port": 80}, "TCP"),  # unknown: Istio sniffs, the model has TCP
    ({"name": "http_proxy", "port": 80}, "TCP"),  # Istio's egress-only protocol
    ({"port": 80}, "TCP"),
    ({"name": "dns", "port": 53, "protocol": "UDP"}, "UDP"),
    ({"name": "sctp", "port": 53, "protocol": "SCTP"}, "SCTP"),
    ({"name": "http", "port": 53, "protocol": "UDP"}, "UDP"),  # the L4 protocol wins
    ({"name": "tcp", "port": 80, "appProtocol": "http"}, "HTTP"),  # appProtocol before the name
    ({"name": "http", "port": 80, "appProtocol": "kubernetes.io/h2c"}, "HTTP2"),
    ({"name": "http", "port": 80, "appProtocol": "kubernetes.io/ws"}, "HTTP"),
    ({"name": "http", "port": 443, "appProtocol": "kubernetes.io/wss"}, "HTTPS"),
    ({"name": "http", "port": 80, "appProtocol": "example.com/custom"}, "TCP"),
    ({"name": "x", "port": 80, "appProtocol": "grpc"}, "GRPC"),
])
def test_protocol_selection(port: dict[str, Any], expected: str) -> None:
    assert port_protocol(port) == expected


# -- services ---------------------------------------------------------------------------------------

def _svc(spec: dict[str, Any], name: str = "web", **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop", **meta},
            "spec": spec}


def test_cluster_ip_service_is_a_mesh_internal_entry_at_its_cluster_ips() -> None:
    se = kube_service(_svc({"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5", "fd00::5"],
                            "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]}), "corp.example")
    assert se.key == ("Service", "shop", "web")
    assert se.spec.hosts == ("web.shop.svc.corp.example",)
    assert se.spec.addresses == ("10.96.0.5", "fd00::5")
    assert (se.spec.location.value, se.spec.resolution.value) == ("MESH_INTERNAL", "STATIC")
    assert se.spec.workload_selector is not None and se.spec.workload_selector.labels == {"app": "web"}


def test_a_service_without_selector_selects_no_workload() -> None:
    # An empty workloadSelector would select the namespace's every WorkloadEntry.
    se = kube_service(_svc({"clusterIP": "10.96.0.5", "ports": [{"name": "http", "port": 80}]}))
    assert se.spec.workload_selector is None


def test_named_target_port_takes_the_number_the_endpoints_agree_on() -> None:
    spec = {"clusterIP": "10.96.0.5", "selector": {"app": "web"},
            "ports": [{"name": "http", "port": 80, "targetPort": "web"}, {"name": "admin", "port": 81,
                                                                          "targetPort": 9001}]}
    slices = [{"ports": [{"name": "http", "port": 8080}, {"name": "admin", "port": 9001}]},
              {"ports": [{"name": "http", "port": 8080}]}]
    se = kube_service(_svc(spec), resolved_ports=agreed_target_ports(slices))
    assert [(p.name, p.target_port) for p in se.spec.ports] == [("http", 8080), ("admin", 9001)]
    # Pods disagree (a rollout changing the container port): no service-wide number.
    slices.append({"ports": [{"name": "http", "port": 8081}]})
    se = kube_service(_svc(spec), resolved_ports=agreed_target_ports(slices))
    assert [(p.name, p.target_port) for p in se.spec.ports] == [("http", None), ("admin", 9001)]


def test_external_name_resolves_by_dns_to_the_external_host() -> None:
    se = kube_service(_svc({"type": "ExternalName", "externalName": "db.example.com.", "selector": {"a": "b"},
                            "ports": [{"name": "tcp", "port": 5432}]}))
    assert (se.spec.resolution.value, se.spec.location.value) == ("DNS", "MESH_EXTERNAL")
    assert [(e.address, e.ports) for e in se.spec.endpoints] == [("db.example.com", {"tcp": 5432})]
    assert se.spec.workload_selector is None


def test_export_to_annotation() -> None:
    se = kube_service(_svc({"clusterIP": "10.96.0.5"}, annotations={"networking.istio.io/exportTo": " ., b ,"}))
    assert se.spec.export_to == (".", "b")


@pytest.mark.parametrize(("spec", "message"), [
    ({"type": "ExternalName", "externalName": "Not_A_Host"},
     "Service shop/web: spec.externalName: 'Not_A_Host' is not a valid lowercase host name"),
    ({"clusterIP": "10.96.0.5", "ports": [{"name": "http", "port": 0}]},
     "Service shop/web: spec.ports[0]: number: must be between 1 and 65535"),
])
def test_unconvertible_services_name_the_service_and_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(RegistryError) as info:
        kube_service(_svc(spec))
    assert str(info.value).startswith(message)


def test_udp_and_sctp_ports_are_left_out() -> None:
    se = kube_service(_svc({"clusterIP": "10.96.0.10", "ports": [
        {"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        {"name": "udp-x", "port": 54}, {"name": "s", "port": 55, "protocol": "SCTP"}]}))
    assert [(p.name, p.number) for p in se.spec.ports] == [("dns-tcp", 53)]


def test_invalid_export_to_names_the_service() -> None:
    with pytest.raises(RegistryError, match=r"^Service shop/web: export_to: .*'\*' cannot be combined"):
        kube_service(_svc({"clusterIP": "10.96.0.5"}, annotations={"networking.istio.io/exportTo": "*,a"}))


# -- endpoints --------------------------------------------------------------------------------------

POD = PodFacts("shop", "web-0", {"app": "web", "version": "v1"}, "web-sa", ("10.244.0.7",))


def _slice(*endpoints: dict[str, Any], address_type: str = "IPv4") -> dict[str, Any]:
    return {"metadata": {"name": "web-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": address_type, "ports": [{"name": "http", "port": 8080}], "endpoints": list(endpoints)}


def _endpoints(*slices: dict[str, Any]) -> list[tuple[str, dict[str, int], dict[str, str], str]]:
    found = service_endpoints(_svc({}), slices, lambda ns, name: POD if (ns, name) == ("shop", "web-0") else None,
                              lambda ns, ip: POD if (ns, ip) == ("shop", "10.244.0.7") else None)
    return [(e.address, e.ports, e.labels, e.service_account) for e in found.spec.endpoints]


REF = {"kind": "Pod", "namespace": "shop", "name": "web-0"}


@pytest.mark.parametrize(("conditions", "sent"), [
    ({}, True),
    ({"ready": True, "serving": True, "terminating": False}, True),
    ({"ready": False, "serving": False, "terminating": False}, False),  # not ready (Istio: UNHEALTHY)
    ({"ready": False, "serving": True, "terminating": True}, False),  # terminating (Istio: never sent)
    ({"ready": False, "serving": False, "terminating": True}, False),
])
def test_only_ready_endpoints_are_sent(conditions: dict[str, bool], sent: bool) -> None:
    found = _endpoints(_slice({"addresses": ["10.244.0.7"], "conditions": conditions, "targetRef": REF}))
    assert [e[0] for e in found] == (["10.244.0.7"] if sent else [])


def test_endpoint_carries_its_pods_labels_and_service_account_and_no_sidecar_means_plain_text() -> None:
    assert _endpoints(_slice({"addresses": ["10.244.0.7"], "targetRef": REF})) == [
        ("10.244.0.7", {"http": 8080}, {"app": "web", "version": "v1", "security.istio.io/tlsMode": "disabled"},
         "web-sa")]


def test_endpoint_of_an_unknown_pod_waits_for_it_and_one_without_target_ref_is_matched_by_ip() -> None:
    unknown = {"kind": "Pod", "namespace": "shop", "name": "web-9"}
    assert _endpoints(_slice({"addresses": ["10.244.0.9"], "targetRef": unknown})) == []
    assert _endpoints(_slice({"addresses": ["10.244.0.7"]}))[0][3] == "web-sa"
    assert _endpoints(_slice({"addresses": ["10.244.0.8"]})) == [("10.244.0.8", {"http": 8080}, {}, "")]


def test_a_bad_slice_port_names_the_service() -> None:
    bad = _slice({"addresses": ["10.244.0.7"], "targetRef": REF})
    bad["ports"] = [{"name": "http", "port": 70000}]
    with pytest.raises(RegistryError, match=r"^EndpointSlices of Service shop/web: .*between 1 and 65535"):
        _endpoints(bad)


def test_fqdn_slices_are_ignored_and_an_address_in_two_slices_is_one_endpoint() -> None:
    assert _endpoints(_slice({"addresses": ["x.example.com"]}, address_type="FQDN")) == []
    one = _slice({"addresses": ["10.244.0.7"], "targetRef": REF})
    other = copy.deepcopy(one)
    other["metadata"]["name"] = "web-y"
    other["ports"] = [{"name": "http", "port": 9999}]  # moving between slices: the first by name wins
    assert [e[:2] for e in _endpoints(other, one)] == [("10.244.0.7", {"http": 8080})]


# -- the registry's handlers and the store ------------------------------------------------------------

def _case() -> dict[str, list[dict[str, Any]]]:
    return read_case(GOLDENS / "services")[0]


def _find(kube: dict[str, list[dict[str, Any]]], kind: str, name: str) -> dict[str, Any]:
    return copy.deepcopy(next(o for o in kube[kind] if o["metadata"]["name"] == name))


def test_nothing_is_published_until_the_three_lists_arrived() -> None:
    kube, store = _case(), ConfigStore()
    registry = KubeRegistry(store)
    registry.services.replace(copy.deepcopy(kube["Service"]))
    registry.endpoint_slices.replace(copy.deepcopy(kube["EndpointSlice"]))
    registry.services.upsert(_find(kube, "Service", "reviews"))
    assert store.revision == 0 and not registry.synced.is_set()
    registry.pods.replace(copy.deepcopy(kube["Pod"]))
    assert store.revision == 1 and registry.synced.is_set()  # one revision for the whole first set
    assert store.get("Service", "shop", "reviews") is not None
    assert store.get("ServiceEndpoints", "shop", "reviews") is not None


def test_endpoint_changes_touch_only_service_endpoints_and_unread_pod_updates_nothing() -> None:
    kube, store = _case(), ConfigStore()
    registry = synced(kube, store)
    service = store.get("Service", "shop", "reviews")
    # A status update of a Pod (a condition time) changes nothing the registry reads.
    pod = _find(kube, "Pod", "reviews-v1-0")
    pod["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    registry.pods.upsert(pod)
    assert store.revision == 1
    # The awaited Pod arrives: its endpoint appears; only ServiceEndpoints changed.
    registry.pods.upsert({"metadata": {"name": "reviews-v1-2", "namespace": "shop", "labels": {"app": "reviews"}},
                          "spec": {}, "status": {"podIP": "10.244.0.15"}})
    assert store.kinds_changed_since(1) == frozenset({"ServiceEndpoints"}) <= ENDPOINT_KINDS
    assert store.get("Service", "shop", "reviews") is service
    eps = store.get("ServiceEndpoints", "shop", "reviews")
    assert isinstance(eps, ServiceEndpoints)
    assert "10.244.0.15" in [e.address for e in eps.spec.endpoints]
    # Scale down: the slice loses an endpoint.
    revision = store.revision
    endpoint_slice = _find(kube, "EndpointSlice", "reviews-abcde")
    endpoint_slice["endpoints"] = [e for e in endpoint_slice["endpoints"] if e["addresses"] != ["10.244.0.11"]]
    registry.endpoint_slices.upsert(endpoint_slice)
    assert store.kinds_changed_since(revision) == frozenset({"ServiceEndpoints"})
    eps = store.get("ServiceEndpoints", "shop", "reviews")
    assert isinstance(eps, ServiceEndpoints)
    assert "10.244.0.11" not in [e.address for e in eps.spec.endpoints]
    # A Pod's labels are endpoint labels (subsets): a relabel rewrites its endpoint.
    revision = store.revision
    pod = _find(kube, "Pod", "reviews-v2-0")
    pod["metadata"]["labels"]["version"] = "v3"
    registry.pods.upsert(pod)
    eps = store.get("ServiceEndpoints", "shop", "reviews")
    assert isinstance(eps, ServiceEndpoints)
    assert {e.address: e.labels.get("version") for e in eps.spec.endpoints}["10.244.0.12"] == "v3"
    assert store.kinds_changed_since(revision) == frozenset({"ServiceEndpoints"})


def test_deleting_a_service_removes_both_objects_and_a_relist_drops_what_vanished() -> None:
    kube, store = _case(), ConfigStore()
    registry = synced(kube, store)
    registry.services.delete(_find(kube, "Service", "reviews"))
    assert store.get("Service", "shop", "reviews") is None and store.get("ServiceEndpoints", "shop", "reviews") is None
    registry.services.replace([_find(kube, "Service", "db")])  # a re-list after 410 Gone
    assert {o.key for o in store.objects()} == {("Service", "shop", "db"), ("ServiceEndpoints", "shop", "db")}


def test_an_unconvertible_update_keeps_the_last_good_service() -> None:
    kube, store = _case(), ConfigStore()
    registry = synced(kube, store)
    before = store.get("Service", "shop", "payments")
    bad = _find(kube, "Service", "payments")
    bad["spec"]["externalName"] = "Bad_Name"
    registry.services.upsert(bad)
    assert store.get("Service", "shop", "payments") is before
    assert registry.errors[("shop", "payments")].startswith("Service shop/payments: spec.externalName:")


def test_scale_down_takes_the_eds_fast_path_and_keeps_clusters_listeners_routes() -> None:
    kube, store = _case(), ConfigStore()
    registry = synced(kube, store)
    cache, metrics = SnapshotCache(), PushMetrics(CollectorRegistry())
    pusher = Pusher(store, cache, build_mesh, generate, metrics,
                    endpoints_only=endpoints_only, generate_endpoints=generate_endpoints)
    with cache.watch(CLIENT):
        pusher.rebuild()
        before = cache.get(CLIENT)
        endpoint_slice = _find(kube, "EndpointSlice", "reviews-abcde")
        endpoint_slice["endpoints"] = [e for e in endpoint_slice["endpoints"] if e["addresses"] != ["10.244.0.12"]]
        registry.endpoint_slices.upsert(endpoint_slice)
        old_mesh = pusher.mesh
        pusher.rebuild()
        after = cache.get(CLIENT)
    assert before is not None and after is not None
    assert endpoints_only(old_mesh, pusher.mesh)
    assert metrics.eds_only_pushes._value.get() == 1
    for type_url in (CLUSTER, LISTENER, ROUTE):
        assert after.version(type_url) == before.version(type_url), type_url
    assert after.version(ENDPOINT) != before.version(ENDPOINT)
    eds = generate(pusher.mesh, CLIENT)[ENDPOINT]["outbound|9080||reviews.shop.svc.cluster.local"]
    addresses = [e.endpoint.address.socket_address.address for g in eds.endpoints for e in g.lb_endpoints]
    assert addresses == ["10.244.0.11", "10.244.0.16"]


def test_a_user_service_entry_of_the_same_name_does_not_collide() -> None:
    kube, store = _case(), ConfigStore()
    synced(kube, store)
    store.apply(parse_object({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                              "metadata": {"name": "reviews", "namespace": "shop"},
                              "spec": {"hosts": ["reviews.example.com"], "ports": [{"number": 80, "name": "http"}],
                                       "resolution": "DNS"}}))
    mesh = build_mesh(store.objects())
    assert {"reviews.example.com", "reviews.shop.svc.cluster.local"} <= set(mesh.services)


# -- a sidecar's Node matched to its Pod ------------------------------------------------------------

def _node(node_id: str, **meta: Any) -> Any:
    node = base_pb2.Node(id=node_id, cluster="reviews.shop")
    node.metadata.update(meta)
    return node


def test_a_sidecar_is_served_as_its_pod_says_not_as_its_metadata_claims() -> None:
    registry = synced(_case())
    node = _node("sidecar~10.244.0.11~reviews-v1-0.shop~shop.svc.cluster.local", NAMESPACE="shop",
                 LABELS={"app": "reviews", "version": "v2"}, SERVICE_ACCOUNT="admin", INTERCEPTION_MODE="REDIRECT")
    identity = registry.classify(node)
    assert identity.proxy_class.labels == (("app", "reviews"), ("security.istio.io/tlsMode", "istio"),
                                           ("version", "v1"))  # pod-template-hash: volatile, dropped
    assert identity.service_account == "reviews" and identity.namespace == "shop"
    assert identity.proxy_class.captured  # what the Node says about itself (interception) stays


def test_a_node_claiming_another_pods_ip_is_refused_and_one_without_pod_keeps_its_metadata() -> None:
    registry = synced(_case())
    with pytest.raises(NodeError, match=r"claims IP 10\.244\.0\.99, but Pod shop/reviews-v1-0 has 10\.244\.0\.11"):
        registry.classify(_node("sidecar~10.244.0.99~reviews-v1-0.shop~shop.svc.cluster.local"))
    # INSTANCE_IPS may name the pod's IP when the id carries another of the node's addresses.
    registry.classify(_node("sidecar~10.0.0.1~reviews-v1-0.shop~shop.svc.cluster.local",
                            INSTANCE_IPS="10.0.0.1,10.244.0.11"))
    vm = registry.classify(_node("sidecar~10.0.0.5~vm-1.shop~shop.svc.cluster.local", LABELS={"app": "legacy"},
                                 SERVICE_ACCOUNT="vm"))
    assert vm.proxy_class.labels == (("app", "legacy"),) and vm.service_account == "vm"
    assert pod_of_node("router~10.0.0.1~gw-1.istio-system~istio-system.svc.cluster.local") == ("istio-system", "gw-1")
    assert pod_of_node("sidecar~10.0.0.1~no-namespace~x") is None and pod_of_node("local-workload") is None


def test_endpoint_changes_patched_into_the_last_build_equal_a_fresh_build() -> None:
    """`build_mesh` patches the merged services when few ServiceEndpoints changed: same result."""
    kube, store = _case(), ConfigStore()
    registry = synced(kube, store)
    conversions = Conversions()
    build_mesh(store.objects(), conversions=conversions)
    endpoint_slice = _find(kube, "EndpointSlice", "reviews-abcde")
    for address in ("10.244.0.11", "10.244.0.12", "10.244.0.16"):
        endpoint_slice["endpoints"] = [e for e in endpoint_slice["endpoints"] if e["addresses"] != [address]]
        registry.endpoint_slices.upsert(copy.deepcopy(endpoint_slice))
        patched = build_mesh(store.objects(), conversions=conversions)
        assert patched.services == build_mesh(store.objects()).services
        remaining = [e.address for e in patched.services["reviews.shop.svc.cluster.local"].endpoints]
        assert address not in remaining
    assert conversions.stage_last("registry-endpoints") is not None


def test_discovery_selectors_publish_only_selected_namespaces_and_follow_relabels() -> None:
    kube, store = _case(), ConfigStore()
    namespaces = NamespaceFilter([NamespaceSelector(match_labels={"mesh": "on"})])
    registry = KubeRegistry(store, namespaces=namespaces)
    namespaces.replace([{"metadata": {"name": "shop", "labels": {}}}])
    registry.services.replace(copy.deepcopy(kube["Service"]))
    registry.endpoint_slices.replace(copy.deepcopy(kube["EndpointSlice"]))
    registry.pods.replace(copy.deepcopy(kube["Pod"]))
    assert registry.synced.is_set() and store.objects() == []
    namespaces.upsert({"metadata": {"name": "shop", "labels": {"mesh": "on"}}})
    assert store.get("Service", "shop", "reviews") is not None
    assert store.get("ServiceEndpoints", "shop", "db") is not None
    namespaces.upsert({"metadata": {"name": "shop", "labels": {}}})
    assert store.objects() == []
