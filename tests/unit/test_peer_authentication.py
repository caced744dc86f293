"""PeerAuthentication: parsing and Istio's validation, Istio's precedence (workload > namespace >
mesh, UNSET inherits, port-level exceptions, oldest wins), how auto mTLS marks endpoints, and that
a proxy without mesh certificates gets no mesh TLS at all."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from pilot.api import InvalidObjectError, parse_object
from pilot.api.peer_authentication import PeerAuthentication
from pilot.model.build import build_mesh
from pilot.model.mtls import DISABLE, PERMISSIVE, STRICT, endpoint_tls_mode, workload_mtls
from pilot.model.proxy import ProxyClass, ProxyKind, identity_from_node
from pilot.translate import generate
from pilot.translate.mtls import TRANSPORT_SOCKET_MATCH
from pilot.xds import typeurls


def pa(spec: dict[str, Any], namespace: str = "shop", name: str = "p", version: str = "v1", **meta: Any) -> Any:
    return parse_object({"apiVersion": f"security.istio.io/{version}", "kind": "PeerAuthentication",
                         "metadata": {"name": name, "namespace": namespace, **meta}, "spec": spec})


def issues(spec: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidObjectError) as info:
        pa(spec)
    return {i.path: i.message for i in info.value.issues}


def test_both_versions_parse_with_every_field() -> None:
    for version in ("v1", "v1beta1"):
        obj = pa({"selector": {"matchLabels": {"app": "a"}}, "mtls": {"mode": "STRICT"},
                  "portLevelMtls": {"8080": {"mode": "DISABLE"}, 9090: {}}}, version=version)
        assert isinstance(obj, PeerAuthentication)
        assert obj.spec.mtls is not None and obj.spec.mtls.mode == "STRICT"
        assert {p: m.mode.value for p, m in (obj.spec.port_level_mtls or {}).items()} == {8080: "DISABLE",
                                                                                           9090: "UNSET"}
    assert pa({}).spec.mtls is None  # an empty policy is valid: UNSET everywhere


@pytest.mark.parametrize(("spec", "path", "message"), [
    ({"portLevelMtls": {"80": {"mode": "STRICT"}}}, "spec.portLevelMtls",
     "mesh/namespace peer authentication cannot have port level mTLS"),
    ({"selector": {"matchLabels": {}}, "portLevelMtls": {"80": {"mode": "STRICT"}}}, "spec.portLevelMtls",
     "mesh/namespace peer authentication cannot have port level mTLS"),
    ({"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {}}, "spec.portLevelMtls",
     "port level mTLS, if defined, must have at least one element"),
    ({"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"0": {"mode": "STRICT"}}}, "spec.portLevelMtls.0",
     "port must be in range 1..65535"),
    ({"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"70000": {"mode": "STRICT"}}},
     "spec.portLevelMtls.70000", "port must be in range 1..65535"),
    ({"mtls": {"mode": "ON"}}, "spec.mtls.mode", "must be one of 'UNSET', 'DISABLE', 'PERMISSIVE', 'STRICT', not 'ON'"),
    ({"selector": {"matchLabels": {"app": "*"}}}, "spec.selector.matchLabels",
     "wildcard is not supported in selector: 'app=*'"),
])  # fmt: skip
def test_istio_validation(spec: dict[str, Any], path: str, message: str) -> None:
    assert issues(spec) == {path: message}


def test_unknown_fields_are_warned_about() -> None:
    assert [(w.path, w.message) for w in pa({"mtls": {"mode": "STRICT", "x": 1}}).warnings] == [
        ("spec.mtls.x", "unknown field, ignored")]


def modes(*policies: Any, namespace: str = "shop", labels: dict[str, str] | None = None) -> Any:
    mesh = build_mesh(list(policies))
    return workload_mtls(mesh.peer_authn, namespace, labels or {"app": "a"})


OLD, NEW = "2020-01-01T00:00:00Z", "2024-01-01T00:00:00Z"
A = {"matchLabels": {"app": "a"}}


def test_precedence_workload_over_namespace_over_mesh() -> None:
    assert modes().mode == PERMISSIVE  # Istio's default
    mesh_strict = pa({"mtls": {"mode": "STRICT"}}, namespace="istio-system", name="mesh")
    assert modes(mesh_strict).mode == STRICT
    ns_disable = pa({"mtls": {"mode": "DISABLE"}}, name="ns")
    assert modes(mesh_strict, ns_disable).mode == DISABLE
    assert modes(mesh_strict, ns_disable, namespace="other").mode == STRICT
    wl_permissive = pa({"selector": A, "mtls": {"mode": "PERMISSIVE"}}, name="wl")
    assert modes(mesh_strict, ns_disable, wl_permissive).mode == PERMISSIVE
    assert modes(mesh_strict, ns_disable, wl_permissive, labels={"app": "b"}).mode == DISABLE


def test_unset_inherits_and_port_level_exceptions() -> None:
    mesh_strict = pa({"mtls": {"mode": "STRICT"}}, namespace="istio-system", name="mesh")
    ns_unset = pa({"mtls": {"mode": "UNSET"}}, name="ns")
    wl = pa({"selector": A, "portLevelMtls": {"8080": {"mode": "DISABLE"}, "9090": {"mode": "UNSET"}}}, name="wl")
    found = modes(mesh_strict, ns_unset, wl)
    assert (found.mode, found.at(8080), found.at(9090), found.at(7000)) == (STRICT, DISABLE, STRICT, STRICT)


def test_oldest_policy_wins_at_each_level_and_root_selectors_are_ignored() -> None:
    young = pa({"selector": A, "mtls": {"mode": "DISABLE"}}, name="a-young", creationTimestamp=NEW)
    old = pa({"selector": A, "mtls": {"mode": "STRICT"}}, name="z-old", creationTimestamp=OLD)
    assert modes(young, old).mode == STRICT
    ns_young = pa({"mtls": {"mode": "DISABLE"}}, name="a", creationTimestamp=NEW)
    ns_old = pa({"mtls": {"mode": "STRICT"}}, name="b", creationTimestamp=OLD)
    assert modes(ns_young, ns_old).mode == STRICT
    root_selector = pa({"selector": A, "mtls": {"mode": "DISABLE"}}, namespace="istio-system")
    assert modes(root_selector).mode == PERMISSIVE


def test_endpoint_tls_mode_follows_istio_for_workload_entries() -> None:
    assert endpoint_tls_mode({}, "sa") == "istio"
    assert endpoint_tls_mode({}, "") == "disabled"
    assert endpoint_tls_mode({"security.istio.io/tlsMode": "disabled"}, "sa") == "disabled"
    assert endpoint_tls_mode({"security.istio.io/tlsMode": "istio"}, "") == "istio"


MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cart, namespace: shop}
spec:
  hosts: [cart.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: cart}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: cart-a, namespace: shop}
spec: {address: 127.0.6.1, serviceAccount: cart, labels: {app: cart}}
"""


