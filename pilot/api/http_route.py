"""VirtualService ``http`` entries: matches, weighted destinations and every per-route policy.

Field names, defaults and checks follow Istio's ``virtual_service.proto`` and its validation:
durations are at least 1ms, percentages are floats in [0, 100], regexes are RE2, and oneofs
(``mirror``/``mirrors``, ``uri``/``uriRegexRewrite``, abort ``httpStatus``/``grpcStatus``) allow one.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import re
from collections.abc import Iterator
from datetime import timedelta
from enum import StrEnum

from pydantic import Field

from pilot.api.base import Duration, IstioModel, NonNegative, Percent, PortNumber, one_of
from pilot.api.envoy_limits import (
    MAX_QUERY_PARAMETER_NAME_BYTES,
    header_name_problem,
    header_value_problem,
    line_break_problems,
)
from pilot.api.errors import FieldIssue
from pilot.api.hosts import GatewayRef
from pilot.api.route_common import (
    EMPTY_PREFIX,
    Destination,
    HeaderStringMatch,
    LabelMap,
    Percentage,
    StringMatch,
    duration_problem,
    regex_problem,
    weight_problems,
)

# Envoy's x-envoy-retry-on and x-envoy-retry-grpc-on conditions, the values Istio accepts.
RETRY_ON_CONDITIONS = frozenset(
    {
        "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "envoy-ratelimited",
        "retriable-4xx", "refused-stream", "retriable-status-codes", "retriable-headers",
        "http3-post-connect-failure", "cancelled", "deadline-exceeded", "internal",
        "resource-exhausted", "unavailable",
    }
)  # fmt: skip
GRPC_STATUS = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
    "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
    "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_HEADER_NAME = re.compile(r"^[-_A-Za-z0-9!#$%&'*+.^`|~]+$")
HOST_HEADERS = frozenset({"host", ":authority"})


def header_name_problems(path: str, names: Iterator[str] | list[str]) -> Iterator[FieldIssue]:
    for name in names:
        if not _HEADER_NAME.match(name):
            yield FieldIssue(path, f"{name!r} is not a valid HTTP header name")
        elif why := header_name_problem(name):
            yield FieldIssue(path, f"{name[:40]!r}...: {why}")


class HTTPMatchRequest(IstioModel):
    name: str | None = None
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, HeaderStringMatch] = Field(default_factory=dict)
    port: PortNumber | None = None
    source_labels: LabelMap
    gateways: tuple[GatewayRef, ...] = ()
    query_params: dict[str, StringMatch] = Field(default_factory=dict)
    ignore_uri_case: bool = False
    without_headers: dict[str, HeaderStringMatch] = Field(default_factory=dict)
    source_namespace: str | None = None
    stat_prefix: str | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        for field in ("uri", "scheme", "method", "authority"):
            match = getattr(self, field)
            if match is not None and match.empty:
                yield FieldIssue(f"{path}.{field}", "a string match must set exactly one of exact, prefix, regex")
            if field != "uri" and match is not None and match.prefix == "":
                yield FieldIssue(f"{path}.{field}.prefix", EMPTY_PREFIX)
        for key, match in self.query_params.items():
            if match.prefix is not None:
                yield FieldIssue(f"{path}.queryParams.{key}", "prefix matching is not supported for query parameters")
            if len(key.encode()) > MAX_QUERY_PARAMETER_NAME_BYTES:
                yield FieldIssue(f"{path}.queryParams", f"a name may be at most {MAX_QUERY_PARAMETER_NAME_BYTES} bytes")
        yield from header_name_problems(f"{path}.headers", list(self.headers))
        yield from header_name_problems(f"{path}.withoutHeaders", list(self.without_headers))


class HeaderOperations(IstioModel):
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: tuple[str, ...] = ()

    def problems(self, path: str) -> Iterator[FieldIssue]:
        for field in ("set", "add", "remove"):
            names = list(getattr(self, field))
            yield from header_name_problems(f"{path}.{field}", [n for n in names if n.lower() not in HOST_HEADERS])
            for name in names:
                if name.startswith(":") and name.lower() not in HOST_HEADERS:
                    yield FieldIssue(f"{path}.{field}", f"pseudo-header {name!r} cannot be changed")
        for name, value in [*self.set.items(), *self.add.items()]:
            if why := header_value_problem(value):
                yield FieldIssue(f"{path}.{'set' if name in self.set else 'add'}.{name}", why)
        for name in [*self.add, *self.remove]:
            if name.lower() in HOST_HEADERS:
                yield FieldIssue(path, f"{name!r} can only be set (it rewrites the authority), not added or removed")


class Headers(IstioModel):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if self.response is not None and any(n.lower() in HOST_HEADERS for n in self.response.set):
            yield FieldIssue(f"{path}.response.set", "the authority is a request header; set it under request")


class HTTPRouteDestination(IstioModel):
    destination: Destination
    weight: NonNegative | None = None  # relative to the route's other destinations (Istio 1.15)
    headers: Headers | None = None


class DerivePort(StrEnum):
    FROM_PROTOCOL_DEFAULT = "FROM_PROTOCOL_DEFAULT"
    FROM_REQUEST_PORT = "FROM_REQUEST_PORT"


class HTTPRedirect(IstioModel):
    uri: str | None = None
    authority: str | None = None
    port: PortNumber | None = None
    derive_port: DerivePort | None = None
    scheme: str | None = None
    redirect_code: NonNegative | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        yield from one_of(self, path, ("port", "derive_port"), "a redirect", required=False)
        yield from line_break_problems(path, self, ("uri", "authority", "scheme"))
        if self.redirect_code is not None and self.redirect_code not in REDIRECT_CODES:
            yield FieldIssue(f"{path}.redirectCode", f"{self.redirect_code} is not one of 301, 302, 303, 307, 308")


# Istio's webhook refuses a direct-response body over 1 MB (and pilot raises Envoy's 4 KB limit).
MAX_DIRECT_RESPONSE_BODY = 1024 * 1024


class HTTPBody(IstioModel):
    string: str | None = None
    bytes: str | None = None  # base64, as protobuf JSON spells bytes

    def decoded(self) -> builtins.bytes | None:
        """`bytes` decoded, None if unset or not valid base64 (reported by `problems`)."""
        if self.bytes is None:
            return None
        try:
            return base64.b64decode(self.bytes, validate=True)
        except (binascii.Error, ValueError):
            return None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        yield from one_of(self, path, ("string", "bytes"), "a body", required=False)
        if self.bytes is not None and self.decoded() is None:
            yield FieldIssue(f"{path}.bytes", "is not valid base64")
        size = len(self.string.encode()) if self.string is not None else len(self.decoded() or b"")
        if size > MAX_DIRECT_RESPONSE_BODY:
            yield FieldIssue(path, f"is {size} bytes; a direct response body may be at most 1 MB")


class HTTPDirectResponse(IstioModel):
    status: int = Field(strict=True, ge=200, le=599)
    body: HTTPBody | None = None


class RegexRewrite(IstioModel):
    match: str
    rewrite: str

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if why := regex_problem(self.match):
            yield FieldIssue(f"{path}.match", why)
        yield from line_break_problems(path, self, ("rewrite",))


class HTTPRewrite(IstioModel):
    uri: str | None = None
    authority: str | None = None
    uri_regex_rewrite: RegexRewrite | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        yield from one_of(self, path, ("uri", "uri_regex_rewrite"), "a rewrite", required=False)
        yield from line_break_problems(path, self, ("uri", "authority"))


class HTTPRetry(IstioModel):
    """Istio: ``attempts: 0`` turns retries off; leaving ``retries`` out gives Istio's default policy."""

    attempts: NonNegative = 0
    per_try_timeout: Duration | None = None
    retry_on: str | None = None
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None
    backoff: Duration | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        tuned = self.per_try_timeout is not None or self.retry_on or self.retry_remote_localities is not None
        if self.attempts == 0 and tuned:  # Istio's webhook: a disabled policy cannot be tuned
            yield FieldIssue(path, "retry policy configured when attempts are set to 0 (disabled)")
        yield from duration_problem(f"{path}.perTryTimeout", self.per_try_timeout)
        yield from duration_problem(f"{path}.backoff", self.backoff)
        for part in (p.strip() for p in (self.retry_on or "").split(",")):
            if not part or part in RETRY_ON_CONDITIONS:
                continue
            if not (part.isascii() and part.isdigit()) or not 100 <= int(part) <= 599:
                yield FieldIssue(f"{path}.retryOn", f"{part!r} is not a retry condition or an HTTP status code")


