"""VirtualService http routes to Envoy routes, for one virtual host (one service port).

Route order is meaning (first match wins), so routes keep the VirtualService's order;
everything inside a route (headers, weighted clusters) is sorted.
"""

from __future__ import annotations

from typing import Any

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from pilot.model import mesh as m
from pilot.translate import names
from pilot.translate.policy import cluster_hash_policies

_REDIRECT_CODES = {
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}
# Istio's default retry conditions when a VirtualService sets attempts but not retryOn.
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


def default_route(cluster: str) -> Any:
    return rc.Route(name="default", match=rc.RouteMatch(prefix="/"), route=rc.RouteAction(cluster=cluster))


def virtual_service_routes(mesh: m.MeshSnapshot, rule: m.RoutingRule, port: int) -> list[Any]:
    """Envoy routes for requests reaching ``port``; matches for other ports are left out."""
    out = []
    for route in rule.http:
        matches = [x for x in route.matches if x.port in (None, port)]
        if route.matches and not matches:
            continue
        for match in matches or [m.RouteMatch()]:
            envoy_route = rc.Route(name=route.name, match=route_match(match))
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
        out.headers.append(
            rc.HeaderMatcher(name=name, string_match=string_matcher(value), invert_match=invert)
        )
    for name, value in match.query_params:
        out.query_parameters.append(rc.QueryParameterMatcher(name=name, string_match=string_matcher(value)))
    return out


def string_matcher(match: m.StringMatch) -> Any:
    if match.kind == "exact":
        return string_pb2.StringMatcher(exact=match.value)
    if match.kind == "prefix":
        return string_pb2.StringMatcher(prefix=match.value)
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=match.value))


def _set_action(out: Any, mesh: m.MeshSnapshot, route: m.HttpRoute, port: int) -> None:
    if route.redirect is not None:
        out.redirect.CopyFrom(_redirect(route.redirect))
    elif route.direct_response is not None:
        out.direct_response.status = route.direct_response.status
        if route.direct_response.body is not None:
            out.direct_response.body.inline_string = route.direct_response.body
    else:
        out.route.CopyFrom(_route_action(mesh, route, port))


def destination_cluster(mesh: m.MeshSnapshot, dest: m.RouteDestination, port: int) -> str:
    """Cluster for a destination: its port, else the service's only port, else the request's port."""
    number = dest.port
    service = mesh.service(dest.host)
    if number is None and service is not None and len(service.ports) == 1:
        number = service.ports[0].number
    return names.outbound_cluster(number or port, dest.subset, dest.host)


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
    if route.timeout is not None:
        action.timeout.FromTimedelta(route.timeout)
    if route.retries is not None and route.retries.attempts > 0:
        policy = action.retry_policy
        policy.retry_on = route.retries.retry_on or DEFAULT_RETRY_ON
        policy.num_retries.value = route.retries.attempts
        if route.retries.per_try_timeout is not None:
            policy.per_try_timeout.FromTimedelta(route.retries.per_try_timeout)
    if route.rewrite_uri is not None:
        action.prefix_rewrite = route.rewrite_uri
    if route.rewrite_authority is not None:
        action.host_rewrite_literal = route.rewrite_authority
    return action


def _redirect(redirect: m.Redirect) -> Any:
    out = rc.RedirectAction(
        response_code=_REDIRECT_CODES.get(redirect.code, rc.RedirectAction.MOVED_PERMANENTLY)
    )
    if redirect.uri is not None:
        out.path_redirect = redirect.uri
    if redirect.authority is not None:
        out.host_redirect = redirect.authority
    if redirect.port is not None:
        out.port_redirect = redirect.port
    if redirect.scheme is not None:
        out.scheme_redirect = redirect.scheme
    return out
