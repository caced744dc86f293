"""DestinationRule policy: Istio's level merging, defaults, and the Envoy cluster/route fields."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo

from pilot.api import ApiObject, parse_object
from pilot.model.build import build_mesh
from pilot.model.mesh import MeshSnapshot
from pilot.translate.clusters import outbound_clusters
from pilot.translate.encoded import as_message
from pilot.translate.endpoints import load_assignments
from pilot.translate.policy import UNLIMITED, cluster_hash_policies

Cluster = cluster_pb2.Cluster
HOST = "reviews.default.svc.cluster.local"


def obj(kind: str, spec: dict[str, Any]) -> ApiObject:
    meta = {"name": "reviews", "namespace": "default"}
    return parse_object({"apiVersion": "networking.istio.io/v1", "kind": kind, "metadata": meta, "spec": spec})


SERVICE = obj(
    "ServiceEntry",
    {
        "hosts": [HOST],
        "resolution": "STATIC",
        "location": "MESH_INTERNAL",
        "ports": [
            {"number": 9080, "name": "http", "protocol": "HTTP"},
            {"number": 9090, "name": "tcp", "protocol": "TCP"},
        ],
        "endpoints": [{"address": "127.0.9.1", "labels": {"version": "v1"}}],
    },
)


def mesh(policy: dict[str, Any] | None = None, subsets: list[dict[str, Any]] | None = None) -> MeshSnapshot:
    spec: dict[str, Any] = {"host": "reviews", "subsets": subsets or []}
    if policy is not None:
        spec["trafficPolicy"] = policy
    return build_mesh([SERVICE, obj("DestinationRule", spec)])


def cluster(m: MeshSnapshot, port: int = 9080, subset: str = "") -> Any:
    """The cluster's message (generators keep outbound clusters as their encodings)."""
    return as_message(outbound_clusters(m)[f"outbound|{port}|{subset}|{HOST}"])


def thresholds(c: Any) -> tuple[int, int, int, int]:
    t = c.circuit_breakers.thresholds[0]
    return (t.max_connections.value, t.max_pending_requests.value, t.max_requests.value, t.max_retries.value)


def test_istio_defaults_without_a_policy() -> None:
    c = cluster(mesh())
    assert c.lb_policy == Cluster.LEAST_REQUEST
    assert c.connect_timeout.seconds == 10
    assert thresholds(c) == (UNLIMITED,) * 4 and c.circuit_breakers.thresholds[0].track_remaining
    assert not c.HasField("outlier_detection") and not c.HasField("transport_socket")


def test_port_level_settings_replace_the_rule_level_whole() -> None:
    m = mesh(
        {
            "loadBalancer": {"simple": "RANDOM"},
            "connectionPool": {"tcp": {"maxConnections": 7}},
            "portLevelSettings": [{"port": {"number": 9090}, "outlierDetection": {"consecutive5xxErrors": 3}}],
        }
    )
    assert cluster(m, 9080).lb_policy == Cluster.RANDOM and thresholds(cluster(m, 9080))[0] == 7
    port = cluster(m, 9090)
    # Not inherited from the rule level: Istio's defaults apply to what the port entry leaves out.
    assert port.lb_policy == Cluster.LEAST_REQUEST and thresholds(port)[0] == UNLIMITED
    assert port.outlier_detection.consecutive_5xx.value == 3


def test_subsets_replace_whole_sections_and_inherit_the_others() -> None:
    m = mesh(
        {
            "loadBalancer": {"simple": "RANDOM"},
            "connectionPool": {"tcp": {"maxConnections": 7, "connectTimeout": "2s"}},
        },
        [
            {
                "name": "v1",
                "labels": {"version": "v1"},
                "trafficPolicy": {"connectionPool": {"http": {"maxRetries": 2}}},
            },
            {
                "name": "v2",
                "labels": {"version": "v2"},
                "trafficPolicy": {
                    "loadBalancer": {"simple": "ROUND_ROBIN"},
                    "portLevelSettings": [{"port": {"number": 9080}, "connectionPool": {"tcp": {"maxConnections": 1}}}],
                },
            },
        ],
    )
    v1 = cluster(m, 9080, "v1")
    assert v1.lb_policy == Cluster.RANDOM  # inherited section
    assert thresholds(v1) == (UNLIMITED, UNLIMITED, UNLIMITED, 2) and v1.connect_timeout.seconds == 10  # replaced whole
    v2 = cluster(m, 9080, "v2")
    assert v2.lb_policy == Cluster.LEAST_REQUEST and thresholds(v2)[0] == 1  # subset port-level replaces everything
    assert cluster(m, 9090, "v2").lb_policy == Cluster.ROUND_ROBIN
    assert thresholds(cluster(m, 9090, "v2"))[0] == 7


