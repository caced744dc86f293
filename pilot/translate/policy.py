"""DestinationRule traffic policy on Envoy clusters: load balancer, connection pool, HTTP options.

Istio's defaults are applied here, so an empty policy gives what Istio gives: LEAST_REQUEST,
a 10s connect timeout and circuit-breaker thresholds of 2^32-1 (Envoy's own 1024 would shed
load under a burst that Istio lets through). Zero in a connection-pool limit means "unset",
as in Istio. Pure functions of their arguments.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import protocol_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo_pb2

from pilot.model.mesh import MeshSnapshot, ServicePort
from pilot.model.policy import ClientTls, ConnectionPool, ConsistentHash, LoadBalancer, TrafficPolicy, Warmup
from pilot.translate import names
from pilot.translate.outlier import apply_outlier_detection
from pilot.translate.upstream_tls import apply_upstream_tls

Cluster = cluster_pb2.Cluster
UNLIMITED = 2**32 - 1
DEFAULT_RING_SIZE = 1024  # what Istio sets when consistentHash names no algorithm
_SIMPLE = {"ROUND_ROBIN": Cluster.ROUND_ROBIN, "LEAST_REQUEST": Cluster.LEAST_REQUEST, "RANDOM": Cluster.RANDOM}
_LIMITS = (
    ("max_connections", "max_connections"),
    ("max_pending_requests", "http1_max_pending_requests"),
    ("max_requests", "http2_max_requests"),
    ("max_retries", "max_retries"),
)


def apply_traffic_policy(cluster: Any, policy: TrafficPolicy, port: ServicePort) -> None:
    """Everything a (merged) policy sets on an outbound cluster, Istio defaults included."""
    pool = policy.connection_pool or ConnectionPool()
    apply_connection_limits(cluster, pool)
    apply_outlier_detection(cluster, policy.outlier_detection)
    apply_load_balancer(cluster, policy.load_balancer)
    if port.is_http:
        set_http_options(cluster, _uses_http2(port, pool), pool, policy.tls)
    apply_upstream_tls(cluster, policy.tls, http2=port.is_http and _uses_http2(port, pool))


def _uses_http2(port: ServicePort, pool: ConnectionPool) -> bool:
    return port.is_http2 or (pool.h2_upgrade_policy == "UPGRADE" and not pool.use_client_protocol)


def apply_connection_limits(cluster: Any, pool: ConnectionPool) -> None:
    """connect_timeout, circuit-breaker thresholds and TCP keepalive (for any cluster)."""
    timeout = pool.connect_timeout or timedelta(seconds=names.DEFAULT_CONNECT_TIMEOUT_SECONDS)
    cluster.connect_timeout.FromTimedelta(timeout)
    thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds(track_remaining=True)
    for envoy_field, pool_field in _LIMITS:
        getattr(thresholds, envoy_field).value = getattr(pool, pool_field) or UNLIMITED
    cluster.circuit_breakers.thresholds.append(thresholds)
    keepalive = pool.tcp_keepalive
    if keepalive is not None:
        out = cluster.upstream_connection_options.tcp_keepalive
        out.SetInParent()
        if keepalive.probes:
            out.keepalive_probes.value = keepalive.probes
        if keepalive.time is not None:
            out.keepalive_time.value = max(1, int(keepalive.time.total_seconds()))
        if keepalive.interval is not None:
            out.keepalive_interval.value = max(1, int(keepalive.interval.total_seconds()))


def apply_load_balancer(cluster: Any, lb: LoadBalancer | None) -> None:
    """lb_policy; PASSTHROUGH turns the cluster into an original-destination cluster."""
    if cluster.type == Cluster.ORIGINAL_DST:
        cluster.lb_policy = Cluster.CLUSTER_PROVIDED
        return
    if lb is not None and lb.simple == "PASSTHROUGH":
        _passthrough(cluster)
        return
    if lb is not None and lb.consistent_hash is not None:
        _consistent_hash(cluster, lb.consistent_hash)
        return
    simple = lb.simple if lb is not None else None
    cluster.lb_policy = _SIMPLE.get(simple or "", Cluster.LEAST_REQUEST)
    if lb is not None and lb.warmup is not None:
        _slow_start(cluster, lb.warmup)


def _slow_start(cluster: Any, warmup: Warmup) -> None:
    """Istio's warmup: Envoy's slow start, for round robin and least request only (RANDOM has none)."""
    if cluster.lb_policy == Cluster.ROUND_ROBIN:
        config = cluster.round_robin_lb_config.slow_start_config
    elif cluster.lb_policy == Cluster.LEAST_REQUEST:
        config = cluster.least_request_lb_config.slow_start_config
    else:
        return
    config.slow_start_window.FromTimedelta(warmup.window)
    if warmup.aggression is not None:
        config.aggression.default_value = warmup.aggression
        config.aggression.runtime_key = "upstream.slow_start.aggression"
    if warmup.min_percent is not None:
        config.min_weight_percent.value = warmup.min_percent


def _passthrough(cluster: Any) -> None:
    """Forward to the address the caller asked for, without balancing.

    A local-mesh app has no iptables redirect, so the original destination comes from the
    ``x-envoy-original-dst-host: <ip>:<port>`` request header.
    """
    cluster.type = Cluster.ORIGINAL_DST
    cluster.lb_policy = Cluster.CLUSTER_PROVIDED
    cluster.ClearField("eds_cluster_config")
    cluster.ClearField("load_assignment")
    cluster.original_dst_lb_config.use_http_header = True


def _consistent_hash(cluster: Any, ch: ConsistentHash) -> None:
    if ch.algorithm == "MAGLEV":
        cluster.lb_policy = Cluster.MAGLEV
        if ch.table_size:
            cluster.maglev_lb_config.table_size.value = ch.table_size
        return
    cluster.lb_policy = Cluster.RING_HASH
    cluster.ring_hash_lb_config.minimum_ring_size.value = ch.minimum_ring_size or DEFAULT_RING_SIZE


def set_http_options(
    cluster: Any, http2: bool, pool: ConnectionPool | None = None, tls: ClientTls | None = None
) -> None:
    """HttpProtocolOptions: the upstream protocol, and the pool's per-connection settings."""
    pool = pool or ConnectionPool()
    options = hpo_pb2.HttpProtocolOptions()
    h2 = protocol_pb2.Http2ProtocolOptions()
    if pool.max_concurrent_streams:
        h2.max_concurrent_streams.value = pool.max_concurrent_streams
    if pool.use_client_protocol:
        downstream = options.use_downstream_protocol_config
        downstream.http_protocol_options.SetInParent()
        downstream.http2_protocol_options.CopyFrom(h2)
    elif http2:
        options.explicit_http_config.http2_protocol_options.CopyFrom(h2)
    else:
        options.explicit_http_config.http_protocol_options.SetInParent()
    common = options.common_http_protocol_options
    idle = pool.idle_timeout if pool.idle_timeout is not None else pool.tcp_idle_timeout
    if idle is not None:
        common.idle_timeout.FromTimedelta(idle)
    if pool.max_requests_per_connection:
        common.max_requests_per_connection.value = pool.max_requests_per_connection
    if pool.max_connection_duration is not None:
        common.max_connection_duration.FromTimedelta(pool.max_connection_duration)
    if tls is not None and tls.mode in ("SIMPLE", "MUTUAL") and not tls.sni:
        # Istio: without an explicit SNI, send the request's host and check the certificate against it.
        options.upstream_http_protocol_options.auto_sni = True
        verify = not tls.subject_alt_names and not tls.insecure_skip_verify
        options.upstream_http_protocol_options.auto_san_validation = verify
    cluster.typed_extension_protocol_options[names.HTTP_PROTOCOL_OPTIONS].Pack(options)


