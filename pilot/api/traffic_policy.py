"""The sections of a DestinationRule traffic policy: load balancer, connection pool,
outlier detection and client TLS, with Istio's validation rules.

Errors (``problems``) are what Istio's admission webhook rejects; warnings (``advisories``)
name fields that are accepted but not applied yet, so a real config never fails on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from pilot.api.base import Duration, FloatPercent, IstioModel, NonNegative, Percent, one_of, rule_error
from pilot.api.envoy_limits import HEADER_NAME, MAX_RING_SIZE, MAX_UINT32
from pilot.api.errors import FieldIssue

MAGLEV_TABLE_LIMIT = 5000011
HASH_KEYS = ("http_header_name", "http_cookie", "use_source_ip", "http_query_parameter_name")
TLS_FILES = ("client_certificate", "private_key", "ca_certificates", "ca_crl")


def _istio_duration(value: timedelta) -> timedelta:
    """Istio's ValidateDuration: at least 1ms, whole milliseconds."""
    if value < timedelta(milliseconds=1):
        raise rule_error("must be at least 1ms")
    if value % timedelta(milliseconds=1):
        raise rule_error("only millisecond precision is supported")
    return value


def _idle_duration(value: timedelta) -> timedelta:
    """As `_istio_duration`, but 0s is allowed: it disables the timeout."""
    return value if value == timedelta(0) else _istio_duration(value)


MinDuration = Annotated[Duration, AfterValidator(_istio_duration)]
IdleDuration = Annotated[Duration, AfterValidator(_idle_duration)]


def is_prime(value: int) -> bool:
    if value < 2:
        return False
    return all(value % f for f in range(2, math.isqrt(value) + 1))


def _not_yet(model: IstioModel, path: str, fields: tuple[str, ...]) -> Iterator[FieldIssue]:
    """A warning per set field that meshctl accepts but does not apply yet."""
    for name in fields:
        if getattr(model, name) is not None:
            alias = type(model).model_fields[name].alias or name
            yield FieldIssue(f"{path}.{alias}", "not supported yet; ignored")


