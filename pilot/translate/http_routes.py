"""VirtualService http routes to Envoy routes, for one virtual host (one service port).

Route order is meaning (first match wins), so routes keep the VirtualService's order;
everything inside a route (headers, weighted clusters) is sorted.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.matcher.v3 import regex_pb2

from pilot.api.http_route import MAX_DIRECT_RESPONSE_BODY
from pilot.model import mesh as m
from pilot.translate import names
from pilot.translate.matchers import string_matcher
from pilot.translate.policy import cluster_hash_policies
from pilot.translate.retries import DEFAULT_RETRY_ON, retry_policy
from pilot.translate.route_policies import apply_filter_configs, apply_headers, mirror_policies
from pilot.translate.route_source import RouteSource

_REDIRECT_CODES = {
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}
__all__ = ["DEFAULT_RETRY_ON", "RouteSource", "string_matcher"]


def set_timeout(action: Any, timeout: timedelta | None) -> None:
    """A route's timeout as Istio sets it: the VirtualService's, else none (``0s``; Envoy's own
    default would be 15s). A gRPC caller's ``grpc-timeout`` header may shorten it, never extend
    it (``max_grpc_timeout`` = the timeout; 0 = no cap), as Istio does on sidecars."""
    if timeout is not None:
        action.timeout.FromTimedelta(timeout)
    else:
        action.timeout.FromSeconds(0)
    action.max_grpc_timeout.CopyFrom(action.timeout)


def default_route(cluster: str) -> Any:
    """Everything to ``cluster``, with Istio's "no timeout"."""
    action = rc.RouteAction(cluster=cluster)
    set_timeout(action, None)
    return rc.Route(name="default", match=rc.RouteMatch(prefix="/"), route=action)


def outbound_default_route(cluster: str) -> Any:
    """The route of a service port no VirtualService routes: no timeout, Istio's default retries."""
    route = default_route(cluster)
    route.route.retry_policy.CopyFrom(retry_policy(None))
    return route


def virtual_service_routes(
    mesh: m.MeshSnapshot, rule: m.RoutingRule, port: int, source: RouteSource | None = None
) -> list[Any]:
    """Envoy routes of ``rule`` for requests reaching ``port`` from ``source``, in rule order.

    Matches for other ports, other senders (sourceLabels, sourceNamespace, gateways) are left
    out; a route none of whose matches is left does not apply. ``source`` defaults to a sidecar
    without labels in the rule's namespace. Gateway code calls this with its own source.
    """
    sender = source or RouteSource(rule.namespace)
    return [r for route in rule.http for r in http_route_entries(mesh, rule, route, port, sender)]


def http_route_entries(
    mesh: m.MeshSnapshot, rule: m.RoutingRule, route: m.HttpRoute, port: int, source: RouteSource
) -> list[Any]:
    """One Envoy route per applicable match of one VirtualService http entry."""
    matches = [x for x in route.matches if x.port in (None, port) and source.accepts_http(rule, x)]
    if route.matches and not matches:
        return []
    if not route.matches and not source.accepts(rule.gateways, (), (), None):
        return []
    out = []
    for match in matches or [m.RouteMatch()]:
        name = ".".join(n for n in (route.name, match.name) if n)
        envoy_route = rc.Route(name=name, match=route_match(match), stat_prefix=match.stat_prefix)
        _set_action(envoy_route, mesh, route, port)
        out.append(envoy_route)
    return out


def route_match(match: m.RouteMatch) -> Any:
    out = rc.RouteMatch()
    uri = match.uri
    if uri is None or (uri.kind == "prefix" and uri.value == ""):
        out.prefix = "/"
    elif uri.kind == "exact":
        out.path = uri.value
    elif uri.kind == "prefix":
        out.prefix = uri.value
    else:
        out.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=uri.value))
    if match.ignore_uri_case:
        out.case_sensitive.value = False
    pseudo = [(":method", match.method), (":authority", match.authority), (":scheme", match.scheme)]
    headers = [(k, v, False) for k, v in pseudo if v is not None]
    headers += [(k, v, False) for k, v in match.headers] + [(k, v, True) for k, v in match.without_headers]
    for name, value, invert in sorted(headers, key=lambda h: (h[0], h[2])):
        out.headers.append(_header_matcher(name, value, invert))
    for name, value in match.query_params:
        out.query_parameters.append(rc.QueryParameterMatcher(name=name, string_match=string_matcher(value)))
    return out


def _header_matcher(name: str, value: m.StringMatch, invert: bool) -> Any:
    """A header match; inverted ones are Istio's ``withoutHeaders``.

    Istio: ``withoutHeaders`` matches a request whose header does not match, and a request without
    the header. Envoy's inverted string match fails on a missing header, so (as Istio does) a
    missing header counts as empty, and ``{}`` (presence, ``.*`` in the model) becomes an inverted
    presence match: "the header is absent".
    """
    if not invert:
        return rc.HeaderMatcher(name=name, string_match=string_matcher(value))
    if value == m.PRESENT:
        return rc.HeaderMatcher(name=name, present_match=True, invert_match=True)
    return rc.HeaderMatcher(
        name=name, string_match=string_matcher(value), invert_match=True, treat_missing_header_as_empty=True
    )


def _set_action(out: Any, mesh: m.MeshSnapshot, route: m.HttpRoute, port: int) -> None:
    if route.redirect is not None:
        out.redirect.CopyFrom(_redirect(route.redirect, port))
    elif route.direct_response is not None:
        out.direct_response.status = route.direct_response.status
        if route.direct_response.body is not None:
            out.direct_response.body.inline_string = route.direct_response.body
        elif route.direct_response.body_bytes is not None:
            out.direct_response.body.inline_bytes = route.direct_response.body_bytes
    else:
        out.route.CopyFrom(_route_action(mesh, route, port))
    apply_headers(out, route.headers)
    if out.HasField("route"):
        _lone_destination_headers(out, route)
    apply_filter_configs(out, route)


