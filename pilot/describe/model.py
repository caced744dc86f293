"""What `meshctl describe` reports, as plain frozen data: built by `pilot.describe.facts`, printed by
`pilot.describe.render` (words) or dumped as JSON/YAML (`Description.to_dict`).

Every field is a string, a number, a bool or a tuple of them, already sorted, so one input always
gives one output and the machine forms need no custom encoder. Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

POD, WORKLOAD, SERVICE = "pod", "workload", "service"


@dataclass(frozen=True)
class WorkloadInfo:
    """The described instance: a Pod, a pod template, or a WorkloadEntry."""

    kind: str
    namespace: str
    name: str
    labels: tuple[str, ...]  # "key=value", sorted
    service_account: str
    address: str = ""  # a WorkloadEntry's; pods' IPs are not read
    sidecar: bool = True


@dataclass(frozen=True)
class SubsetInfo:
    name: str
    labels: tuple[str, ...]
    has_target: bool | None  # the described workload carries the labels; None for a service
    instances: tuple[str, ...]  # the service's instances in the subset
    policy: tuple[str, ...]  # the subset's own traffic policy, in words


@dataclass(frozen=True)
class DestinationRuleInfo:
    namespace: str
    name: str
    host: str
    export_to: tuple[str, ...]
    selector: tuple[str, ...] | None  # workloadSelector: only those client proxies use it
    in_force: bool  # what clients in the service's namespace use (Istio's lookup path)
    policy: tuple[str, ...]
    port_policies: tuple[str, ...]
    subsets: tuple[SubsetInfo, ...]


@dataclass(frozen=True)
class RouteInfo:
    kind: str  # http, tcp, tls
    index: int
    name: str
    match: str
    destinations: tuple[str, ...]
    details: tuple[str, ...]  # timeout, retries, fault, mirrors, rewrites
    reaches_target: bool | None  # None: the rule sends nothing to this service


@dataclass(frozen=True)
class VirtualServiceInfo:
    namespace: str
    name: str
    hosts: tuple[str, ...]
    gateways: tuple[str, ...]
    export_to: tuple[str, ...]
    routes: tuple[RouteInfo, ...]
    # Whether sidecars in the service's namespace route the service's host with it (the oldest visible
    # rule naming the host wins); None when the rule is not for the host (it only routes to it).
    in_force: bool | None = None


@dataclass(frozen=True)
class GatewayInfo:
    gateway: str  # namespace/name
    virtual_service: str  # namespace/name of the rule binding the host to it
    servers: tuple[str, ...]  # "port 80 HTTP, hosts: ..."


@dataclass(frozen=True)
class EndpointInfo:
    name: str  # namespace/name of the workload, or the address of an inline endpoint
    kind: str
    address: str
    subsets: tuple[str, ...]
    sidecar: bool
    inbound_mtls: str


@dataclass(frozen=True)
class ServiceInfo:
    host: str
    kind: str  # ServiceEntry or Service
    namespace: str
    name: str
    ports: tuple[str, ...]  # "9080/HTTP (http)"
    selector: tuple[str, ...] | None
    location: str
    resolution: str
    export_to: tuple[str, ...]
    client_tls: tuple[str, ...]  # what clients send, per port
    destination_rules: tuple[DestinationRuleInfo, ...]
    virtual_services: tuple[VirtualServiceInfo, ...]
    gateways: tuple[GatewayInfo, ...]
    endpoints: tuple[EndpointInfo, ...] = ()  # filled for `describe service`


@dataclass(frozen=True)
class MtlsInfo:
    mode: str
    source: str  # "PeerAuthentication ns/name (workload)" or "default"
    ports: tuple[str, ...]  # "9080: STRICT"


@dataclass(frozen=True)
class PolicyInfo:
    kind: str  # AuthorizationPolicy or RequestAuthentication
    namespace: str
    name: str
    action: str  # ALLOW, DENY, AUDIT, CUSTOM; JWT for RequestAuthentication
    summary: str
    applies_to: tuple[str, ...] = ()  # for a service: which endpoints


@dataclass(frozen=True)
class SidecarInfo:
    namespace: str
    name: str
    summary: tuple[str, ...]


@dataclass(frozen=True)
class Description:
    kind: str  # pod, workload, service
    namespace: str
    name: str
    workload: WorkloadInfo | None
    services: tuple[ServiceInfo, ...]
    mtls: MtlsInfo | None
    policies: tuple[PolicyInfo, ...]
    sidecar: SidecarInfo | None
    warnings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The description as plain lists and maps, in field order (for ``-o json|yaml``)."""
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        return plain


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
