"""VirtualService: how requests for a host are matched and routed.

Only what the generators translate today is typed in depth (matches, weighted routes,
redirects, direct responses, rewrites, timeouts, retries); the other HTTPRoute features are
accepted as opaque values so real configs parse without warnings while support grows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from pilot.api.base import ApiObject, Duration, Host, IstioModel, NonNegative, Percent, PortNumber, one_of
from pilot.api.common import PortSelector
from pilot.api.errors import FieldIssue

FULL_WEIGHT = 100


class StringMatch(IstioModel):
    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        yield from one_of(self, path, ("exact", "prefix", "regex"), "a string match")


class HTTPMatchRequest(IstioModel):
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = Field(default_factory=dict)
    port: PortNumber | None = None
    source_labels: dict[str, str] = Field(default_factory=dict)
    gateways: tuple[str, ...] = ()
    query_params: dict[str, StringMatch] = Field(default_factory=dict)
    ignore_uri_case: bool = False
    without_headers: dict[str, StringMatch] = Field(default_factory=dict)
    source_namespace: str | None = None
    stat_prefix: str | None = None


class Destination(IstioModel):
    host: Host
    subset: str | None = None
    port: PortSelector | None = None


class HTTPRouteDestination(IstioModel):
    destination: Destination
    weight: Percent | None = None
    headers: dict[str, Any] | None = None


class HTTPRedirect(IstioModel):
    uri: str | None = None
    authority: str | None = None
    port: PortNumber | None = None
    derive_port: str | None = None
    scheme: str | None = None
    redirect_code: NonNegative | None = None


class HTTPDirectResponse(IstioModel):
    status: int = Field(strict=True, ge=200, le=599)
    body: dict[str, Any] | None = None


class HTTPRewrite(IstioModel):
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: dict[str, Any] | None = None


class HTTPRetry(IstioModel):
    attempts: NonNegative = 0
    per_try_timeout: Duration | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None


class HTTPRoute(IstioModel):
    name: str | None = None
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: dict[str, Any] | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: dict[str, Any] | None = None
    mirror: Destination | None = None
    mirrors: tuple[dict[str, Any], ...] = ()
    mirror_percentage: dict[str, Any] | None = None
    mirror_percent: Any = None
    cors_policy: dict[str, Any] | None = None
    headers: dict[str, Any] | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        actions = [f for f in ("route", "redirect", "direct_response", "delegate") if getattr(self, f)]
        if len(actions) != 1:
            yield FieldIssue(path, "must set exactly one of route, redirect, directResponse, delegate")
        if len(self.route) > 1 and not any(d.weight for d in self.route):
            yield FieldIssue(
                f"{path}.route", "with several destinations, at least one needs a weight above 0"
            )

    def advisories(self, path: str) -> Iterator[FieldIssue]:
        total = sum(d.weight or 0 for d in self.route)
        if len(self.route) > 1 and total not in (0, FULL_WEIGHT):
            yield FieldIssue(
                f"{path}.route", f"weights add up to {total}, not 100; they are used as proportions"
            )


class VirtualServiceSpec(IstioModel):
    hosts: tuple[Host, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[dict[str, Any], ...] = ()
    tcp: tuple[dict[str, Any], ...] = ()
    export_to: tuple[str, ...] = ()

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.hosts:
            yield FieldIssue(f"{path}.hosts", "at least one host is required")


class VirtualService(ApiObject):
    KIND = "VirtualService"
    kind: Literal["VirtualService"]
    spec: VirtualServiceSpec
