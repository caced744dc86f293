"""AuthorizationPolicy and RequestAuthentication on gateway (router) proxies: which policies a
gateway workload gets (its namespace and labels, the root namespace's mesh-wide ones) and where
the filters go (every HTTP connection manager, before the router; TCP chains, before tcp_proxy)."""

from __future__ import annotations

from typing import Any

from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate
from pilot.xds import typeurls
from tests.unit.test_security_translate import as_dict, objects, policy

GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: gw}
spec:
  selector: {istio: edge}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*/shop.example.com"]
  - port: {number: 9000, name: tcp, protocol: TCP}
    hosts: ["*/tcp.example.com"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: gw}
spec:
  hosts: [web.gw.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8000, name: http, protocol: HTTP}, {number: 9000, name: tcp, protocol: TCP}]
  workloadSelector: {labels: {app: web}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: gw}
spec:
  hosts: [shop.example.com]
  gateways: [edge]
  http: [{route: [{destination: {host: web, port: {number: 8000}}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-tcp, namespace: gw}
spec:
  hosts: [tcp.example.com]
  gateways: [edge]
  tcp: [{route: [{destination: {host: web, port: {number: 9000}}}]}]
"""
EDGE = ProxyClass(ProxyKind.ROUTER, "gw", (("istio", "edge"),), bind_address="127.0.0.9")
DENY_ADMIN = ("  selector: {matchLabels: {istio: edge}}\n  action: DENY\n"
              "  rules: [{to: [{operation: {paths: [/admin]}}]}]")


def chains(text: str) -> dict[int, list[str]]:
    """Listener port -> the filter names of its chain (HTTP filters for an HCM)."""
    listeners = generate(build_mesh(objects(GATEWAY + text)), EDGE)[typeurls.LISTENER]
    out: dict[int, list[str]] = {}
    for listener in listeners.values():
        (chain,) = listener.filter_chains
        (first, *rest) = [as_dict(f) for f in chain.filters]
        port = listener.address.socket_address.port_value
        if first["name"] == "envoy.filters.network.http_connection_manager":
            out[port] = [f["name"] for f in first["typedConfig"]["httpFilters"]]
        else:
            out[port] = [first["name"], *(f["name"] for f in rest)]
    return out


def rbac_actions(text: str, port: int) -> list[str]:
    """The actions of the RBAC HTTP filters on ``port``'s connection manager, in order."""
    listeners = generate(build_mesh(objects(GATEWAY + text)), EDGE)[typeurls.LISTENER]
    (listener,) = [lis for lis in listeners.values() if lis.address.socket_address.port_value == port]
    hcm: dict[str, Any] = as_dict(listener.filter_chains[0].filters[0])["typedConfig"]
    return [f["typedConfig"]["rules"].get("action", "ALLOW") for f in hcm["httpFilters"]
            if f["name"] == "envoy.filters.http.rbac"]


def test_without_policies_a_gateway_has_no_security_filters() -> None:
    assert chains("") == {8080: ["envoy.filters.http.router"], 9000: ["envoy.filters.network.tcp_proxy"]}


def test_a_policy_selecting_the_gateway_adds_rbac_to_http_and_tcp_listeners() -> None:
    got = chains(policy(DENY_ADMIN, namespace="gw"))
    assert got == {8080: ["envoy.filters.http.rbac", "envoy.filters.http.router"],
                   9000: ["envoy.filters.network.rbac", "envoy.filters.network.tcp_proxy"]}


def test_jwt_comes_before_rbac_and_actions_in_istios_order() -> None:
    text = policy(DENY_ADMIN, "deny", namespace="gw")
    allow = "  action: ALLOW\n  rules: [{from: [{source: {requestPrincipals: ['*']}}]}]"
    text += policy(allow, "allow", "istio-system")
    text += policy("  action: AUDIT\n  rules: [{}]", "audit", "istio-system")
    text += policy("  selector: {matchLabels: {istio: edge}}\n  jwtRules: [{issuer: https://idp.test, "
                   "jwksUri: https://idp.test/keys}]", "jwt", "gw", kind="RequestAuthentication")
    assert chains(text)[8080] == ["envoy.filters.http.jwt_authn", *["envoy.filters.http.rbac"] * 3,
                                  "envoy.filters.http.router"]
    assert rbac_actions(text, 8080) == ["LOG", "DENY", "ALLOW"]


def test_policies_of_other_namespaces_other_labels_or_target_refs_do_not_apply() -> None:
    other_ns = policy(DENY_ADMIN, "a", namespace="shop")  # selects istio: edge, but in shop only
    other_labels = policy(DENY_ADMIN.replace("istio: edge", "istio: ingress"), "b", namespace="gw")
    targeted = policy("  targetRefs: [{kind: Service, group: '', name: web}]\n  action: DENY\n  rules: [{}]",
                      "c", namespace="gw")
    assert chains(other_ns + other_labels + targeted) == chains("")