def mesh_with(*extra: str) -> Any:
    return build_mesh([parse_object(d) for d in yaml.safe_load_all(MESH + "".join(extra))],
                      trust_domain="example.org")


def policy(mode: str) -> str:
    return ("---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
            f"metadata: {{name: p, namespace: shop}}\nspec: {{mtls: {{mode: {mode}}}}}\n")


def cart(mtls: bool) -> ProxyClass:
    return ProxyClass(kind=ProxyKind.SIDECAR, namespace="shop", bind_address="127.0.6.1", workload="cart-a", mtls=mtls)


def test_without_certificates_nothing_changes() -> None:
    strict = policy("STRICT")
    assert generate(mesh_with(strict), cart(False)) == generate(mesh_with(), cart(False))
    with_certs = generate(mesh_with(strict), cart(True))
    assert with_certs != generate(mesh_with(), cart(False))
    inbound = with_certs[typeurls.LISTENER]["127.0.6.1_8080"]
    (chain,) = inbound.filter_chains
    context = tls_pb2.DownstreamTlsContext()
    assert chain.transport_socket.typed_config.Unpack(context)
    assert context.require_client_certificate.value
    assert [s.name for s in context.common_tls_context.tls_certificate_sds_secret_configs] == ["default"]
    hcm = hcm_pb2.HttpConnectionManager()
    assert chain.filters[0].typed_config.Unpack(hcm)
    assert hcm.forward_client_cert_details == hcm_pb2.HttpConnectionManager.APPEND_FORWARD
    assert hcm.set_current_client_cert_details.uri


