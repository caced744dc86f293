"""DestinationRule traffic policy validation: Istio's rules, exact field paths, and warnings."""

from __future__ import annotations

from typing import Any

import pytest

from pilot.api import DestinationRule, InvalidObjectError, parse_object
from pilot.api.traffic_policy import is_prime


def rule(policy: dict[str, Any], subsets: list[dict[str, Any]] | None = None) -> DestinationRule:
    spec: dict[str, Any] = {"host": "reviews", "trafficPolicy": policy}
    if subsets is not None:
        spec["subsets"] = subsets
    doc = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "reviews", "namespace": "shop"},
        "spec": spec,
    }
    obj = parse_object(doc)
    assert isinstance(obj, DestinationRule)
    return obj


def issues(policy: dict[str, Any], subsets: list[dict[str, Any]] | None = None) -> list[str]:
    with pytest.raises(InvalidObjectError) as caught:
        rule(policy, subsets)
    assert str(caught.value).startswith("DestinationRule shop/reviews: ")
    return [str(i) for i in caught.value.issues]


P = "spec.trafficPolicy"


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ({}, f"{P}: traffic policy must set at least one field"),
        (
            {"loadBalancer": {"warmupDurationSecs": "10s", "warmup": {"duration": "10s"}}},
            f"{P}.loadBalancer: loadBalancer must set at most one of warmupDurationSecs, warmup",
        ),
        ({"loadBalancer": {"warmup": {"minimumPercent": 5}}}, f"{P}.loadBalancer.warmup.duration: required"),
        (
            {"loadBalancer": {"warmup": {"duration": "10s", "aggression": 0.5}}},
            f"{P}.loadBalancer.warmup.aggression: must be at least 1",
        ),
        ({"connectionPool": {}}, f"{P}.connectionPool: connection pool must set at least one of tcp, http"),
        (
            {"loadBalancer": {"simple": "RANDOM", "consistentHash": {"httpHeaderName": "x"}}},
            f"{P}.loadBalancer: loadBalancer must set at most one of simple, consistentHash",
        ),
        (
            {"loadBalancer": {"consistentHash": {"httpHeaderName": "x", "useSourceIp": True}}},
            f"{P}.loadBalancer.consistentHash: consistentHash must set at most one of httpHeaderName, "
            "httpCookie, useSourceIp, httpQueryParameterName",
        ),
        (
            {"loadBalancer": {"consistentHash": {"httpCookie": {"ttl": "1s"}}}},
            f"{P}.loadBalancer.consistentHash.httpCookie.name: required for httpCookie",
        ),
        (
            {"loadBalancer": {"consistentHash": {"httpHeaderName": "x", "maglev": {"tableSize": 65536}}}},
            f"{P}.loadBalancer.consistentHash.maglev.tableSize: must be a prime number",
        ),
        (
            {"loadBalancer": {"consistentHash": {"httpHeaderName": "x", "maglev": {}}}},
            f"{P}.loadBalancer.consistentHash.maglev.tableSize: must be set for maglev",
        ),
        (
            {"loadBalancer": {"consistentHash": {"useSourceIp": True, "minimumRingSize": 8, "ringHash": {}}}},
            f"{P}.loadBalancer.consistentHash.minimumRingSize: only one of minimumRingSize or "
            "maglev/ringHash can be specified",
        ),
        (
            {"connectionPool": {"http": {"h2UpgradePolicy": "UPGRADE", "useClientProtocol": True}}},
            f"{P}.connectionPool.http.useClientProtocol: must not be true when h2UpgradePolicy is UPGRADE",
        ),
        (
            {"outlierDetection": {"consecutiveLocalOriginFailures": 3}},
            f"{P}.outlierDetection.consecutiveLocalOriginFailures: is set but splitExternalLocalOriginErrors "
            "is not true",
        ),
        ({"tls": {"mode": "MUTUAL", "privateKey": "/k"}}, f"{P}.tls.clientCertificate: required when mode is MUTUAL"),
        (
            {"tls": {"mode": "SIMPLE", "insecureSkipVerify": True, "caCertificates": "/ca"}},
            f"{P}.tls.insecureSkipVerify: cannot be true with caCertificates, credentialName or subjectAltNames",
        ),
        (
            {"tls": {"mode": "MUTUAL", "credentialName": "c", "clientCertificate": "/c"}},
            f"{P}.tls.credentialName: cannot be set with clientCertificate, privateKey, caCertificates or caCrl",
        ),
        (
            {"portLevelSettings": [{"port": {"number": 80}}]},
            f"{P}.portLevelSettings[0]: port traffic policy must set at least one of loadBalancer, "
            "connectionPool, outlierDetection, tls",
        ),
    ],
)
def test_istio_rules_are_errors_with_field_paths(policy: dict[str, Any], expected: str) -> None:
    assert expected in issues(policy)