def route_hash_policies(mesh: MeshSnapshot, host: str, subset: str, port: int) -> list[Any]:
    """Route-side hash keys for a destination whose policy uses consistent hashing (else [])."""
    rule = mesh.destination_rules.get(host)
    lb = rule.policy_for(port, subset).load_balancer if rule is not None else None
    if lb is None or lb.consistent_hash is None:
        return []
    ch = lb.consistent_hash
    policy = rc.RouteAction.HashPolicy()
    if ch.header:
        policy.header.header_name = ch.header
    elif ch.cookie is not None:
        policy.cookie.name = ch.cookie.name
        if ch.cookie.path:
            policy.cookie.path = ch.cookie.path
        if ch.cookie.ttl is not None:
            policy.cookie.ttl.FromTimedelta(ch.cookie.ttl)
    elif ch.source_ip:
        policy.connection_properties.source_ip = True
    elif ch.query_parameter:
        policy.query_parameter.name = ch.query_parameter
    else:
        return []
    return [policy]


def cluster_hash_policies(mesh: MeshSnapshot, clusters: Iterable[str]) -> list[Any]:
    """Hash keys for a route to ``clusters`` (outbound names, in route order).

    Envoy takes one hash policy per route, so with weighted destinations the first one
    whose policy hashes decides.
    """
    for name in clusters:
        direction, port, subset, host = [*name.split("|"), "", "", ""][:4]
        if direction == "outbound" and port.isascii() and port.isdigit():
            found = route_hash_policies(mesh, host, subset, int(port))
            if found:
                return found
    return []
