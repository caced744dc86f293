"""security.istio.io AuthorizationPolicy and RequestAuthentication: parsing, every field, and
Istio's validation messages, each at the field it is about."""

from __future__ import annotations

from typing import Any

import pytest

from pilot.api import (
    AuthorizationPolicy,
    InvalidObjectError,
    RequestAuthentication,
    UnsupportedKindError,
    parse_object,
)

EC_JWKS = ('{"keys": [{"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", '
           '"y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}')


def authz(spec: dict[str, Any], version: str = "v1", **meta: Any) -> dict[str, Any]:
    return {"apiVersion": f"security.istio.io/{version}", "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "shop", **meta}, "spec": spec}


def reqauthn(spec: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    return {"apiVersion": f"security.istio.io/{version}", "kind": "RequestAuthentication",
            "metadata": {"name": "r", "namespace": "shop"}, "spec": spec}


def issues(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidObjectError) as info:
        parse_object(doc)
    return {i.path: i.message for i in info.value.issues}


def rule(**parts: Any) -> dict[str, Any]:
    return {"rules": [parts]}


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_both_versions_parse_every_field(version: str) -> None:
    obj = parse_object(authz({
        "selector": {"matchLabels": {"app": "api"}},
        "action": "DENY",
        "rules": [{
            "from": [{"source": {
                "principals": ["cluster.local/ns/a/sa/b"], "notPrincipals": ["x"], "requestPrincipals": ["i/s"],
                "notRequestPrincipals": ["*"], "namespaces": ["a"], "notNamespaces": ["b"],
                "ipBlocks": ["10.0.0.0/8"], "notIpBlocks": ["10.1.0.0/16"], "remoteIpBlocks": ["1.2.3.4"],
                "notRemoteIpBlocks": ["::1"], "trustDomains": ["td"], "notTrustDomains": ["*.corp"]}}],
            "to": [{"operation": {"hosts": ["a"], "notHosts": ["b"], "ports": ["80"], "notPorts": ["81"],
                                  "methods": ["GET"], "notMethods": ["PUT"], "paths": ["/a"], "notPaths": ["/b*"]}}],
            "when": [{"key": "request.headers[x-a]", "values": ["1"], "notValues": ["2"]}],
        }],
    }, version))
    assert isinstance(obj, AuthorizationPolicy) and obj.warnings == ()
    source = obj.spec.rules[0].from_[0].source
    assert source is not None and source.not_remote_ip_blocks == ("::1",) and source.trust_domains == ("td",)
    assert obj.spec.rules[0].to[0].operation is not None and obj.spec.rules[0].to[0].operation.not_paths == ("/b*",)


def test_empty_spec_is_an_allow_policy_without_rules() -> None:
    obj = parse_object(authz({}))
    assert isinstance(obj, AuthorizationPolicy)
    assert obj.spec.action == "ALLOW" and obj.spec.rules == ()


def test_unknown_versions_are_not_served() -> None:  # PeerAuthentication is: tests/unit/test_peer_authentication.py
    with pytest.raises(UnsupportedKindError):
        parse_object(authz({}, version="v1alpha1"))
    with pytest.raises(UnsupportedKindError):  # a networking version under the security group
        parse_object(authz({}, version="v1alpha3"))


@pytest.mark.parametrize(("spec", "path", "message"), [
    ({"action": "DENY"}, "spec.rules", "DENY action without `rules` is meaningless as it will never be triggered, "
     "add an empty rule `{}` if you want it be triggered for every request"),
    ({"action": "CUSTOM", "provider": {"name": "x"}}, "spec.rules", "CUSTOM action without `rules` is meaningless"),
    ({"action": "CUSTOM", "rules": [{}]}, "spec.provider.name", "`provider.name` must not be empty"),
    ({"action": "DENY", "provider": {"name": "x"}, "rules": [{}]}, "spec.provider",
     "`provider` must not be with non CUSTOM action, found DENY"),
    ({"action": "CUSTOM", "provider": {"name": "x"}, **rule(**{"from": [{"source": {"principals": ["a"]}}]})},
     "spec.rules[0].from[0].source.principals", "From.Principals is currently not supported with CUSTOM action"),
    ({"action": "CUSTOM", "provider": {"name": "x"}, **rule(when=[{"key": "request.auth.claims[a]", "values": ["b"]}])},
     "spec.rules[0].when[0].key", "request.auth.claims[a] is currently not supported with CUSTOM action"),
    ({"action": "LOG"}, "spec.action", "must be one of"),
    ({"selector": {"matchLabels": {"a": "b"}}, "targetRefs": [{"kind": "Service", "name": "s"}]}, "spec",
     "only one of targetRefs or workloadSelector can be set"),
    ({"selector": {"matchLabels": {"a": "b*"}}}, "spec.selector.matchLabels", "wildcard is not supported in selector"),
    ({"targetRef": {"kind": "Service"}}, "spec.targetRef.name", "targetRef name must be set"),
    ({"targetRef": {"kind": "Service", "name": "s", "namespace": "x"}}, "spec.targetRef.namespace",
     "targetRef namespace must not be set; cross namespace referencing is not supported"),
    ({"targetRefs": [{"kind": "Pod", "name": "s"}]}, "spec.targetRefs[0]", "targetRef must be to one of"),
    (rule(**{"from": [{}]}), "spec.rules[0].from[0].source", "`from.source` must not be nil"),
    (rule(**{"from": [{"source": {}}]}), "spec.rules[0].from[0].source", "`from.source` must not be empty"),
    (rule(to=[{}]), "spec.rules[0].to[0].operation", "`to.operation` must not be nil"),
    (rule(to=[{"operation": {}}]), "spec.rules[0].to[0].operation", "`to.operation` must not be empty"),
    (rule(**{"from": [{"source": {"principals": ["a", ""]}}]}), "spec.rules[0].from[0].source.principals",
     "empty value not allowed, found in Principals"),
    (rule(**{"from": [{"source": {"notRequestPrincipals": [""]}}]}),
     "spec.rules[0].from[0].source.notRequestPrincipals", "empty value not allowed, found in NotRequestPrincipals"),
    (rule(**{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}), "spec.rules[0].from[0].source.ipBlocks",
     "bad CIDR range (10.0.0.0/33)"),
    (rule(**{"from": [{"source": {"remoteIpBlocks": ["1.2.3"]}}]}), "spec.rules[0].from[0].source.remoteIpBlocks",
     "bad IP address (1.2.3)"),
    (rule(**{"from": [{"source": {"namespaces": ["a"], "serviceAccounts": ["b"]}}]}), "spec.rules[0].from[0].source",
     "cannot set serviceAccounts with namespaces or principals"),
    (rule(**{"from": [{"source": {"serviceAccounts": ["a/b/c"]}}]}), "spec.rules[0].from[0].source.serviceAccounts",
     "expected format 'serviceAccount' or 'namespace/serviceAccount'"),
    (rule(**{"from": [{"source": {"serviceAccounts": ["a*"]}}]}), "spec.rules[0].from[0].source.serviceAccounts",
     "wildcard not allowed, found in ServiceAccounts"),
    (rule(**{"from": [{"source": {"trustDomains": ["a*b"]}}]}), "spec.rules[0].from[0].source.trustDomains",
     "wildcard is only allowed at the start or end, found in TrustDomains: 'a*b'"),
    (rule(**{"from": [{"source": {"notTrustDomains": ["a/b"]}}]}), "spec.rules[0].from[0].source.notTrustDomains",
     "trust domain must not contain '/', found in NotTrustDomains"),
    (rule(to=[{"operation": {"ports": ["70000"]}}]), "spec.rules[0].to[0].operation.ports", "bad port (70000)"),
    (rule(to=[{"operation": {"notPorts": ["http"]}}]), "spec.rules[0].to[0].operation.notPorts", "bad port (http)"),
    (rule(to=[{"operation": {"ports": ["\u00b2"]}}]), "spec.rules[0].to[0].operation.ports", "bad port (\u00b2)"),
    (rule(to=[{"operation": {"ports": [8080]}}]), "spec.rules[0].to[0].operation.ports[0]",
     "must be a string, not the number 8080"),
    (rule(to=[{"operation": {"methods": [""]}}]), "spec.rules[0].to[0].operation.methods",
     "empty value not allowed, found in Methods"),
    (rule(to=[{"operation": {"hosts": [""]}}]), "spec.rules[0].to[0].operation.hosts",
     "empty value not allowed, found in Hosts"),
    (rule(to=[{"operation": {"paths": ["/a/{**}/{*}"]}}]), "spec.rules[0].to[0].operation.paths",
     "invalid or unsupported path a/{**}/{*}, found in Paths. {**} is not the last operator"),
    (rule(to=[{"operation": {"notPaths": ["/a/{x}"]}}]), "spec.rules[0].to[0].operation.notPaths",
     "Contains '{' or '}' beyond a supported path template"),
    (rule(to=[{"operation": {"paths": ["/a b/{*}"]}}]), "spec.rules[0].to[0].operation.paths",
     "Contains segment a b with invalid string literal"),
    (rule(when=[{"values": ["a"]}]), "spec.rules[0].when[0].key", "`key` must not be empty"),
    (rule(when=[{"key": "source.ip"}]), "spec.rules[0].when[0]",
     "at least one of `values` or `notValues` must be set for key source.ip"),
    (rule(when=[{"key": "request.headers", "values": ["a"]}]), "spec.rules[0].when[0].values",
     "invalid `value` for `key` request.headers: bad key (request.headers): should have format a[b]"),
    (rule(when=[{"key": "source.ip", "notValues": ["x"]}]), "spec.rules[0].when[0].notValues",
     "invalid `notValue` for `key` source.ip: bad IP address (x)"),
    (rule(when=[{"key": "destination.port", "values": ["-1"]}]), "spec.rules[0].when[0].values", "bad port (-1)"),
    (rule(when=[{"key": "destination.namespace", "values": ["a"]}]), "spec.rules[0].when[0].values",
     "attribute destination.namespace is replaced by the metadata.namespace"),
    (rule(when=[{"key": "destination.labels[app]", "values": ["a"]}]), "spec.rules[0].when[0].values",
     "attribute destination.labels[app] is replaced by the workload selector"),
    (rule(when=[{"key": "destination.user", "values": ["a"]}]), "spec.rules[0].when[0].values",
     "deprecated attribute destination.user: only supported in v1alpha1"),
    (rule(when=[{"key": "request.size", "values": ["a"]}]), "spec.rules[0].when[0].values",
     "unknown attribute: request.size"),
    (rule(when=[{"key": "source.principal", "values": [""]}]), "spec.rules[0].when[0].values",
     "empty value not allowed, found in source.principal"),
])
def test_authorization_policy_validation(spec: dict[str, Any], path: str, message: str) -> None:
    found = issues(authz(spec))
    assert path in found, found
    assert message in found[path], found


@pytest.mark.parametrize("key", [
    "request.headers[x-user]", "source.ip", "remote.ip", "source.namespace", "source.principal",
    "source.serviceAccount", "source.trustDomain", "request.auth.principal", "request.auth.audiences",
    "request.auth.presenter", "request.auth.claims[groups]", "request.auth.claims[a][b]", "destination.ip",
    "destination.port", "connection.sni", "experimental.envoy.filters.http.x[y]",
])
def test_every_documented_when_key_is_accepted(key: str) -> None:
    value = {"source.ip": "10.0.0.1", "remote.ip": "10.0.0.0/8", "destination.ip": "::1", "destination.port": "80",
             "source.serviceAccount": "ns/sa"}.get(key, "v")
    obj = parse_object(authz(rule(when=[{"key": key, "values": [value]}])))
    assert isinstance(obj, AuthorizationPolicy)


def test_dry_run_annotation() -> None:
    ok = parse_object(authz({"action": "DENY", "rules": [{}]}, annotations={"istio.io/dry-run": "true"}))
    assert isinstance(ok, AuthorizationPolicy) and ok.dry_run
    assert not parse_object(authz({}, annotations={"istio.io/dry-run": "false"})).dry_run  # type: ignore[attr-defined]
    bad = issues(authz({}, annotations={"istio.io/dry-run": "maybe"}))
    assert "invalid value (maybe)" in bad["metadata.annotations.istio.io/dry-run"]
    audit = issues(authz({"action": "AUDIT", "rules": [{}]}, annotations={"istio.io/dry-run": "true"}))
    assert "currently only supports action ALLOW/DENY" in audit["metadata.annotations.istio.io/dry-run"]


def test_deny_with_only_http_attributes_warns_about_tcp_ports() -> None:
    obj = parse_object(authz({"action": "DENY", **rule(to=[{"operation": {"methods": ["GET"]}}])}))
    assert any("deny all traffic to TCP ports" in w.message for w in obj.warnings), obj.warnings
    scoped = parse_object(authz({"action": "DENY", **rule(to=[{"operation": {"methods": ["GET"], "ports": ["80"]}}])}))
    assert not scoped.warnings


def test_selector_without_labels_warns() -> None:
    obj = parse_object(authz({"selector": {}}))
    assert [w.message for w in obj.warnings] == ["workload selector specified without labels"]


def test_request_authentication_every_field() -> None:
    obj = parse_object(reqauthn({
        "selector": {"matchLabels": {"app": "api"}},
        "jwtRules": [{
            "issuer": "https://issuer", "audiences": ["a"], "jwks": EC_JWKS, "fromHeaders": [{"name": "x-jwt",
            "prefix": "Bearer "}], "fromParams": ["t"], "fromCookies": ["c"], "outputPayloadToHeader": "x-payload",
            "forwardOriginalToken": True, "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}],
            "spaceDelimitedClaims": ["roles"], "timeout": "3s",
        }, {"jwksUri": "https://keys.example.com/jwks.json"}],
    }, "v1beta1"))
    assert isinstance(obj, RequestAuthentication) and obj.warnings == ()
    first = obj.spec.jwt_rules[0]
    assert first.from_headers[0].prefix == "Bearer "
    assert first.timeout is not None and first.timeout.total_seconds() == 3


@pytest.mark.parametrize(("rule_spec", "path", "message"), [
    ({}, "spec.jwtRules[0]", "issuer or jwksUri must be non-empty string"),
    ({"issuer": "i", "audiences": [""]}, "spec.jwtRules[0].audiences[0]", "audience must be non-empty string"),
    ({"issuer": "i", "jwksUri": "ftp://x/keys"}, "spec.jwtRules[0].jwksUri", "URI scheme 'ftp' is not supported"),
    ({"issuer": "i", "jwks": "{not json"}, "spec.jwtRules[0].jwks", "jwks parse error"),
    ({"issuer": "i", "jwks": '{"keys": [{"n": "x"}]}'}, "spec.jwtRules[0].jwks", "jwks parse error"),
    ({"issuer": "i", "jwks": '{"keys": []}'}, "spec.jwtRules[0].jwks", "must have a non-empty `keys` list"),
    ({"issuer": "i", "jwks": '{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}'}, "spec.jwtRules[0].jwks",
     "key at index 0: e must be >= 3 and < n"),
    ({"issuer": "i", "jwks": '{"keys": [{"kty": "RSA", "e": "AQAB"}]}'}, "spec.jwtRules[0].jwks", "`n` is missing"),
    ({"issuer": "i", "jwks": '{"kty": "EC", "crv": "P-256", "x": "AQ", "y": "AQ"}'}, "spec.jwtRules[0].jwks",
     "key at index 0:"),
    ({"issuer": "i", "jwks": '{"kty": "EC", "crv": "P-192", "x": "AQ", "y": "AQ"}'}, "spec.jwtRules[0].jwks",
     "crv 'P-192' is not P-256, P-384 or P-521"),
    ({"issuer": "i", "jwks": '{"kty": "oct", "k": "YQ", "alg": "RS256"}'}, "spec.jwtRules[0].jwks",
     "alg 'RS256' does not fit kty oct"),
    ({"issuer": "i", "jwks": '{"kty": "OKP", "crv": "Ed25519", "x": "YQ"}'}, "spec.jwtRules[0].jwks",
     "an OKP key must be crv Ed25519 with a 32-byte `x`"),
    ({"issuer": "i", "jwks": '{"kty": "DSA"}'}, "spec.jwtRules[0].jwks", "kty 'DSA' is not RSA, EC, oct or OKP"),
    ({"issuer": "i", "fromHeaders": [{"prefix": "B"}]}, "spec.jwtRules[0].fromHeaders[0].name",
     "location header name must be non-empty string"),
    ({"issuer": "i", "fromParams": [""]}, "spec.jwtRules[0].fromParams[0]", "location query must be non-empty string"),
    ({"issuer": "i", "fromCookies": [""]}, "spec.jwtRules[0].fromCookies[0]", "cookie name must be non-empty string"),
    ({"issuer": "i", "outputClaimToHeaders": [{"header": "x"}]}, "spec.jwtRules[0].outputClaimToHeaders[0]",
     "outputClaimToHeaders header and claim value must be non-empty string"),
    ({"issuer": "i", "outputClaimToHeaders": [{"header": "x y", "claim": "c"}]},
     "spec.jwtRules[0].outputClaimToHeaders[0].header", "header name x y is not a valid header name"),
    ({"issuer": "i", "outputPayloadToHeader": "x:y"}, "spec.jwtRules[0].outputPayloadToHeader",
     "header name x:y is not a valid header name"),
    ({"issuer": "i", "timeout": "soon"}, "spec.jwtRules[0].timeout", "is not a duration"),
])
def test_request_authentication_validation(rule_spec: dict[str, Any], path: str, message: str) -> None:
    found = issues(reqauthn({"jwtRules": [rule_spec]}))
    assert path in found, found
    assert message in found[path], found


def test_private_key_material_in_jwks_warns() -> None:
    private = EC_JWKS.replace('"kty"', '"d": "c2VjcmV0", "kty"')
    obj = parse_object(reqauthn({"jwtRules": [{"issuer": "i", "jwks": private}]}))
    assert [w.message for w in obj.warnings] == [
        "jwks key at index 0 contains private key material; only public keys are used for verification"]
