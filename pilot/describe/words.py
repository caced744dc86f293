"""Mesh-model values in plain words: durations, matches, destinations, traffic policies, policies.

Pure functions of `pilot.model` values, one short phrase each, so the renderer and the JSON form
say the same thing. Unset fields are left out: a phrase states what the user configured, and names
Istio's default only where leaving a field out changes behaviour (retries, load balancing).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta

from pilot.model.authz import Attr, AuthzPolicy, JwtRule
from pilot.model.mesh import (
    Fault,
    HttpRoute,
    L4Match,
    RouteDestination,
    RouteMatch,
    StringMatch,
)
from pilot.model.policy import ConnectionPool, LoadBalancer, OutlierDetection, TrafficPolicy

DEFAULT_RETRIES = "retries: Istio's default (2 attempts on connect-failure, refused-stream, unavailable, " \
    "cancelled, retriable-status-codes)"


def duration(value: timedelta) -> str:
    """``2s``, ``1.5s``, ``250ms``."""
    ms = round(value.total_seconds() * 1000)
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms" if ms < 1000 else f"{ms / 1000:g}s"


def labels(items: Mapping[str, str] | Iterable[tuple[str, str]]) -> tuple[str, ...]:
    pairs = items.items() if isinstance(items, Mapping) else items
    return tuple(f"{k}={v}" for k, v in sorted(pairs))


def string_match(match: StringMatch) -> str:
    return "present" if match.kind == "regex" and match.value == ".*" else f"{match.kind} {match.value}"


def route_match(match: RouteMatch) -> str:
    """One match condition, its parts joined with "and"."""
    parts: list[str] = []
    if match.uri is not None:
        parts.append(f"path {string_match(match.uri)}" + (" (any case)" if match.ignore_uri_case else ""))
    for label, value in (("method", match.method), ("authority", match.authority), ("scheme", match.scheme)):
        if value is not None:
            parts.append(f"{label} {string_match(value)}")
    parts += [f"header {k} {string_match(v)}" for k, v in match.headers]
    parts += [f"no header {k} {string_match(v)}" for k, v in match.without_headers]
    parts += [f"query {k} {string_match(v)}" for k, v in match.query_params]
    parts += _l4_common(match.port, match.source_labels, match.source_namespace, match.gateways)
    return " and ".join(parts) or "every request"


def l4_match(match: L4Match) -> str:
    parts = _l4_common(match.port, match.source_labels, match.source_namespace, match.gateways)
    if match.destination_subnets:
        parts.append("destination " + ", ".join(match.destination_subnets))
    if match.sni_hosts:
        parts.append("SNI " + ", ".join(match.sni_hosts))
    return " and ".join(parts) or "every connection"


def _l4_common(port: int | None, source_labels: tuple[tuple[str, str], ...], source_namespace: str | None,
               gateways: tuple[str, ...]) -> list[str]:
    parts = [] if port is None else [f"port {port}"]
    if source_labels:
        parts.append("from workloads with " + ", ".join(labels(source_labels)))
    if source_namespace:
        parts.append(f"from namespace {source_namespace}")
    if gateways:
        parts.append("on " + ", ".join(gateways))
    return parts


def destinations(dests: tuple[RouteDestination, ...]) -> tuple[str, ...]:
    """Each destination with its share of the traffic in percent (weights as Istio normalizes them)."""
    total = sum(d.weight for d in dests) or 1
    return tuple(f"{destination(d)}: {d.weight * 100 / total:g}%" for d in dests)


def destination(d: RouteDestination) -> str:
    out = d.host
    if d.port is not None:
        out += f":{d.port}"
    return out + (f" subset {d.subset}" if d.subset else "")


def http_details(route: HttpRoute) -> tuple[str, ...]:
    """Timeout, retries, fault injection, mirrors, rewrites and non-forwarding actions of one route."""
    out: list[str] = []
    if route.redirect is not None:
        r = route.redirect
        target = "".join(x for x in (r.scheme and f"{r.scheme}://", r.authority, r.port and f":{r.port}", r.uri) if x)
        out.append(f"redirect ({r.code}) to {target or 'the same URL'}")
    if route.direct_response is not None:
        out.append(f"direct response {route.direct_response.status}")
    if route.timeout is not None:
        out.append("timeout " + ("none" if not route.timeout else duration(route.timeout)))
    if route.destinations:
        out.append(_retries(route))
    if route.fault is not None:
        out.append(fault(route.fault))
    for mirror in route.mirrors:
        out.append(f"mirror {mirror.percent:g}% to {destination(mirror.destination)}")
    if route.rewrite_uri is not None:
        out.append(f"rewrite path to {route.rewrite_uri}")
    if route.rewrite_uri_regex is not None:
        out.append(f"rewrite path {route.rewrite_uri_regex[0]} to {route.rewrite_uri_regex[1]}")
    if route.rewrite_authority is not None:
        out.append(f"rewrite authority to {route.rewrite_authority}")
    return tuple(out)


def _retries(route: HttpRoute) -> str:
    r = route.retries
    if r is None:
        return DEFAULT_RETRIES
    if r.attempts == 0:
        return "retries: off"
    out = f"retries: {r.attempts} attempts"
    if r.per_try_timeout is not None:
        out += f", {duration(r.per_try_timeout)} per try"
    if r.retry_on:
        out += f", on {r.retry_on}"
    return out


def fault(f: Fault) -> str:
    parts = []
    if f.delay is not None:
        parts.append(f"delay {duration(f.delay)} for {f.delay_percent:g}% of requests")
    if f.abort_http_status is not None:
        parts.append(f"abort with HTTP {f.abort_http_status} for {f.abort_percent:g}% of requests")
    if f.abort_grpc_status is not None:
        parts.append(f"abort with gRPC status {f.abort_grpc_status} for {f.abort_percent:g}% of requests")
    return "fault injection: " + "; ".join(parts or ["none"])


def traffic_policy(policy: TrafficPolicy) -> tuple[str, ...]:
    """The sections a policy level sets, one phrase each."""
    out: list[str] = []
    if policy.load_balancer is not None:
        out.append("load balancer: " + load_balancer(policy.load_balancer))
    if policy.connection_pool is not None:
        out.append("connection pool: " + connection_pool(policy.connection_pool))
    if policy.outlier_detection is not None:
        out.append("outlier detection: " + outlier_detection(policy.outlier_detection))
    if policy.tls is not None:
        tls = policy.tls
        extra = [f"SNI {tls.sni}"] if tls.sni else []
        extra += ["SANs " + ", ".join(tls.subject_alt_names)] if tls.subject_alt_names else []
        extra += ["server certificate not verified"] if tls.insecure_skip_verify else []
        out.append(f"TLS mode {tls.mode}" + (f" ({'; '.join(extra)})" if extra else ""))
    return tuple(out)


def load_balancer(lb: LoadBalancer) -> str:
    if lb.consistent_hash is not None:
        h = lb.consistent_hash
        key = (f"header {h.header}" if h.header else f"cookie {h.cookie.name}" if h.cookie else
               "source IP" if h.source_ip else f"query parameter {h.query_parameter}" if h.query_parameter else "?")
        text = f"consistent hash ({h.algorithm}) on {key}"
    else:
        text = lb.simple or "Istio's default (LEAST_REQUEST)"
    if lb.warmup is not None:
        text += f", slow start over {duration(lb.warmup.window)}"
    return text


def connection_pool(pool: ConnectionPool) -> str:
    fields = (
        ("max connections", pool.max_connections), ("connect timeout", pool.connect_timeout),
        ("max connection duration", pool.max_connection_duration), ("TCP idle timeout", pool.tcp_idle_timeout),
        ("max pending HTTP/1 requests", pool.http1_max_pending_requests),
        ("max HTTP/2 requests", pool.http2_max_requests),
        ("max requests per connection", pool.max_requests_per_connection), ("max retries", pool.max_retries),
        ("idle timeout", pool.idle_timeout), ("HTTP/2 upgrade", pool.h2_upgrade_policy),
        ("max concurrent streams", pool.max_concurrent_streams),
    )  # fmt: skip
    parts = [f"{name} {duration(v) if isinstance(v, timedelta) else v}" for name, v in fields if v is not None]
    if pool.tcp_keepalive is not None:
        parts.append("TCP keepalive")
    if pool.use_client_protocol:
        parts.append("client's HTTP version")
    return ", ".join(parts) or "defaults"


def outlier_detection(od: OutlierDetection) -> str:
    fields = (
        ("consecutive 5xx errors", od.consecutive_5xx_errors),
        ("consecutive gateway errors", od.consecutive_gateway_errors),
        ("consecutive local-origin failures", od.consecutive_local_origin_failures),
        ("interval", od.interval), ("base ejection time", od.base_ejection_time),
        ("max ejection", None if od.max_ejection_percent is None else f"{od.max_ejection_percent}%"),
        ("min health", None if od.min_health_percent is None else f"{od.min_health_percent}%"),
    )  # fmt: skip
    parts = [f"{name} {duration(v) if isinstance(v, timedelta) else v}" for name, v in fields if v is not None]
    return "eject hosts: " + (", ".join(parts) or "Istio's defaults")


def authz(policy: AuthzPolicy) -> str:
    """One line: what the policy's rules ask of a request (sources, operations, conditions)."""
    prefix = "dry run; " if policy.dry_run else ""
    if policy.action == "CUSTOM":
        prefix += f"provider {policy.provider or '?'}; "
    if not policy.rules:
        return prefix + ("no rules: denies every request" if policy.action == "ALLOW" else "no rules: matches nothing")
    rules = [_rule(r.principals, r.permissions) for r in policy.rules]
    return prefix + " OR ".join(f"({r})" if len(rules) > 1 else r for r in rules)


def _rule(principals: tuple[tuple[Attr, ...], ...], permissions: tuple[tuple[Attr, ...], ...]) -> str:
    sources = " or ".join(_attrs(p) for p in principals if p)
    ops = " or ".join(_attrs(p) for p in permissions if p)
    return f"from {sources or 'any source'} to {ops or 'any request'}"


_ATTR_WORDS = {"path-matcher": "path", ":method": "method", ":authority": "host"}


def _attrs(attrs: tuple[Attr, ...]) -> str:
    parts = []
    for a in attrs:
        text = _ATTR_WORDS.get(a.key, a.key)
        if a.values:
            text += " in [" + ", ".join(a.values) + "]"
        if a.not_values:
            text += (" and" if a.values else "") + " not in [" + ", ".join(a.not_values) + "]"
        parts.append(text)
    return " and ".join(parts)


def jwt_rules(rules: Iterable[JwtRule]) -> str:
    out = []
    for r in rules:
        text = f"issuer {r.issuer}"
        if r.audiences:
            text += " (audiences " + ", ".join(r.audiences) + ")"
        out.append(text)
    return "accepts JWTs from " + "; ".join(out) if out else "no JWT rules"
