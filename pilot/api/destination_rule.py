"""DestinationRule: subsets of a service and the policy for traffic sent to them."""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from typing import Any, Literal

from pydantic import Field

from pilot.api.base import (
    ApiObject,
    DnsLabel,
    Duration,
    Host,
    IstioModel,
    LabelSelector,
    NonNegative,
    Percent,
)
from pilot.api.common import PortSelector
from pilot.api.errors import FieldIssue


class SimpleLB(StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    LEAST_CONN = "LEAST_CONN"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"


class LoadBalancerSettings(IstioModel):
    simple: SimpleLB | None = None
    # Accepted so real configs do not warn; not translated yet.
    consistent_hash: dict[str, Any] | None = None
    locality_lb_setting: dict[str, Any] | None = None
    warmup_duration_secs: Any = None
    warmup: Any = None


class TcpSettings(IstioModel):
    max_connections: NonNegative | None = None
    connect_timeout: Duration | None = None
    tcp_keepalive: dict[str, Any] | None = None
    max_connection_duration: Duration | None = None
    idle_timeout: Duration | None = None


class HttpSettings(IstioModel):
    http1_max_pending_requests: NonNegative | None = None
    http2_max_requests: NonNegative | None = None
    max_requests_per_connection: NonNegative | None = None
    max_retries: NonNegative | None = None
    idle_timeout: Duration | None = None
    h2_upgrade_policy: str | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: NonNegative | None = None


class ConnectionPoolSettings(IstioModel):
    tcp: TcpSettings | None = None
    http: HttpSettings | None = None


class OutlierDetection(IstioModel):
    consecutive_5xx_errors: NonNegative | None = Field(None, alias="consecutive5xxErrors")
    consecutive_gateway_errors: NonNegative | None = None
    consecutive_local_origin_failures: NonNegative | None = None
    split_external_local_origin_errors: bool | None = None
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: Percent | None = None
    min_health_percent: Percent | None = None


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


class PortTrafficPolicy(IstioModel):
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class TrafficPolicy(IstioModel):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()
    tunnel: Any = None
    proxy_protocol: Any = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        seen: set[int] = set()
        for i, setting in enumerate(self.port_level_settings):
            if setting.port is None:
                yield FieldIssue(f"{path}.portLevelSettings[{i}].port", "required")
            elif setting.port.number in seen:
                yield FieldIssue(f"{path}.portLevelSettings[{i}].port.number", "duplicate port")
            else:
                seen.add(setting.port.number)


class Subset(IstioModel):
    name: DnsLabel
    labels: dict[str, str] = Field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


class DestinationRuleSpec(IstioModel):
    host: Host
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: tuple[str, ...] = ()
    workload_selector: LabelSelector | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        seen: set[str] = set()
        for i, subset in enumerate(self.subsets):
            if subset.name in seen:
                yield FieldIssue(f"{path}.subsets[{i}].name", f"duplicate subset {subset.name!r}")
            seen.add(subset.name)


class DestinationRule(ApiObject):
    KIND = "DestinationRule"
    kind: Literal["DestinationRule"]
    spec: DestinationRuleSpec
