"""DestinationRule traffic policies (API shapes) to mesh-model policies (pure, one object at a time)."""

from __future__ import annotations

from pilot.api import traffic_policy as api
from pilot.api.destination_rule import PortTrafficPolicy
from pilot.api.destination_rule import TrafficPolicy as ApiTrafficPolicy
from pilot.model import policy as m


def traffic_policy(src: ApiTrafficPolicy | PortTrafficPolicy | None) -> m.TrafficPolicy:
    """One level of a policy; sections left out stay None so the levels can be combined."""
    if src is None:
        return m.NO_POLICY
    return m.TrafficPolicy(
        load_balancer=load_balancer(src.load_balancer),
        connection_pool=connection_pool(src.connection_pool),
        outlier_detection=outlier_detection(src.outlier_detection),
        tls=client_tls(src.tls),
    )


def port_policies(src: ApiTrafficPolicy | None) -> dict[int, m.TrafficPolicy]:
    if src is None:
        return {}
    return {p.port.number: traffic_policy(p) for p in src.port_level_settings if p.port is not None}


def load_balancer(src: api.LoadBalancerSettings | None) -> m.LoadBalancer | None:
    if src is None:
        return None
    simple = src.simple
    if simple == api.SimpleLB.LEAST_CONN:
        simple = api.SimpleLB.LEAST_REQUEST  # Istio's deprecated alias
    return m.LoadBalancer(
        simple=None if simple in (None, api.SimpleLB.UNSPECIFIED) else str(simple),
        consistent_hash=consistent_hash(src.consistent_hash),
        warmup=warmup(src),
    )


def warmup(src: api.LoadBalancerSettings) -> m.Warmup | None:
    if src.warmup is not None:
        return m.Warmup(src.warmup.duration, src.warmup.minimum_percent, src.warmup.aggression)
    if src.warmup_duration_secs is not None:
        return m.Warmup(src.warmup_duration_secs)
    return None


def consistent_hash(src: api.ConsistentHashLB | None) -> m.ConsistentHash | None:
    if src is None:
        return None
    cookie = src.http_cookie
    ring = src.ring_hash.minimum_ring_size if src.ring_hash else src.minimum_ring_size
    return m.ConsistentHash(
        header=src.http_header_name or None,
        cookie=m.HashCookie(cookie.name, cookie.path or None, cookie.ttl) if cookie else None,
        source_ip=bool(src.use_source_ip),
        query_parameter=src.http_query_parameter_name or None,
        algorithm="MAGLEV" if src.maglev is not None else "RING_HASH",
        minimum_ring_size=ring or None,
        table_size=src.maglev.table_size if src.maglev else None,
    )


def connection_pool(src: api.ConnectionPoolSettings | None) -> m.ConnectionPool | None:
    if src is None:
        return None
    tcp = src.tcp or api.TcpSettings()
    http = src.http or api.HttpSettings()
    keepalive = tcp.tcp_keepalive
    return m.ConnectionPool(
        max_connections=tcp.max_connections,
        connect_timeout=tcp.connect_timeout,
        tcp_keepalive=m.TcpKeepalive(keepalive.probes, keepalive.time, keepalive.interval) if keepalive else None,
        max_connection_duration=tcp.max_connection_duration,
        tcp_idle_timeout=tcp.idle_timeout,
        http1_max_pending_requests=http.http1_max_pending_requests,
        http2_max_requests=http.http2_max_requests,
        max_requests_per_connection=http.max_requests_per_connection,
        max_retries=http.max_retries,
        idle_timeout=http.idle_timeout,
        h2_upgrade_policy=str(http.h2_upgrade_policy) if http.h2_upgrade_policy else None,
        use_client_protocol=bool(http.use_client_protocol),
        max_concurrent_streams=http.max_concurrent_streams,
    )


def outlier_detection(src: api.OutlierDetection | None) -> m.OutlierDetection | None:
    if src is None:
        return None
    return m.OutlierDetection(
        consecutive_5xx_errors=src.consecutive_5xx_errors,
        consecutive_gateway_errors=src.consecutive_gateway_errors,
        consecutive_local_origin_failures=src.consecutive_local_origin_failures,
        split_external_local_origin_errors=bool(src.split_external_local_origin_errors),
        interval=src.interval,
        base_ejection_time=src.base_ejection_time,
        max_ejection_percent=src.max_ejection_percent,
        min_health_percent=src.min_health_percent,
    )


def client_tls(src: api.ClientTLSSettings | None) -> m.ClientTls | None:
    if src is None:
        return None
    return m.ClientTls(
        mode=str(src.mode),
        client_certificate=src.client_certificate or None,
        private_key=src.private_key or None,
        ca_certificates=src.ca_certificates or None,
        ca_crl=src.ca_crl or None,
        subject_alt_names=tuple(src.subject_alt_names),
        sni=src.sni or None,
        insecure_skip_verify=bool(src.insecure_skip_verify),
    )