class SimpleLB(StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    LEAST_CONN = "LEAST_CONN"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"


class HTTPCookie(IstioModel):
    name: str = ""
    path: str | None = None
    ttl: Duration | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.name:
            yield FieldIssue(f"{path}.name", "required for httpCookie")


def _ring_size(value: int) -> int:
    if value > MAX_RING_SIZE:
        raise rule_error(f"must be at most {MAX_RING_SIZE} (Envoy's limit)")
    return value


RingSize = Annotated[NonNegative, AfterValidator(_ring_size)]


class RingHash(IstioModel):
    minimum_ring_size: RingSize | None = None


class MagLev(IstioModel):
    table_size: int | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        size = self.table_size or 0
        if size == 0:
            yield FieldIssue(f"{path}.tableSize", "must be set for maglev")
        elif size >= MAGLEV_TABLE_LIMIT:
            yield FieldIssue(f"{path}.tableSize", f"must be less than {MAGLEV_TABLE_LIMIT}")
        elif not is_prime(size):
            yield FieldIssue(f"{path}.tableSize", "must be a prime number")


class ConsistentHashLB(IstioModel):
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: RingSize | None = None  # deprecated: ringHash.minimumRingSize

    def problems(self, path: str) -> Iterator[FieldIssue]:
        yield from one_of(self, path, HASH_KEYS, "consistentHash", required=False)
        if self.http_header_name is not None and not HEADER_NAME.match(self.http_header_name):
            yield FieldIssue(f"{path}.httpHeaderName", f"{self.http_header_name!r} is not a valid HTTP header name")
        if self.http_query_parameter_name is not None and not self.http_query_parameter_name:
            yield FieldIssue(f"{path}.httpQueryParameterName", "must not be empty")
        yield from one_of(self, path, ("ring_hash", "maglev"), "consistentHash", required=False)
        if self.minimum_ring_size and (self.ring_hash or self.maglev):
            yield FieldIssue(
                f"{path}.minimumRingSize", "only one of minimumRingSize or maglev/ringHash can be specified"
            )

    def advisories(self, path: str) -> Iterator[FieldIssue]:
        if self.minimum_ring_size:
            yield FieldIssue(f"{path}.minimumRingSize", "deprecated; use ringHash.minimumRingSize")
        if not any(getattr(self, k) for k in HASH_KEYS):
            yield FieldIssue(path, "no hash key set: requests are spread at random")


def _aggression(value: float) -> float:
    if value < 1:
        raise rule_error("must be at least 1")
    return value


class WarmupConfiguration(IstioModel):
    """Slow start of new endpoints: their share of traffic grows over `duration`."""

    duration: MinDuration
    minimum_percent: FloatPercent | None = None
    aggression: Annotated[float, AfterValidator(_aggression)] | None = None


# Envoy's slow start exists for these balancers only (and Istio's default is LEAST_REQUEST).
WARMUP_BALANCERS = (None, SimpleLB.UNSPECIFIED, SimpleLB.ROUND_ROBIN, SimpleLB.LEAST_REQUEST, SimpleLB.LEAST_CONN)


class LoadBalancerSettings(IstioModel):
    simple: SimpleLB | None = None
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: dict[str, Any] | None = None
    warmup_duration_secs: MinDuration | None = None
    warmup: WarmupConfiguration | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        yield from one_of(self, path, ("simple", "consistent_hash"), "loadBalancer", required=False)
        yield from one_of(self, path, ("warmup_duration_secs", "warmup"), "loadBalancer", required=False)

    def advisories(self, path: str) -> Iterator[FieldIssue]:
        yield from _not_yet(self, path, ("locality_lb_setting",))
        warm = self.warmup_duration_secs is not None or self.warmup is not None
        if warm and (self.consistent_hash is not None or self.simple not in WARMUP_BALANCERS):
            yield FieldIssue(path, "warmup applies to ROUND_ROBIN and LEAST_REQUEST balancing only; ignored")


def _uint32_seconds(value: timedelta) -> timedelta:
    """Envoy's TcpKeepalive holds `time` and `interval` as 32-bit counts of seconds."""
    if value.total_seconds() > MAX_UINT32:
        raise rule_error(f"must be at most {MAX_UINT32}s (Envoy keeps it as 32-bit seconds)")
    return value


KeepaliveDuration = Annotated[MinDuration, AfterValidator(_uint32_seconds)]


class TcpKeepalive(IstioModel):
    probes: NonNegative | None = None
    time: KeepaliveDuration | None = None
    interval: KeepaliveDuration | None = None


class TcpSettings(IstioModel):
    max_connections: NonNegative | None = None
    connect_timeout: MinDuration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: MinDuration | None = None
    idle_timeout: IdleDuration | None = None


class H2UpgradePolicy(StrEnum):
    DEFAULT = "DEFAULT"
    DO_NOT_UPGRADE = "DO_NOT_UPGRADE"
    UPGRADE = "UPGRADE"


class HttpSettings(IstioModel):
    http1_max_pending_requests: NonNegative | None = None
    http2_max_requests: NonNegative | None = None
    max_requests_per_connection: NonNegative | None = None
    max_retries: NonNegative | None = None
    idle_timeout: MinDuration | None = None
    h2_upgrade_policy: H2UpgradePolicy | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: NonNegative | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if self.h2_upgrade_policy == H2UpgradePolicy.UPGRADE and self.use_client_protocol:
            yield FieldIssue(f"{path}.useClientProtocol", "must not be true when h2UpgradePolicy is UPGRADE")


class ConnectionPoolSettings(IstioModel):
    tcp: TcpSettings | None = None
    http: HttpSettings | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if self.tcp is None and self.http is None:
            yield FieldIssue(path, "connection pool must set at least one of tcp, http")


class OutlierDetection(IstioModel):
    consecutive_errors: NonNegative | None = None  # deprecated, ignored (as by Istio)
    consecutive_5xx_errors: NonNegative | None = Field(None, alias="consecutive5xxErrors")
    consecutive_gateway_errors: NonNegative | None = None
    consecutive_local_origin_failures: NonNegative | None = None
    split_external_local_origin_errors: bool | None = None
    interval: MinDuration | None = None
    base_ejection_time: MinDuration | None = None
    max_ejection_percent: Percent | None = None
    min_health_percent: Percent | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if self.consecutive_local_origin_failures and not self.split_external_local_origin_errors:
            yield FieldIssue(
                f"{path}.consecutiveLocalOriginFailures",
                "is set but splitExternalLocalOriginErrors is not true",
            )

    def advisories(self, path: str) -> Iterator[FieldIssue]:
        if self.consecutive_errors:
            yield FieldIssue(
                f"{path}.consecutiveErrors",
                "deprecated and ignored; use consecutive5xxErrors or consecutiveGatewayErrors",
            )


class TLSMode(StrEnum):
    DISABLE = "DISABLE"
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    ISTIO_MUTUAL = "ISTIO_MUTUAL"


class ClientTLSSettings(IstioModel):
    mode: TLSMode = TLSMode.DISABLE
    client_certificate: str | None = None
    private_key: str | None = None
    ca_certificates: str | None = None
    ca_crl: str | None = None
    credential_name: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None
    insecure_skip_verify: bool | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        originates = self.mode in (TLSMode.SIMPLE, TLSMode.MUTUAL)
        pinned = bool(self.ca_certificates or self.subject_alt_names)
        pinned |= self.mode == TLSMode.SIMPLE and bool(self.credential_name)
        if originates and self.subject_alt_names and not self.insecure_skip_verify and not self.ca_certificates:
            # Envoy refuses SAN checks without a trusted CA file ("SAN-based verification of peer
            # certificates without trusted CA is insecure"); the system roots do not count there, and
            # credentialName secrets are not served yet.
            yield FieldIssue(f"{path}.subjectAltNames", "needs caCertificates (the CA that signs those names)")
        if originates and self.insecure_skip_verify and pinned:
            yield FieldIssue(
                f"{path}.insecureSkipVerify", "cannot be true with caCertificates, credentialName or subjectAltNames"
            )
        if originates and self.credential_name:
            if any(getattr(self, f) for f in TLS_FILES):
                yield FieldIssue(
                    f"{path}.credentialName",
                    "cannot be set with clientCertificate, privateKey, caCertificates or caCrl",
                )
        elif self.mode == TLSMode.MUTUAL:
            for name, alias in (("client_certificate", "clientCertificate"), ("private_key", "privateKey")):
                if not getattr(self, name):
                    yield FieldIssue(f"{path}.{alias}", "required when mode is MUTUAL")

    def advisories(self, path: str) -> Iterator[FieldIssue]:
        if self.mode == TLSMode.ISTIO_MUTUAL:
            yield FieldIssue(
                f"{path}.mode", "ISTIO_MUTUAL needs mesh certificates: from a proxy without a workload agent, "
                "traffic stays plaintext"
            )
            if any(getattr(self, f) for f in (*TLS_FILES, "credential_name", "sni")) or self.subject_alt_names:
                yield FieldIssue(path, "certificate fields should be empty when mode is ISTIO_MUTUAL")
        if self.credential_name and self.mode != TLSMode.ISTIO_MUTUAL:
            yield FieldIssue(f"{path}.credentialName", "not supported yet; TLS is set up without it")