@pytest.mark.parametrize(
    ("policy", "path", "reason"),
    [
        ({"connectionPool": {"tcp": {"connectTimeout": "0.5ms"}}}, "connectionPool.tcp.connectTimeout", "at least 1ms"),
        ({"outlierDetection": {"interval": "1.5ms"}}, "outlierDetection.interval", "millisecond precision"),
        ({"outlierDetection": {"maxEjectionPercent": 101}}, "outlierDetection.maxEjectionPercent", "between 0"),
        ({"connectionPool": {"tcp": {"maxConnections": -1}}}, "connectionPool.tcp.maxConnections", "between 0"),
        ({"loadBalancer": {"simple": "FASTEST"}}, "loadBalancer.simple", "ROUND_ROBIN"),
        (
            {"connectionPool": {"http": {"h2UpgradePolicy": "SOMETIMES"}}},
            "connectionPool.http.h2UpgradePolicy",
            "UPGRADE",
        ),
        ({"tls": {"mode": "STRICT"}}, "tls.mode", "ISTIO_MUTUAL"),
    ],
)
def test_schema_errors_name_the_field(policy: dict[str, Any], path: str, reason: str) -> None:
    found = issues(policy)
    assert len(found) == 1 and found[0].startswith(f"{P}.{path}: ") and reason in found[0], found


def test_tcp_idle_timeout_zero_disables_and_is_valid() -> None:
    rule({"connectionPool": {"tcp": {"idleTimeout": "0s"}}})


def test_subset_and_port_level_policies_are_validated_too() -> None:
    found = issues(
        {"loadBalancer": {"simple": "RANDOM"}},
        [{"name": "v1", "trafficPolicy": {"portLevelSettings": [{"port": {"number": 80}, "connectionPool": {}}]}}],
    )
    assert found == [
        "spec.subsets[0].trafficPolicy.portLevelSettings[0].connectionPool: "
        "connection pool must set at least one of tcp, http"
    ]


def test_accepted_but_not_applied_fields_are_warnings() -> None:
    obj = rule(
        {
            "loadBalancer": {"consistentHash": {"minimumRingSize": 64}, "localityLbSetting": {"enabled": True}},
            "tls": {"mode": "ISTIO_MUTUAL", "sni": "x"},
            "outlierDetection": {"consecutiveErrors": 3},
            "tunnel": {"targetHost": "h", "targetPort": 1},
        }
    )
    warnings = {str(w) for w in obj.warnings}
    assert warnings == {
        f"{P}.tunnel: not supported yet; ignored",
        f"{P}.loadBalancer.localityLbSetting: not supported yet; ignored",
        f"{P}.loadBalancer.consistentHash.minimumRingSize: deprecated; use ringHash.minimumRingSize",
        f"{P}.loadBalancer.consistentHash: no hash key set: requests are spread at random",
        f"{P}.outlierDetection.consecutiveErrors: deprecated and ignored; use consecutive5xxErrors or "
        "consecutiveGatewayErrors",
        f"{P}.tls.mode: ISTIO_MUTUAL needs mesh certificates: from a proxy without a workload agent, "
        "traffic stays plaintext",
        f"{P}.tls: certificate fields should be empty when mode is ISTIO_MUTUAL",
    }


def test_warmup_with_a_balancer_envoy_cannot_slow_start_is_a_warning() -> None:
    obj = rule({"loadBalancer": {"simple": "RANDOM", "warmupDurationSecs": "30s"}})
    assert {str(w) for w in obj.warnings} == {
        f"{P}.loadBalancer: warmup applies to ROUND_ROBIN and LEAST_REQUEST balancing only; ignored"
    }


def test_is_prime_matches_maglev_rules() -> None:
    assert [n for n in range(20) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19]
    assert is_prime(65537) and not is_prime(65536)
