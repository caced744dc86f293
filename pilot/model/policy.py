"""DestinationRule traffic policy in the mesh model, and Istio's rules for combining levels.

A policy has four sections (load balancer, connection pool, outlier detection, TLS). Values
are what the user wrote (None = unset); Istio's defaults are applied by the generators, so a
dumped model shows intent, not defaults. Everything is frozen.

Istio combines the levels of a DestinationRule for one cluster (port, subset) like this:

1. the rule's ``portLevelSettings`` entry for the port, if any, replaces the rule-level policy
   *whole*: sections it leaves out fall back to defaults, not to the rule level;
2. each section the subset's policy sets replaces that section (sections are not merged
   field by field);
3. the subset's ``portLevelSettings`` entry for the port, if any, replaces all four sections.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal


@dataclass(frozen=True, slots=True)
class HashCookie:
    name: str
    path: str | None = None
    ttl: timedelta | None = None  # None: no cookie is generated; 0: a session cookie


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    """Hash key (at most one set) and algorithm of a consistent-hash load balancer."""

    header: str | None = None
    cookie: HashCookie | None = None
    source_ip: bool = False
    query_parameter: str | None = None
    algorithm: Literal["RING_HASH", "MAGLEV"] = "RING_HASH"
    minimum_ring_size: int | None = None
    table_size: int | None = None


@dataclass(frozen=True, slots=True)
class Warmup:
    """Slow start: a new endpoint's weight ramps up over `window` (Envoy's defaults when None)."""

    window: timedelta
    min_percent: float | None = None
    aggression: float | None = None


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    simple: str | None = None  # ROUND_ROBIN, LEAST_REQUEST, RANDOM, PASSTHROUGH; None: Istio's default
    consistent_hash: ConsistentHash | None = None
    warmup: Warmup | None = None


@dataclass(frozen=True, slots=True)
class TcpKeepalive:
    probes: int | None = None
    time: timedelta | None = None
    interval: timedelta | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    """``connectionPool.tcp`` and ``.http`` flattened; names follow Istio's fields."""

    max_connections: int | None = None
    connect_timeout: timedelta | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: timedelta | None = None
    tcp_idle_timeout: timedelta | None = None
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: timedelta | None = None
    h2_upgrade_policy: str | None = None  # DEFAULT, DO_NOT_UPGRADE, UPGRADE
    use_client_protocol: bool = False
    max_concurrent_streams: int | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx_errors: int | None = None
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = None
    split_external_local_origin_errors: bool = False
    interval: timedelta | None = None
    base_ejection_time: timedelta | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


@dataclass(frozen=True, slots=True)
class ClientTls:
    mode: str = "DISABLE"  # DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    ca_crl: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None
    insecure_skip_verify: bool = False


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """One level of a DestinationRule's policy; a None section is unset at this level."""

    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTls | None = None

    def over(self, base: TrafficPolicy) -> TrafficPolicy:
        """Sections set here replace those of ``base``; unset ones are inherited whole."""
        return TrafficPolicy(
            load_balancer=base.load_balancer if self.load_balancer is None else self.load_balancer,
            connection_pool=base.connection_pool if self.connection_pool is None else self.connection_pool,
            outlier_detection=base.outlier_detection if self.outlier_detection is None else self.outlier_detection,
            tls=base.tls if self.tls is None else self.tls,
        )


NO_POLICY = TrafficPolicy()


def effective_policy(
    rule: TrafficPolicy,
    rule_ports: Mapping[int, TrafficPolicy],
    subset: TrafficPolicy | None,
    subset_ports: Mapping[int, TrafficPolicy],
    port: int,
) -> TrafficPolicy:
    """The policy of one cluster, following the three steps in the module docstring."""
    policy = rule_ports.get(port, rule)
    if subset is not None:
        policy = subset.over(policy)
    return subset_ports.get(port, policy)
