"""VirtualService: how requests and connections for a host are matched and routed.

HTTP entries live in ``pilot.api.http_route``; this module holds the L4 (``tcp``) and SNI
(``tls``) entries and the spec itself, and re-exports the route types for callers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pilot.api.base import ApiObject, Host, IstioModel, PortNumber
from pilot.api.errors import FieldIssue
from pilot.api.hosts import ExportTo, GatewayRef
from pilot.api.http_route import (
    CorsPolicy,
    Delay,
    HTTPDirectResponse,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPMirrorPolicy,
    HTTPRedirect,
    HTTPRetry,
    HTTPRewrite,
    HTTPRoute,
    HTTPRouteDestination,
)
from pilot.api.route_common import (
    FULL_WEIGHT,
    Destination,
    LabelMap,
    RouteDestination,
    StringMatch,
    Subnet,
    weight_problems,
)

__all__ = [
    "FULL_WEIGHT",
    "CorsPolicy",
    "Delay",
    "Destination",
    "HTTPDirectResponse",
    "HTTPFaultInjection",
    "HTTPMatchRequest",
    "HTTPMirrorPolicy",
    "HTTPRedirect",
    "HTTPRetry",
    "HTTPRewrite",
    "HTTPRoute",
    "HTTPRouteDestination",
    "L4MatchAttributes",
    "RouteDestination",
    "StringMatch",
    "TCPRoute",
    "TLSMatchAttributes",
    "TLSRoute",
    "VirtualService",
    "VirtualServiceSpec",
]


class L4MatchAttributes(IstioModel):
    destination_subnets: tuple[Subnet, ...] = ()
    port: PortNumber | None = None
    source_labels: LabelMap
    gateways: tuple[GatewayRef, ...] = ()
    source_namespace: str | None = None


class TLSMatchAttributes(IstioModel):
    sni_hosts: tuple[Host, ...] = ()
    destination_subnets: tuple[Subnet, ...] = ()
    port: PortNumber | None = None
    source_labels: LabelMap
    gateways: tuple[GatewayRef, ...] = ()
    source_namespace: str | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.sni_hosts:
            yield FieldIssue(f"{path}.sniHosts", "at least one SNI host is required")


class TCPRoute(IstioModel):
    match: tuple[L4MatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.route:
            yield FieldIssue(f"{path}.route", "at least one destination is required")
        yield from weight_problems(f"{path}.route", self.route)


class TLSRoute(IstioModel):
    match: tuple[TLSMatchAttributes, ...] = ()
    route: tuple[RouteDestination, ...] = ()

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.match:
            yield FieldIssue(f"{path}.match", "at least one match (with sniHosts) is required")
        if not self.route:
            yield FieldIssue(f"{path}.route", "at least one destination is required")
        yield from weight_problems(f"{path}.route", self.route)


def sni_within(sni: str, hosts: tuple[str, ...]) -> bool:
    """Istio: an SNI host must fall within one of the VirtualService's hosts."""
    for host in hosts:
        if host in ("*", sni) or "." not in host:  # short names are qualified later
            return True
        if host.startswith("*.") and (sni.endswith(host[1:]) or sni == host[2:]):
            return True
        if sni.startswith("*.") and host.endswith(sni[1:]):
            return True
    return False


class VirtualServiceSpec(IstioModel):
    hosts: tuple[Host, ...] = ()
    gateways: tuple[GatewayRef, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[TLSRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    export_to: ExportTo = ()

    @property
    def is_delegate(self) -> bool:
        """Without hosts a VirtualService is a delegate: only roots' `delegate` routes use it."""
        return not self.hosts

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.is_delegate:
            return
        # Istio's rules for delegates: http routes only, no gateways, one level of delegation.
        for field in ("gateways", "tls", "tcp"):
            if getattr(self, field):
                yield FieldIssue(f"{path}.{field}", "a delegate VirtualService (no hosts) must not set it")
        if not self.http:
            yield FieldIssue(f"{path}.hosts", "at least one host is required (or http routes, for a delegate)")
        for i, route in enumerate(self.http):
            if route.delegate is not None:
                yield FieldIssue(f"{path}.http[{i}].delegate", "only one level of delegation is supported")

    def advisories(self, path: str) -> Iterator[FieldIssue]:
        for i, route in enumerate(self.tls):
            for j, match in enumerate(route.match):
                for sni in match.sni_hosts:
                    if not sni_within(sni, self.hosts):
                        yield FieldIssue(
                            f"{path}.tls[{i}].match[{j}].sniHosts",
                            f"{sni!r} is not within any of the hosts {list(self.hosts)}; it never matches",
                        )


class VirtualService(ApiObject):
    KIND = "VirtualService"
    kind: Literal["VirtualService"]
    spec: VirtualServiceSpec