class Delay(IstioModel):
    fixed_delay: Duration | None = None
    exponential_delay: Duration | None = None
    percentage: Percentage | None = None
    percent: Percent | None = None  # deprecated integer form

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if self.exponential_delay is not None:
            yield FieldIssue(f"{path}.exponentialDelay", "not supported (Istio does not support it either)")
        elif self.fixed_delay is None:
            yield FieldIssue(f"{path}.fixedDelay", "required")
        yield from duration_problem(f"{path}.fixedDelay", self.fixed_delay)


class Abort(IstioModel):
    http_status: int | None = Field(None, strict=True)
    grpc_status: str | None = None
    http2_error: str | None = None
    percentage: Percentage | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        yield from one_of(self, path, ("http_status", "grpc_status", "http2_error"), "an abort")
        if self.http_status is not None and not 200 <= self.http_status <= 599:
            yield FieldIssue(f"{path}.httpStatus", "must be between 200 and 599")
        if self.grpc_status is not None and self.grpc_status not in GRPC_STATUS:
            yield FieldIssue(
                f"{path}.grpcStatus", f"{self.grpc_status!r} is not a gRPC status name such as UNAVAILABLE"
            )
        if self.http2_error is not None:
            yield FieldIssue(f"{path}.http2Error", "not supported (Istio does not support it either)")


