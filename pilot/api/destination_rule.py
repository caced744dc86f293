"""DestinationRule: subsets of a service and the policy for traffic sent to them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from pilot.api.base import ApiObject, DnsLabel, Host, IstioModel
from pilot.api.common import PortSelector
from pilot.api.errors import FieldIssue
from pilot.api.hosts import ExportTo
from pilot.api.traffic_policy import (
    ClientTLSSettings,
    ConnectionPoolSettings,
    ConsistentHashLB,
    H2UpgradePolicy,
    HttpSettings,
    LoadBalancerSettings,
    OutlierDetection,
    SimpleLB,
    TcpSettings,
    TLSMode,
)

__all__ = [
    "ClientTLSSettings",
    "ConnectionPoolSettings",
    "ConsistentHashLB",
    "DestinationRule",
    "DestinationRuleSpec",
    "H2UpgradePolicy",
    "HttpSettings",
    "LoadBalancerSettings",
    "OutlierDetection",
    "PortTrafficPolicy",
    "SimpleLB",
    "Subset",
    "TLSMode",
    "TcpSettings",
    "TrafficPolicy",
]
_SECTIONS = ("load_balancer", "connection_pool", "outlier_detection", "tls")
_SECTION_NAMES = "loadBalancer, connectionPool, outlierDetection, tls"


class PortTrafficPolicy(IstioModel):
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if all(getattr(self, f) is None for f in _SECTIONS):
            yield FieldIssue(path, "port traffic policy must set at least one of " + _SECTION_NAMES)


class TrafficPolicy(IstioModel):
    """Istio's TrafficPolicy. How the levels combine is `pilot.model.policy`'s business."""

    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: tuple[PortTrafficPolicy, ...] = ()
    tunnel: Any = None
    proxy_protocol: Any = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if all(getattr(self, f) is None for f in (*_SECTIONS, "tunnel", "proxy_protocol")) and not (
            self.port_level_settings
        ):
            yield FieldIssue(path, "traffic policy must set at least one field")
        if self.tunnel is not None and self.proxy_protocol is not None:
            yield FieldIssue(path, "tunnel and proxyProtocol must not be set together")
        seen: set[int] = set()
        for i, setting in enumerate(self.port_level_settings):
            if setting.port is None:
                yield FieldIssue(f"{path}.portLevelSettings[{i}].port", "required")
            elif setting.port.number in seen:
                yield FieldIssue(f"{path}.portLevelSettings[{i}].port.number", "duplicate port")
            else:
                seen.add(setting.port.number)

    def advisories(self, path: str) -> Iterator[FieldIssue]:
        for name, alias in (("tunnel", "tunnel"), ("proxy_protocol", "proxyProtocol")):
            if getattr(self, name) is not None:
                yield FieldIssue(f"{path}.{alias}", "not supported yet; ignored")


class Subset(IstioModel):
    name: DnsLabel
    labels: dict[str, str] = Field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


class MatchLabels(IstioModel):
    """`istio.type.v1beta1.WorkloadSelector`: the consumer workloads a DestinationRule applies to."""

    match_labels: dict[str, str] = Field(default_factory=dict)


class DestinationRuleSpec(IstioModel):
    host: Host
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: ExportTo = ()
    workload_selector: MatchLabels | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        seen: set[str] = set()
        for i, subset in enumerate(self.subsets):
            if subset.name in seen:
                yield FieldIssue(f"{path}.subsets[{i}].name", f"duplicate subset {subset.name!r}")
            seen.add(subset.name)

    def advisories(self, path: str) -> Iterator[FieldIssue]:
        if self.workload_selector is not None and any(e != "." for e in self.export_to):
            yield FieldIssue(f"{path}.exportTo", "a rule with a workloadSelector applies in its own namespace only; "
                                                 "exportTo is ignored")


class DestinationRule(ApiObject):
    KIND = "DestinationRule"
    kind: Literal["DestinationRule"]
    spec: DestinationRuleSpec