def test_connection_pool_fields() -> None:
    c = cluster(
        mesh(
            {
                "connectionPool": {
                    "tcp": {"maxConnections": 1, "connectTimeout": "250ms", "tcpKeepalive": {"time": "90s"}},
                    "http": {
                        "http1MaxPendingRequests": 2,
                        "http2MaxRequests": 3,
                        "maxRetries": 0,  # Istio: 0 means unset
                        "maxRequestsPerConnection": 1,
                        "idleTimeout": "5s",
                        "h2UpgradePolicy": "UPGRADE",
                    },
                }
            }
        )
    )
    assert thresholds(c) == (1, 2, 3, UNLIMITED)
    assert c.connect_timeout.ToMilliseconds() == 250
    assert c.upstream_connection_options.tcp_keepalive.keepalive_time.value == 90
    options = _http_options(c)
    assert options.explicit_http_config.HasField("http2_protocol_options")  # upgraded
    assert options.common_http_protocol_options.max_requests_per_connection.value == 1
    assert options.common_http_protocol_options.idle_timeout.seconds == 5


def _http_options(c: Any) -> Any:
    options = hpo.HttpProtocolOptions()
    c.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(options)
    return options


@pytest.mark.parametrize(
    ("outlier", "expected"),
    [
        # (consecutive_5xx, enforcing_5xx, gateway, enforcing_gateway, max_ejection_percent, panic threshold)
        ({"interval": "1s"}, (None, None, None, None, None, 0.0)),  # Envoy's 5 consecutive 5xx stays on
        ({"consecutive5xxErrors": 0}, (0, 0, None, None, None, 0.0)),  # 0 disables
        ({"consecutive5xxErrors": 2, "consecutiveGatewayErrors": 1}, (2, 100, 1, 100, None, 0.0)),
        ({"maxEjectionPercent": 0, "minHealthPercent": 40}, (None, None, None, None, None, 40.0)),
        ({"maxEjectionPercent": 100}, (None, None, None, None, 100, 0.0)),
    ],
)
def test_outlier_detection_follows_istio(outlier: dict[str, Any], expected: tuple[Any, ...]) -> None:
    c = cluster(mesh({"outlierDetection": outlier}))
    od = c.outlier_detection

    def value(field: str) -> Any:
        return getattr(od, field).value if od.HasField(field) else None

    fields = (
        "consecutive_5xx",
        "enforcing_consecutive_5xx",
        "consecutive_gateway_failure",
        "enforcing_consecutive_gateway_failure",
        "max_ejection_percent",
    )
    assert (*(value(f) for f in fields), c.common_lb_config.healthy_panic_threshold.value) == expected
    assert od.HasField("enforcing_success_rate") and od.enforcing_success_rate.value == 0


def test_consistent_hash_sets_cluster_and_route_hash_policies() -> None:
    m = mesh(
        {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}},
        [{"name": "v1", "labels": {"version": "v1"}, "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}],
    )
    c = cluster(m)
    assert c.lb_policy == Cluster.RING_HASH and c.ring_hash_lb_config.minimum_ring_size.value == 1024
    [policy] = cluster_hash_policies(m, [f"outbound|9080||{HOST}"])
    assert policy.header.header_name == "x-user"
    # The first destination whose policy hashes decides; a subset without hashing contributes nothing.
    assert cluster_hash_policies(m, [f"outbound|9080|v1|{HOST}"]) == []
    assert cluster_hash_policies(m, [f"outbound|9080|v1|{HOST}", f"outbound|9080||{HOST}"]) == [policy]
    assert cluster_hash_policies(m, ["inbound|9080||", "bogus"]) == []


def test_maglev_and_cookie() -> None:
    ch = {"httpCookie": {"name": "s", "ttl": "0s"}, "maglev": {"tableSize": 1021}}
    m = mesh({"loadBalancer": {"consistentHash": ch}})
    c = cluster(m)
    assert c.lb_policy == Cluster.MAGLEV and c.maglev_lb_config.table_size.value == 1021
    [policy] = cluster_hash_policies(m, [f"outbound|9080||{HOST}"])
    assert policy.cookie.name == "s" and policy.cookie.HasField("ttl") and policy.cookie.ttl.seconds == 0


def test_passthrough_is_an_original_destination_cluster_without_eds() -> None:
    m = mesh({"loadBalancer": {"simple": "PASSTHROUGH"}})
    c = cluster(m)
    assert c.type == Cluster.ORIGINAL_DST and c.lb_policy == Cluster.CLUSTER_PROVIDED
    assert c.original_dst_lb_config.use_http_header and not c.HasField("eds_cluster_config")
    assert f"outbound|9080||{HOST}" not in load_assignments(m)


def test_least_conn_is_least_request_and_tcp_ports_get_no_http_options() -> None:
    c = cluster(mesh({"loadBalancer": {"simple": "LEAST_CONN"}}), 9090)
    assert c.lb_policy == Cluster.LEAST_REQUEST and not c.typed_extension_protocol_options


def test_simple_tls_uses_system_roots_and_auto_sni() -> None:
    c = cluster(mesh({"tls": {"mode": "SIMPLE"}}))
    assert c.transport_socket.name == "envoy.transport_sockets.tls"
    options = _http_options(c)
    assert options.upstream_http_protocol_options.auto_sni
    assert options.upstream_http_protocol_options.auto_san_validation
