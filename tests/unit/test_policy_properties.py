"""Property test: any traffic policy Istio's rules accept translates into consistent clusters and
routes; anything else is rejected with InvalidObjectError, never a crash."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pilot.api import ApiObject, InvalidObjectError, parse_object
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate
from pilot.xds.snapshot import Snapshot

durations = st.sampled_from(["0s", "1ms", "0.5ms", "250ms", "10s", "1h", "bogus"])
counts = st.one_of(st.integers(-1, 5), st.sampled_from([1021, 65536, 65537, 2**31]))
hash_key = st.sampled_from(
    [
        {"httpHeaderName": "x-user"},
        {"httpCookie": {"name": "s", "ttl": "10s"}},
        {"httpCookie": {"path": "/"}},
        {"useSourceIp": True},
        {"httpQueryParameterName": "u"},
        {},
    ]
)
algorithm = st.sampled_from([{}, {"ringHash": {"minimumRingSize": 64}}, {"maglev": {"tableSize": 65537}}])
load_balancer = st.one_of(
    st.fixed_dictionaries({"simple": st.sampled_from(["ROUND_ROBIN", "LEAST_REQUEST", "RANDOM", "PASSTHROUGH"])}),
    st.builds(lambda k, a: {"consistentHash": {**k, **a}}, hash_key, algorithm),
)
pool = st.fixed_dictionaries(
    {},
    optional={
        "tcp": st.fixed_dictionaries({}, optional={"maxConnections": counts, "connectTimeout": durations}),
        "http": st.fixed_dictionaries(
            {},
            optional={
                "http1MaxPendingRequests": counts,
                "maxRequestsPerConnection": counts,
                "idleTimeout": durations,
                "h2UpgradePolicy": st.sampled_from(["DEFAULT", "UPGRADE"]),
                "useClientProtocol": st.booleans(),
            },
        ),
    },
)
outlier = st.fixed_dictionaries(
    {},
    optional={
        "consecutive5xxErrors": counts,
        "consecutiveGatewayErrors": counts,
        "interval": durations,
        "maxEjectionPercent": st.integers(-1, 101),
        "minHealthPercent": st.integers(0, 100),
    },
)
tls = st.sampled_from(
    [
        {"mode": "DISABLE"},
        {"mode": "SIMPLE"},
        {"mode": "SIMPLE", "insecureSkipVerify": True},
        {"mode": "MUTUAL"},
        {"mode": "ISTIO_MUTUAL"},
    ]
)
section = st.fixed_dictionaries(
    {}, optional={"loadBalancer": load_balancer, "connectionPool": pool, "outlierDetection": outlier, "tls": tls}
)
policy = st.builds(
    lambda top, port: {**top, **({"portLevelSettings": [{"port": {"number": 9080}, **port}]} if port else {})},
    section,
    section,
)

SERVICE = parse_object(
    {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": {"name": "reviews"},
        "spec": {
            "hosts": ["reviews.default.svc.cluster.local"],
            "resolution": "STATIC",
            "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}, {"number": 9090, "name": "grpc"}],
            "endpoints": [{"address": "127.0.9.1", "labels": {"v": "1"}}],
        },
    }
)


def rule(top: dict[str, Any], subset: dict[str, Any]) -> ApiObject:
    spec = {"host": "reviews", "trafficPolicy": top, "subsets": [{"name": "v1", "labels": {"v": "1"}}]}
    if subset:
        spec["subsets"][0]["trafficPolicy"] = subset  # type: ignore[index]
    doc = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "r"}, "spec": spec}
    return parse_object(doc)


@settings(max_examples=300, deadline=None)
@given(policy, policy)
def test_valid_policies_translate_consistently_and_invalid_ones_are_rejected(
    top: dict[str, Any], subset: dict[str, Any]
) -> None:
    try:
        dr = rule(top, subset)
    except InvalidObjectError as exc:
        assert exc.issues and all(i.path.startswith("spec.") for i in exc.issues)
        return
    mesh = build_mesh([SERVICE, dr])
    resources = generate(mesh, ProxyClass(ProxyKind.SIDECAR, "default", labels=(("app", "client"),)))
    assert Snapshot.from_resources(resources).consistency_errors() == []