def test_auto_mtls_verifies_the_service_accounts_and_disable_means_plaintext() -> None:
    resources = generate(mesh_with(), cart(True))
    cluster = resources[typeurls.CLUSTER]["outbound|8080||cart.shop.svc.cluster.local"]
    mtls = cluster.transport_socket_matches[0]
    context = tls_pb2.UpstreamTlsContext()
    assert mtls.transport_socket.typed_config.Unpack(context)
    assert context.sni == "outbound_.8080_._.cart.shop.svc.cluster.local"
    assert list(context.common_tls_context.alpn_protocols) == ["istio-peer-exchange", "istio"]
    sans = context.common_tls_context.combined_validation_context.default_validation_context
    assert [m.matcher.exact for m in sans.match_typed_subject_alt_names] == ["spiffe://example.org/ns/shop/sa/cart"]
    (endpoint,) = resources[typeurls.ENDPOINT]["outbound|8080||cart.shop.svc.cluster.local"].endpoints[0].lb_endpoints
    assert endpoint.metadata.filter_metadata[TRANSPORT_SOCKET_MATCH]["tlsMode"] == "istio"
    disable = policy("DISABLE")
    (endpoint,) = generate(mesh_with(disable), cart(True))[typeurls.ENDPOINT][
        "outbound|8080||cart.shop.svc.cluster.local"].endpoints[0].lb_endpoints
    assert not endpoint.HasField("metadata")  # PeerAuthentication DISABLE: clients send plaintext


def test_node_metadata_says_whether_the_proxy_has_certificates() -> None:
    node = base_pb2.Node(id="sidecar~127.0.6.1~cart-a.shop~cluster.local", cluster="c")
    assert not identity_from_node(node).proxy_class.mtls
    node.metadata.fields["MESHCTL_WORKLOAD_CERTS"].string_value = "true"
    assert identity_from_node(node).proxy_class.mtls


def test_the_root_namespace_is_pilots_setting_or_the_clusters_mesh_config() -> None:
    """A mesh whose rootNamespace is `mesh-root` (MeshConfig; `PilotSettings.root_namespace`): a
    policy there is mesh-wide, and one in istio-system is then an ordinary namespace's."""
    root_strict = pa({"mtls": {"mode": "STRICT"}}, namespace="mesh-root", name="mesh")
    mesh = build_mesh([root_strict], root_namespace="mesh-root")
    assert workload_mtls(mesh.peer_authn, "shop", {"app": "a"}).mode == STRICT
    istio_system = pa({"mtls": {"mode": "STRICT"}}, namespace="istio-system", name="mesh")
    mesh = build_mesh([istio_system], root_namespace="mesh-root")
    assert workload_mtls(mesh.peer_authn, "shop", {"app": "a"}).mode == PERMISSIVE
    assert workload_mtls(mesh.peer_authn, "istio-system", {"app": "a"}).mode == STRICT


def test_pilot_builds_with_its_trust_domain_and_root_namespace() -> None:
    """`meshctl up --trust-domain` reaches the mesh pilot builds: the identities its TLS contexts
    expect are the ones the CA gives (they were always cluster.local before)."""
    from pilot.app import Pilot
    from pilot.settings import PilotSettings

    pilot = Pilot(PilotSettings(trust_domain="example.org", root_namespace="mesh-root", ads_port=0, debug_port=0))
    pilot.store.apply(pa({"mtls": {"mode": "STRICT"}}, namespace="mesh-root", name="mesh"))
    pilot.pusher.rebuild()
    mesh = pilot.pusher.mesh
    assert mesh.trust_domain == "example.org"
    assert mesh.scoping.root_namespace == "mesh-root"
    assert workload_mtls(mesh.peer_authn, "shop", {"app": "a"}).mode == STRICT