def _lone_destination_headers(out: Any, route: m.HttpRoute) -> None:
    """Istio: a lone destination's header rules join the route's, after them (so its ``set`` wins);
    the authority is ``rewrite.authority``, else the route's ``host`` header, else the destination's.
    """
    lone = route.destinations[0].headers if len(route.destinations) == 1 else m.HeaderRules()
    apply_headers(out, lone)
    authority = route.rewrite_authority or route.headers.authority or lone.authority
    if authority is not None:
        out.route.host_rewrite_literal = authority


def destination_port(mesh: m.MeshSnapshot, dest: m.RouteDestination, port: int) -> int:
    """Where a destination's traffic goes: its port, else the service's only port, else the request's."""
    number = dest.port
    service = mesh.service(dest.host)
    if number is None and service is not None and len(service.ports) == 1:
        number = service.ports[0].number
    return number or port


def destination_cluster(mesh: m.MeshSnapshot, dest: m.RouteDestination, port: int) -> str:
    return names.outbound_cluster(destination_port(mesh, dest, port), dest.subset, dest.host)


def _route_action(mesh: m.MeshSnapshot, route: m.HttpRoute, port: int) -> Any:
    weights: dict[str, int] = {}
    for dest in route.destinations:
        if dest.weight > 0:
            name = destination_cluster(mesh, dest, port)
            weights[name] = weights.get(name, 0) + dest.weight
    action = rc.RouteAction()
    action.hash_policy.extend(cluster_hash_policies(mesh, weights))  # DestinationRule consistentHash
    if len(weights) == 1:
        action.cluster = next(iter(weights))
    for name, weight in sorted(weights.items()) if len(weights) > 1 else ():
        cluster = action.weighted_clusters.clusters.add(name=name)
        cluster.weight.value = weight
        _destination_headers(cluster, mesh, route, port)
    # Istio: a lone destination whose DestinationRule hashes keeps retries on the hashed host.
    hashed = len(route.destinations) == 1 and len(action.hash_policy) > 0
    _apply_policies(action, mesh, route, port, hashed)
    return action


def _destination_headers(cluster: Any, mesh: m.MeshSnapshot, route: m.HttpRoute, port: int) -> None:
    """Destination-level header rules of the (first) destination behind a weighted cluster."""
    dest = next(d for d in route.destinations if destination_cluster(mesh, d, port) == cluster.name)
    apply_headers(cluster, dest.headers)
    if dest.headers.authority is not None:
        cluster.host_rewrite_literal = dest.headers.authority


def _apply_policies(action: Any, mesh: m.MeshSnapshot, route: m.HttpRoute, port: int, hashed: bool) -> None:
    """Timeout (Istio: none unless set), retries, path rewrites and mirrors of a forwarding route."""
    set_timeout(action, route.timeout)
    policy = retry_policy(route.retries, consistent_hash=hashed)
    if policy is not None:
        action.retry_policy.CopyFrom(policy)
    if route.rewrite_uri is not None:
        action.prefix_rewrite = route.rewrite_uri
    if route.rewrite_uri_regex is not None:
        action.regex_rewrite.pattern.regex = route.rewrite_uri_regex[0]
        action.regex_rewrite.substitution = route.rewrite_uri_regex[1]
    action.request_mirror_policies.extend(
        mirror_policies(route.mirrors, lambda d: destination_cluster(mesh, d, port))
    )


def _redirect(redirect: m.Redirect, port: int) -> Any:
    """Envoy's redirect. derivePort FROM_REQUEST_PORT is the port this route config serves (as in
    Istio: every route config is built for one port); FROM_PROTOCOL_DEFAULT sets no port."""
    out = rc.RedirectAction(
        response_code=_REDIRECT_CODES.get(redirect.code, rc.RedirectAction.MOVED_PERMANENTLY)
    )
    if redirect.uri is not None:
        out.path_redirect = redirect.uri
    if redirect.authority is not None:
        out.host_redirect = redirect.authority
    if redirect.port is not None:
        out.port_redirect = redirect.port
    elif redirect.port_from_request:
        out.port_redirect = port
    if redirect.scheme is not None:
        out.scheme_redirect = redirect.scheme
    return out


# Envoy's default limit for direct-response bodies in one route config; larger ones are NACKed.
ENVOY_DIRECT_BODY_LIMIT = 4096


def allow_large_direct_bodies(config: Any) -> Any:
    """Raise a route config's direct-response body limit to Istio's 1 MB where a body needs it.

    Envoy refuses a whole RouteConfiguration holding a body over 4 KB unless
    `max_direct_response_body_size_bytes` says more; Istio validates bodies up to 1 MB.
    """
    if needs_large_direct_bodies(config.virtual_hosts):
        config.max_direct_response_body_size_bytes.value = MAX_DIRECT_RESPONSE_BODY
    return config


def needs_large_direct_bodies(vhosts: Iterable[Any]) -> bool:
    """Whether a route of these virtual hosts answers with a body over Envoy's default limit."""
    sizes = (
        len(r.direct_response.body.inline_string.encode()) + len(r.direct_response.body.inline_bytes)
        for vhost in vhosts for r in vhost.routes if r.HasField("direct_response")
    )
    return max(sizes, default=0) > ENVOY_DIRECT_BODY_LIMIT