class HTTPFaultInjection(IstioModel):
    delay: Delay | None = None
    abort: Abort | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if self.delay is None and self.abort is None:
            yield FieldIssue(path, "a fault must set delay, abort or both")


class HTTPMirrorPolicy(IstioModel):
    destination: Destination
    percentage: Percentage | None = None


class CorsPolicy(IstioModel):
    allow_origins: tuple[StringMatch, ...] = ()
    allow_origin: tuple[str, ...] = ()  # deprecated: exact origins, "*" for any
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: Duration | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: str | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        for i, origin in enumerate(self.allow_origins):
            if origin.empty:
                yield FieldIssue(f"{path}.allowOrigins[{i}]", "must set exactly one of exact, prefix, regex")
            elif origin.prefix == "":
                yield FieldIssue(f"{path}.allowOrigins[{i}].prefix", EMPTY_PREFIX)
        for method in self.allow_methods:
            if method not in HTTP_METHODS:
                yield FieldIssue(f"{path}.allowMethods", f"{method!r} is not an HTTP method")
        yield from header_name_problems(f"{path}.allowHeaders", list(self.allow_headers))
        yield from header_name_problems(f"{path}.exposeHeaders", list(self.expose_headers))
        yield from duration_problem(f"{path}.maxAge", self.max_age)
        if self.max_age is not None and self.max_age % timedelta(seconds=1):
            yield FieldIssue(f"{path}.maxAge", "must be a whole number of seconds")
        if self.unmatched_preflights not in (None, "UNSPECIFIED", "FORWARD", "IGNORE"):
            yield FieldIssue(f"{path}.unmatchedPreflights", "must be FORWARD or IGNORE")


class Delegate(IstioModel):
    """The VirtualService (without hosts) whose http routes stand in for this route."""

    name: str
    namespace: str | None = None  # default: the root VirtualService's


class HTTPRoute(IstioModel):
    name: str | None = None
    match: tuple[HTTPMatchRequest, ...] = ()
    route: tuple[HTTPRouteDestination, ...] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    mirror_percentage: Percentage | None = None
    mirror_percent: Percent | None = None  # deprecated integer form
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        actions = [f for f in ("route", "redirect", "direct_response", "delegate") if getattr(self, f)]
        if len(actions) != 1:
            yield FieldIssue(path, "must set exactly one of route, redirect, directResponse, delegate")
        yield from weight_problems(f"{path}.route", self.route)
        if self.rewrite is not None and self.redirect is not None:
            yield FieldIssue(f"{path}.rewrite", "cannot be used with redirect")
        if self.mirror is not None and self.mirrors:
            yield FieldIssue(path, "must set at most one of mirror, mirrors")
        if (self.mirror_percentage is not None or self.mirror_percent is not None) and self.mirror is None:
            yield FieldIssue(f"{path}.mirrorPercentage", "only applies to mirror, which is not set")
        yield from duration_problem(f"{path}.timeout", self.timeout)
