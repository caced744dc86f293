"""The captured-traffic listener model: who gets it, its shape, what it shares, what a change costs.

The golden case `tests/golden/cases/captured` pins the whole output (and Envoy validates it);
these tests state the properties that matter one by one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import struct_pb2

from pilot.api.base import ApiObject
from pilot.config.yaml_dir import load_file
from pilot.config.yaml_text import load_text
from pilot.model.build import build_mesh
from pilot.model.conversions import Conversions
from pilot.model.mesh import MeshSnapshot
from pilot.model.proxy import NodeError, ProxyClass, ProxyKind, identity_from_node
from pilot.translate import generate, generate_parts
from pilot.xds.snapshot import Snapshot
from pilot.xds.typeurls import CLUSTER, LISTENER, ROUTE

CASE = Path(__file__).resolve().parents[1] / "golden" / "cases" / "captured" / "input.yaml"


def objects() -> list[ApiObject]:
    loaded = load_file(CASE)
    assert loaded.errors == ()
    return list(loaded.objects)


def captured(namespace: str = "default", **labels: str) -> ProxyClass:
    return ProxyClass(ProxyKind.SIDECAR, namespace, tuple(sorted(labels.items())), captured=True)


def node(meta: dict[str, Any], node_id: str = "sidecar~10.244.0.5~client-1.default~default.svc.cluster.local") -> Any:
    n = base_pb2.Node(id=node_id)
    struct = struct_pb2.Struct()
    struct.update(meta)
    n.metadata.CopyFrom(struct)
    return n


# --- who gets the captured model -------------------------------------------------------------


def test_interception_mode_redirect_selects_the_captured_model() -> None:
    got = identity_from_node(node({"NAMESPACE": "default", "INTERCEPTION_MODE": "REDIRECT"})).proxy_class
    assert got.captured and got.bind_address is None
    assert not identity_from_node(node({"NAMESPACE": "default"})).proxy_class.captured
    assert not identity_from_node(node({"NAMESPACE": "default", "INTERCEPTION_MODE": "NONE"})).proxy_class.captured


def test_a_local_mesh_sidecar_or_a_router_is_never_captured() -> None:
    local = node({"NAMESPACE": "default", "INTERCEPTION_MODE": "REDIRECT", "MESHCTL_BIND_ADDRESS": "127.0.0.9"})
    assert not identity_from_node(local).proxy_class.captured
    router = node({"NAMESPACE": "istio-system", "INTERCEPTION_MODE": "REDIRECT"},
                  "router~10.0.0.1~gw.istio-system~istio-system.svc.cluster.local")
    assert not identity_from_node(router).proxy_class.captured


def test_an_unsupported_interception_mode_is_refused_with_the_field() -> None:
    with pytest.raises(NodeError, match=r"metadata.INTERCEPTION_MODE 'TPROXY' is not supported"):
        identity_from_node(node({"NAMESPACE": "default", "INTERCEPTION_MODE": "TPROXY"}))


# --- shape -----------------------------------------------------------------------------------


def _hcm(listener: Any) -> Any:
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def _tcp(chain: Any) -> Any:
    proxy = tcp_proxy_pb2.TcpProxy()
    assert chain.filters[-1].typed_config.Unpack(proxy)
    return proxy


def test_virtual_outbound_hands_off_by_original_destination_and_passes_the_rest_through() -> None:
    out = generate(build_mesh(objects()), captured(app="productpage"))
    virtual = out[LISTENER]["virtualOutbound"]
    assert virtual.use_original_dst.value
    assert (virtual.address.socket_address.address, virtual.address.socket_address.port_value) == ("0.0.0.0", 15001)
    chains = {c.name: c for c in virtual.filter_chains}
    assert _tcp(chains["virtualOutbound-catchall-tcp"]).cluster == "PassthroughCluster"
    assert chains["virtualOutbound-blackhole"].filter_chain_match.destination_port.value == 15001
    passthrough = out[CLUSTER]["PassthroughCluster"]
    assert passthrough.type == passthrough.ORIGINAL_DST


def test_registry_only_black_holes_unknown_destinations() -> None:
    out = generate(build_mesh(objects()), captured("locked", app="batch"))
    virtual = out[LISTENER]["virtualOutbound"]
    catch_all = next(c for c in virtual.filter_chains if c.name == "virtualOutbound-catchall-tcp")
    assert _tcp(catch_all).cluster == "BlackHoleCluster"
    assert [v.name for v in out[ROUTE]["9080"].virtual_hosts][-1] == "block_all"


def test_each_http_port_has_a_bindless_listener_with_the_route_configuration_of_its_number() -> None:
    out = generate(build_mesh(objects()), captured(app="productpage"))
    for port in (9080, 8080):
        listener = out[LISTENER][f"0.0.0.0_{port}"]
        assert listener.bind_to_port.value is False and listener.HasField("bind_to_port")
        assert listener.traffic_direction == base_pb2.OUTBOUND
        assert _hcm(listener).rds.route_config_name == str(port)
    assert "outbound" not in out[ROUTE] and "0.0.0.0_15001" not in out[LISTENER]  # no Host-header model
    assert Snapshot.from_resources(out).consistency_errors() == []


def test_a_port_route_configuration_holds_only_that_ports_services_with_istio_domains() -> None:
    out = generate(build_mesh(objects()), captured(app="productpage"))
    config = out[ROUTE]["9080"]
    assert config.ignore_port_in_host_matching  # Host: reviews:9080 matches domain "reviews"
    vhosts = {v.name: sorted(v.domains) for v in config.virtual_hosts}
    assert set(vhosts) == {"reviews.default.svc.cluster.local:9080", "ratings.default.svc.cluster.local:9080",
                           "allow_any"}
    assert vhosts["reviews.default.svc.cluster.local:9080"] == [
        "10.96.0.10", "reviews", "reviews.default", "reviews.default.svc", "reviews.default.svc.cluster.local",
        "reviews.default.svc.cluster.local."]  # the absolute name too (Istio 1.27 on)
    assert all(v.include_request_attempt_count for v in config.virtual_hosts)  # Istio's default proxy headers
    # Another namespace's service: no bare short name (it would be this namespace's service).
    details = next(v for v in out[ROUTE]["8080"].virtual_hosts if v.name.startswith("details"))
    assert "details" not in details.domains and "details.shop" in details.domains


def test_tcp_services_listen_on_their_address_and_tls_gets_sni_chains_plus_passthrough() -> None:
    out = generate(build_mesh(objects()), captured(app="productpage"))
    mongo = out[LISTENER]["10.96.0.20_27017"]
    assert mongo.address.socket_address.address == "10.96.0.20" and not mongo.bind_to_port.value
    weighted = {c.name: c.weight for c in _tcp(mongo.filter_chains[0]).weighted_clusters.clusters}
    assert weighted == {"outbound|27017|v1|mongo.default.svc.cluster.local": 80,
                        "outbound|27017|v2|mongo.default.svc.cluster.local": 20}
    assert "0.0.0.0_6379" in out[LISTENER]  # redis has no address: the whole port
    tls = out[LISTENER]["0.0.0.0_443"]
    by_name = {c.name or c.filter_chain_match.server_names[0]: c for c in tls.filter_chains}
    assert _tcp(by_name["api.example.com"]).cluster == "outbound|443||api.example.com"
    assert _tcp(by_name["PassthroughFilterChain"]).cluster == "PassthroughCluster"


def test_virtual_inbound_matches_inbound_ports_and_passes_the_rest_to_the_app() -> None:
    out = generate(build_mesh(objects()), captured(app="reviews", version="v1"))
    inbound = out[LISTENER]["virtualInbound"]
    assert inbound.address.socket_address.port_value == 15006
    assert [f.name for f in inbound.listener_filters] == ["envoy.filters.listener.original_dst"]
    port = next(c for c in inbound.filter_chains if c.filter_chain_match.destination_port.value == 9080)
    hcm = hcm_pb2.HttpConnectionManager()
    assert port.filters[0].typed_config.Unpack(hcm)
    assert hcm.route_config.virtual_hosts[0].routes[0].route.cluster == "inbound|9080||"
    rest = next(c for c in inbound.filter_chains if c.name == "virtualInbound")
    assert _tcp(rest).cluster == "InboundPassthroughCluster"
    source = out[CLUSTER]["InboundPassthroughCluster"].upstream_bind_config.source_address
    assert source.address == "127.0.0.6"
    assert "inbound|9080||" in out[CLUSTER]


def test_strict_mtls_applies_to_inbound_port_chains_and_to_passthrough() -> None:
    out = generate(build_mesh(objects()), ProxyClass(ProxyKind.SIDECAR, "default", (("app", "ratings"),),
                                                      mtls=True, captured=True))
    inbound: listener_pb2.Listener = out[LISTENER]["virtualInbound"]
    served = [c for c in inbound.filter_chains if c.name != "virtualInbound-blackhole"]
    assert served and all(c.filter_chain_match.transport_protocol == "tls" and c.HasField("transport_socket")
                          for c in served)
    assert "envoy.filters.listener.tls_inspector" in [f.name for f in inbound.listener_filters]


def test_local_mesh_classes_keep_the_host_header_model() -> None:
    out = generate(build_mesh(objects()), ProxyClass(ProxyKind.SIDECAR, "default", (("app", "productpage"),)))
    assert "outbound" in out[ROUTE] and "virtualOutbound" not in out[LISTENER]


# --- sharing and cost ------------------------------------------------------------------------


def test_classes_seeing_the_same_services_share_route_configurations_and_outbound_listeners() -> None:
    mesh = build_mesh(objects())
    a = generate_parts(mesh, captured(app="productpage"))
    b = generate_parts(mesh, captured(app="reviews", version="v1"))
    assert a[ROUTE][0] is b[ROUTE][0]
    assert a[LISTENER][0] is b[LISTENER][0]  # the shared outbound part
    assert a[LISTENER][1] is not b[LISTENER][1]  # b serves 9080 inbound: its own part differs


def _rebuild(objs: list[ApiObject], conversions: Conversions, carry: Conversions) -> MeshSnapshot:
    return build_mesh(objs, "cluster.local", conversions, carry)


def test_a_virtual_service_edit_rebuilds_only_its_ports_route_configuration() -> None:
    conversions, carry = Conversions(), Conversions()
    before = objects()
    proxy = captured(app="productpage")
    old = generate(_rebuild(before, conversions, carry), proxy)
    carry.advance(True)
    edited_text = CASE.read_text().replace("weight: 90", "weight: 50").replace("weight: 10", "weight: 50")
    edited = {o.key: o for o in load_text(edited_text).objects}
    key = ("VirtualService", "default", "reviews")
    after = [edited[key] if o.key == key else o for o in before]
    new = generate(_rebuild(after, conversions, carry), proxy)
    assert new[ROUTE]["8080"] is old[ROUTE]["8080"]  # carried: not built or encoded again
    assert new[ROUTE]["9080"] is not old[ROUTE]["9080"]
    ratings = "ratings.default.svc.cluster.local:9080"
    old_vh = {v.name: v for v in old[ROUTE]["9080"].virtual_hosts}
    new_vh = {v.name: v for v in new[ROUTE]["9080"].virtual_hosts}
    assert new_vh[ratings] == old_vh[ratings]
    reviews = "reviews.default.svc.cluster.local:9080"
    weights = [c.weight.value for c in new_vh[reviews].routes[-1].route.weighted_clusters.clusters]
    assert weights == [50, 50]
    assert new[LISTENER]["0.0.0.0_9080"] is old[LISTENER]["0.0.0.0_9080"]
    assert new[LISTENER]["10.96.0.20_27017"] is old[LISTENER]["10.96.0.20_27017"]  # TCP: nothing it reads changed
    assert new[LISTENER]["0.0.0.0_443"] is old[LISTENER]["0.0.0.0_443"]


def test_a_tcp_route_edit_rebuilds_its_listener_only() -> None:
    conversions, carry = Conversions(), Conversions()
    before = objects()
    proxy = captured(app="productpage")
    old = generate(_rebuild(before, conversions, carry), proxy)
    carry.advance(True)
    edited_text = CASE.read_text().replace("weight: 80", "weight: 30").replace("weight: 20", "weight: 70")
    edited = {o.key: o for o in load_text(edited_text).objects}
    key = ("VirtualService", "default", "mongo")
    new = generate(_rebuild([edited[key] if o.key == key else o for o in before], conversions, carry), proxy)
    assert new[LISTENER]["10.96.0.20_27017"] is not old[LISTENER]["10.96.0.20_27017"]
    weights = sorted(c.weight for c in _tcp(new[LISTENER]["10.96.0.20_27017"].filter_chains[0])
                     .weighted_clusters.clusters)
    assert weights == [30, 70]
    assert new[LISTENER]["0.0.0.0_6379"] is old[LISTENER]["0.0.0.0_6379"]
    assert new[ROUTE]["9080"] is old[ROUTE]["9080"]
