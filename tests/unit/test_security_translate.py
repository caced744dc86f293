"""AuthorizationPolicy and RequestAuthentication from YAML to Envoy config: which policies a
workload gets (root namespace, namespace, selector, targetRefs), and what each field becomes
(RBAC principals and permissions as Istio generates them, the JWT filter), on HTTP and TCP ports."""

from __future__ import annotations

import json
from typing import Any

import yaml
from google.protobuf import json_format

from pilot.api import parse_object
from pilot.model.authz import WorkloadSecurity, workload_security
from pilot.model.build import build_mesh
from pilot.model.diff import endpoints_only
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate
from pilot.translate.jwt import UNVERIFIABLE_JWKS
from pilot.translate.rbac import http_rbac_filters, network_rbac_filters
from pilot.xds import typeurls

SERVICE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}, {number: 5432, name: tcp, protocol: TCP}]
  workloadSelector: {labels: {app: api}}
"""
API = ProxyClass(ProxyKind.SIDECAR, "shop", (("app", "api"),))


def objects(text: str) -> list[Any]:
    return [parse_object(d) for d in yaml.safe_load_all(text) if d]


def policy(spec: str, name: str = "p", namespace: str = "shop", kind: str = "AuthorizationPolicy") -> str:
    meta = f"metadata: {{name: {name}, namespace: {namespace}}}"
    return f"---\napiVersion: security.istio.io/v1\nkind: {kind}\n{meta}\nspec:\n{spec}\n"


def security(text: str, namespace: str = "shop", labels: dict[str, str] | None = None,
             jwks: dict[str, str] | None = None) -> WorkloadSecurity:
    mesh = build_mesh(objects(text), jwks=jwks)
    return workload_security(mesh.security, mesh.scoping.root_namespace, namespace, labels or {"app": "api"})


def as_dict(msg: Any) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(json_format.MessageToJson(msg))
    return result


def rbac(spec: str, tcp: bool = False) -> list[dict[str, Any]]:
    """The typed configs of the RBAC filters one policy (in namespace shop) generates."""
    sec = security(policy(spec))
    return [as_dict(f)["typedConfig"] for f in (network_rbac_filters(sec) if tcp else http_rbac_filters(sec))]


def only_rule(spec: str, tcp: bool = False) -> dict[str, Any]:
    [config] = rbac(spec, tcp)
    [found] = config["rules"]["policies"].values()
    result: dict[str, Any] = found
    return result


def principal_ids(spec: str, tcp: bool = False) -> list[dict[str, Any]]:
    ids: list[dict[str, Any]] = only_rule(spec, tcp)["principals"][0]["andIds"]["ids"]
    return ids


def permission_rules(spec: str, tcp: bool = False) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = only_rule(spec, tcp)["permissions"][0]["andRules"]["rules"]
    return rules


# --- selection -------------------------------------------------------------------------------


def test_root_namespace_namespace_and_selector_select_as_istio_does() -> None:
    text = (policy("  {}", "mesh-wide", "istio-system")
            + policy("  selector: {matchLabels: {app: api}}", "root-selected", "istio-system")
            + policy("  {}", "ns-wide") + policy("  selector: {matchLabels: {app: api}}", "selected")
            + policy("  selector: {matchLabels: {app: web}}", "other-app")
            + policy("  {}", "other-ns", "default")
            + policy("  targetRefs: [{kind: Service, name: api}]", "waypoint"))
    names = {p.name for p in security(text).allow}
    assert names == {"mesh-wide", "root-selected", "ns-wide", "selected"}
    # Root-namespace selectors apply in every namespace; the shop policies do not reach default.
    assert {p.name for p in security(text, "default", {"app": "api"}).allow} == {"mesh-wide", "root-selected",
                                                                                  "other-ns"}


def test_policies_are_split_by_action_and_custom_generates_nothing() -> None:
    text = (policy("  action: DENY\n  rules: [{}]", "d") + policy("  action: AUDIT\n  rules: [{}]", "a")
            + policy("  action: CUSTOM\n  provider: {name: opa}\n  rules: [{}]", "c") + policy("  rules: [{}]", "l"))
    sec = security(text)
    assert [p.name for p in sec.deny] == ["d"] and [p.name for p in sec.audit] == ["a"]
    assert [p.name for p in sec.custom] == ["c"] and [p.name for p in sec.allow] == ["l"]
    actions = [as_dict(f)["typedConfig"]["rules"].get("action", "ALLOW") for f in http_rbac_filters(sec)]
    assert actions == ["LOG", "DENY", "ALLOW"]  # Istio's order; CUSTOM needs Mixer


def test_no_policy_means_no_filter() -> None:
    assert http_rbac_filters(security("")) == [] and network_rbac_filters(security("")) == []


# --- empty spec and empty rule ---------------------------------------------------------------


def test_allow_without_rules_matches_nothing_so_it_denies_all() -> None:
    [config] = rbac("  {}")
    assert config["rules"] == {"policies": {"ns[shop]-policy[p]-rule[0]": {
        "permissions": [{"notRule": {"any": True}}], "principals": [{"notId": {"any": True}}]}}}


def test_an_empty_rule_matches_everything() -> None:
    assert only_rule("  rules: [{}]") == {"permissions": [{"andRules": {"rules": [{"any": True}]}}],
                                          "principals": [{"andIds": {"ids": [{"any": True}]}}]}


# --- sources ---------------------------------------------------------------------------------


def test_principals_match_the_spiffe_uri_of_the_peer_certificate() -> None:
    ids = principal_ids("  rules: [{from: [{source: {principals: [cluster.local/ns/a/sa/b, '*', 'x*', '*/sa/c']}}]}]")
    names = [i["authenticated"]["principalName"] for i in ids[0]["orIds"]["ids"]]
    assert names == [{"exact": "spiffe://cluster.local/ns/a/sa/b"}, {"safeRegex": {"regex": ".+"}},
                     {"prefix": "spiffe://x"}, {"safeRegex": {"regex": "spiffe://.*/sa/c"}}]


def test_not_principals_and_namespaces() -> None:
    ids = principal_ids("  rules: [{from: [{source: {notPrincipals: [a/b], namespaces: ['te*st']}}]}]")
    assert ids[0]["notId"]["orIds"]["ids"][0]["authenticated"]["principalName"] == {"exact": "spiffe://a/b"}
    assert ids[1]["orIds"]["ids"][0]["authenticated"]["principalName"] == {"safeRegex": {"regex": ".*/ns/te.*st/.*"}}


def test_service_accounts_and_trust_domains() -> None:
    ids = principal_ids("  rules: [{from: [{source: {serviceAccounts: [web, other/batch], trustDomains: [td, '*']}}]}]")
    accounts = [i["authenticated"]["principalName"]["safeRegex"]["regex"] for i in ids[0]["orIds"]["ids"]]
    assert accounts == ["spiffe://.+/ns/shop/(.+/|)sa/web(/.+)?", "spiffe://.+/ns/other/(.+/|)sa/batch(/.+)?"]
    domains = [i["authenticated"]["principalName"] for i in ids[1]["orIds"]["ids"]]
    assert domains == [{"prefix": "spiffe://td/"}, {"prefix": "spiffe://"}]


def test_ip_blocks_are_the_direct_peer_and_remote_ip_blocks_the_original_client() -> None:
    ids = principal_ids("  rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, '::1'], notRemoteIpBlocks: [1.2.3.4]}}]}]")
    assert ids[0]["notId"]["orIds"]["ids"] == [{"remoteIp": {"addressPrefix": "1.2.3.4", "prefixLen": 32}}]
    assert ids[1]["orIds"]["ids"] == [{"directRemoteIp": {"addressPrefix": "10.0.0.0", "prefixLen": 8}},
                                      {"directRemoteIp": {"addressPrefix": "::1", "prefixLen": 128}}]


def claim(path: list[str], value: dict[str, Any]) -> dict[str, Any]:
    return {"filter": "envoy.filters.http.jwt_authn", "path": [{"key": k} for k in ["payload", *path]],
            "value": value}


def test_request_principals_split_issuer_and_subject_at_the_last_slash() -> None:
    [ids] = principal_ids("  rules: [{from: [{source: {requestPrincipals: ['https://idp.example/x/alice', '*']}}]}]")
    exact, anything = ids["orIds"]["ids"]
    assert exact["andIds"]["ids"] == [
        {"metadata": claim(["iss"], {"stringMatch": {"exact": "https://idp.example/x"}})},
        {"metadata": claim(["sub"], {"stringMatch": {"exact": "alice"}})}]
    assert anything["andIds"]["ids"][0]["metadata"]["value"] == {"stringMatch": {"safeRegex": {"regex": ".+"}}}


def test_when_claims_audiences_and_presenter_match_strings_or_lists() -> None:
    ids = principal_ids("""  rules: [{when: [{key: 'request.auth.claims[realm][role]', values: [admin]},
                                             {key: request.auth.audiences, notValues: [a, b]},
                                             {key: request.auth.presenter, values: [web]}]}]""")
    one = {"stringMatch": {"exact": "admin"}}
    assert ids[0] == {"metadata": claim(["realm", "role"], {"orMatch": {"valueMatchers": [
        {"listMatch": {"oneOf": one}}, one]}})}
    assert ids[1]["notId"]["metadata"]["path"][1] == {"key": "aud"}
    assert ids[2]["metadata"]["path"][1] == {"key": "azp"}


def test_when_headers_source_keys_and_destination_keys() -> None:
    rule = only_rule("""  rules: [{when: [{key: 'request.headers[x-user]', values: [alice, '*', 'pre*', '*suf']},
                                          {key: source.ip, values: [10.0.0.1]}, {key: remote.ip, values: ['::1/64']},
                                          {key: source.namespace, values: [a]}, {key: source.principal, values: [a/b]},
                                          {key: destination.ip, values: [127.0.0.1]},
                                          {key: destination.port, notValues: ['9000']},
                                          {key: connection.sni, values: ['*.example.com']}]}]""")
    ids = rule["principals"][0]["andIds"]["ids"]
    headers = [i["header"] for i in ids[0]["orIds"]["ids"]]
    assert headers == [{"name": "x-user", "stringMatch": {"exact": "alice"}}, {"name": "x-user", "presentMatch": True},
                       {"name": "x-user", "stringMatch": {"prefix": "pre"}},
                       {"name": "x-user", "stringMatch": {"suffix": "suf"}}]
    assert ids[1]["orIds"]["ids"] == [{"directRemoteIp": {"addressPrefix": "10.0.0.1", "prefixLen": 32}}]
    assert ids[2]["orIds"]["ids"] == [{"remoteIp": {"addressPrefix": "::1", "prefixLen": 64}}]
    assert "authenticated" in ids[3]["orIds"]["ids"][0] and "authenticated" in ids[4]["orIds"]["ids"][0]
    perms = rule["permissions"][0]["andRules"]["rules"]
    assert perms == [
        {"orRules": {"rules": [{"destinationIp": {"addressPrefix": "127.0.0.1", "prefixLen": 32}}]}},
        {"notRule": {"orRules": {"rules": [{"destinationPort": 9000}]}}},
        {"orRules": {"rules": [{"requestedServerName": {"suffix": ".example.com"}}]}},
    ]


# --- operations ------------------------------------------------------------------------------


def test_operations_hosts_methods_paths_ports_in_istio_order() -> None:
    rules = permission_rules("""  rules: [{to: [{operation: {ports: ['8080'], paths: [/a, '/b*', '*.png', '*'],
                                                           methods: [GET], notHosts: ['*.internal']}}]}]""")
    assert rules == [
        {"notRule": {"orRules": {"rules": [{"header": {"name": ":authority",
                                                       "stringMatch": {"suffix": ".internal", "ignoreCase": True}}}]}}},
        {"orRules": {"rules": [{"header": {"name": ":method", "stringMatch": {"exact": "GET"}}}]}},
        {"orRules": {"rules": [{"urlPath": {"path": {"exact": "/a"}}}, {"urlPath": {"path": {"prefix": "/b"}}},
                               {"urlPath": {"path": {"suffix": ".png"}}},
                               {"urlPath": {"path": {"safeRegex": {"regex": ".+"}}}}]}},
        {"orRules": {"rules": [{"destinationPort": 8080}]}},
    ]


def test_path_templates_use_envoys_uri_template_matcher() -> None:
    [rule] = permission_rules("  rules: [{to: [{operation: {paths: ['/v1/{*}/items/{**}']}}]}]")
    template = rule["orRules"]["rules"][0]["uriTemplate"]
    assert template["name"] == "uri-template"
    assert template["typedConfig"]["pathTemplate"] == "/v1/*/items/**"


def test_several_from_and_to_entries_are_alternatives() -> None:
    found = only_rule("  rules: [{from: [{source: {namespaces: [a]}}, {source: {namespaces: [b]}}],"
                      " to: [{operation: {methods: [GET]}}, {operation: {methods: [POST]}}]}]")
    assert len(found["principals"]) == 2 and len(found["permissions"]) == 2


# --- TCP ports -------------------------------------------------------------------------------


def test_on_tcp_an_allow_rule_with_http_attributes_is_dropped() -> None:
    [config] = rbac("  rules: [{to: [{operation: {methods: [GET]}}]}, {from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]",
                    tcp=True)
    assert config["statPrefix"] == "tcp."
    assert list(config["rules"]["policies"]) == ["ns[shop]-policy[p]-rule[1]"]


def test_on_tcp_a_deny_rule_loses_its_http_attributes_and_denies_more() -> None:
    rule = only_rule("  action: DENY\n  rules: [{to: [{operation: {methods: [GET], ports: ['5432']}}]}]", tcp=True)
    assert rule["permissions"][0]["andRules"]["rules"] == [{"orRules": {"rules": [{"destinationPort": 5432}]}}]


def test_on_tcp_an_allow_policy_whose_rules_all_need_http_denies_everything() -> None:
    [config] = rbac("  rules: [{when: [{key: request.auth.principal, values: ['*']}]}]", tcp=True)
    assert config["rules"] == {}  # ALLOW with no policy: nothing is allowed


def test_dry_run_policies_become_shadow_rules() -> None:
    text = ("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: p, namespace: shop, annotations: {istio.io/dry-run: 'true'}}\n"
            "spec: {action: DENY, rules: [{}]}\n")
    [flt] = http_rbac_filters(security(text))
    config = as_dict(flt)["typedConfig"]
    assert "rules" not in config and config["shadowRules"]["action"] == "DENY"
    assert config["shadowRulesStatPrefix"] == "istio_dry_run_deny_"


# --- listeners and the JWT filter ------------------------------------------------------------


def inbound_filters(text: str, jwks: dict[str, str] | None = None) -> dict[int, list[dict[str, Any]]]:
    """port -> the filters of its inbound listener (HTTP filters for HTTP ports)."""
    listeners = generate(build_mesh(objects(SERVICE + text), jwks=jwks), API)[typeurls.LISTENER]
    out = {}
    for name, listener in listeners.items():
        port = int(name.rsplit("_", 1)[1])
        if port == 15001:
            continue
        filters = as_dict(listener)["filterChains"][0]["filters"]
        out[port] = filters[0]["typedConfig"]["httpFilters"] if filters[0]["name"].endswith("manager") else filters
    return out


def test_http_ports_get_jwt_then_rbac_then_router_and_tcp_ports_rbac_then_tcp_proxy() -> None:
    text = policy("  rules: [{}]") + policy("  jwtRules: [{issuer: i, jwksUri: 'https://idp/keys'}]", "r",
                                             kind="RequestAuthentication")
    found = inbound_filters(text)
    assert [f["name"] for f in found[8080]] == ["envoy.filters.http.jwt_authn", "envoy.filters.http.rbac",
                                                "envoy.filters.http.router"]
    assert [f["name"] for f in found[5432]] == ["envoy.filters.network.rbac", "envoy.filters.network.tcp_proxy"]


def test_without_policies_the_inbound_listeners_are_unchanged() -> None:
    found = inbound_filters("")
    assert [f["name"] for f in found[8080]] == ["envoy.filters.http.router"]
    assert [f["name"] for f in found[5432]] == ["envoy.filters.network.tcp_proxy"]


def jwt_config(text: str, jwks: dict[str, str] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = inbound_filters(text, jwks)[8080][0]["typedConfig"]
    return config


def test_jwt_rule_fields_become_provider_fields() -> None:
    spec = """  jwtRules:
  - issuer: https://idp
    audiences: [a, b]
    jwks: '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'
    fromHeaders: [{name: x-token, prefix: 'Token '}]
    fromParams: [t]
    fromCookies: [c]
    outputPayloadToHeader: x-payload
    outputClaimToHeaders: [{header: x-sub, claim: sub}]
    forwardOriginalToken: true
    spaceDelimitedClaims: [roles]"""
    config = jwt_config(policy(spec, "r", kind="RequestAuthentication"))
    assert config["bypassCorsPreflight"] is True
    assert config["providers"]["origins-0"] == {
        "issuer": "https://idp", "audiences": ["a", "b"], "forward": True, "forwardPayloadHeader": "x-payload",
        "payloadInMetadata": "payload", "fromParams": ["t"], "fromCookies": ["c"],
        "fromHeaders": [{"name": "x-token", "valuePrefix": "Token "}],
        "claimToHeaders": [{"headerName": "x-sub", "claimName": "sub"}],
        "normalizePayloadInMetadata": {"spaceDelimitedClaims": ["permission", "roles", "scope"]},
        "localJwks": {"inlineString": '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'},
    }
    # One rule: that provider, or no token at all (a bad token is a 401, a missing one passes).
    assert config["rules"] == [{"match": {"prefix": "/"}, "requires": {"requiresAny": {"requirements": [
        {"providerName": "origins-0"}, {"allowMissing": {}}]}}}]


def test_jwks_uri_keys_come_from_the_fetched_map_and_fail_closed_until_fetched() -> None:
    text = policy("  jwtRules: [{issuer: b, jwksUri: 'https://idp/keys'}, {issuer: a}]", "r",
                  kind="RequestAuthentication")
    before = jwt_config(text)
    # Sorted by issuer: a (OpenID discovery) is origins-0, b (jwksUri) is origins-1.
    assert before["providers"]["origins-0"]["issuer"] == "a"
    assert {p["localJwks"]["inlineString"] for p in before["providers"].values()} == {UNVERIFIABLE_JWKS}
    fetched = {"https://idp/keys": '{"keys": [{"kty": "oct", "k": "YQ"}]}', "openid:a": '{"keys": []}'}
    after = jwt_config(text, fetched)
    assert after["providers"]["origins-1"]["localJwks"]["inlineString"] == fetched["https://idp/keys"]
    assert after["providers"]["origins-0"]["localJwks"]["inlineString"] == fetched["openid:a"]
    assert after["rules"][0]["requires"]["requiresAny"]["requirements"][:2] == [
        {"providerName": "origins-0"}, {"providerName": "origins-1"}]


def test_request_authentications_of_root_and_own_namespace_combine() -> None:
    keys = """'{"keys": [{"kty": "oct", "k": "YQ"}]}'"""

    def authn(issuer: str, name: str, namespace: str = "shop", selector: str = "") -> str:
        spec = (f"  selector: {{matchLabels: {{app: {selector}}}}}\n" if selector else "")
        return policy(spec + f"  jwtRules: [{{issuer: {issuer}, jwks: {keys}}}]", name, namespace,
                      "RequestAuthentication")

    text = authn("root", "r", "istio-system") + authn("own", "s", selector="api") + authn("web", "w", selector="web")
    assert [r.issuer for r in security(text).jwt] == ["own", "root"]


def test_a_policy_change_is_never_mistaken_for_an_endpoint_change() -> None:
    """The pusher's EDS-only fast path must not swallow a policy edit (listeners change)."""
    before = build_mesh(objects(SERVICE + policy("  rules: [{}]")))
    after = build_mesh(objects(SERVICE + policy("  action: DENY\n  rules: [{}]")))
    fetched = build_mesh(objects(SERVICE + policy("  jwtRules: [{issuer: i, jwksUri: 'https://k/'}]", "r",
                                                  kind="RequestAuthentication")), jwks={"https://k/": "{}"})
    unfetched = build_mesh(objects(SERVICE + policy("  jwtRules: [{issuer: i, jwksUri: 'https://k/'}]", "r",
                                                    kind="RequestAuthentication")))
    assert not endpoints_only(before, after)
    assert not endpoints_only(unfetched, fetched)
    assert endpoints_only(before, build_mesh(objects(SERVICE + policy("  rules: [{}]"))))
