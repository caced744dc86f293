"""VirtualService -> RoutingRule: Istio's defaults made explicit, host and gateway names qualified.

Pure, one object at a time. Defaults that Istio documents are applied here (a lone destination
takes all traffic; a fault or mirror without a percentage applies to 100%), so the generators
never have to know Istio's field shapes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from pilot.api import http_route as hr
from pilot.api import route_common as rcm
from pilot.api import virtual_service as vs
from pilot.model import mesh as m
from pilot.model.convert import qualify

MESH_GATEWAY = "mesh"


def qualify_gateway(name: str, namespace: str) -> str:
    """``mesh`` stays; ``gw`` is ``<namespace>/gw``; ``ns/gw`` is already qualified."""
    return name if name == MESH_GATEWAY or "/" in name else f"{namespace}/{name}"


def string_match(src: rcm.StringMatch | None) -> m.StringMatch | None:
    """None for no match and for an empty one (header and query presence)."""
    if src is None or src.empty:
        return None
    if src.exact is not None:
        return m.StringMatch("exact", src.exact)
    if src.prefix is not None:
        return m.StringMatch("prefix", src.prefix)
    return m.StringMatch("regex", src.regex or "")


def _named(src: Mapping[str, rcm.StringMatch]) -> tuple[tuple[str, m.StringMatch], ...]:
    # A name with an empty match means "present": a regex that matches anything.
    return tuple((k, string_match(v) or m.PRESENT) for k, v in sorted(src.items()))


def _headers(src: Mapping[str, rcm.StringMatch]) -> tuple[tuple[str, m.StringMatch], ...]:
    # Headers also take Istio's catch-all `regex: "*"`, another way to say "present".
    return tuple((k, m.PRESENT if v.regex == rcm.CATCH_ALL_REGEX else string_match(v) or m.PRESENT)
                 for k, v in sorted(src.items()))


def _labels(src: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(src.items()))


def route_match(src: hr.HTTPMatchRequest, namespace: str) -> m.RouteMatch:
    return m.RouteMatch(
        uri=string_match(src.uri),
        ignore_uri_case=src.ignore_uri_case,
        method=string_match(src.method),
        authority=string_match(src.authority),
        scheme=string_match(src.scheme),
        headers=_headers(src.headers),
        without_headers=_headers(src.without_headers),
        query_params=_named(src.query_params),
        port=src.port,
        source_labels=_labels(src.source_labels),
        source_namespace=src.source_namespace,
        gateways=tuple(sorted(qualify_gateway(g, namespace) for g in src.gateways)),
        name=src.name or "",
        stat_prefix=src.stat_prefix or "",
    )


def header_ops(src: hr.HeaderOperations | None) -> m.HeaderOps:
    if src is None:
        return m.HeaderOps()
    keep = {k: v for k, v in src.set.items() if k.lower() not in hr.HOST_HEADERS}
    return m.HeaderOps(set=_labels(keep), add=_labels(src.add), remove=tuple(sorted(src.remove)))


def header_rules(src: hr.Headers | None) -> m.HeaderRules:
    """Istio: setting ``host``/``:authority`` on the request rewrites the authority."""
    if src is None:
        return m.HeaderRules()
    sets = src.request.set if src.request else {}
    authority = next((v for k, v in sets.items() if k.lower() in hr.HOST_HEADERS), None)
    return m.HeaderRules(request=header_ops(src.request), response=header_ops(src.response), authority=authority)


def destination(
    src: rcm.Destination, namespace: str, domain: str, weight: int = 100, headers: hr.Headers | None = None
) -> m.RouteDestination:
    return m.RouteDestination(
        host=qualify(src.host, namespace, domain),
        subset=src.subset or "",
        port=src.port.number if src.port else None,
        weight=weight,
        headers=header_rules(headers),
    )


def _percent(new: rcm.Percentage | None, old: int | None) -> float:
    """Istio: ``percentage`` wins over the deprecated integer; neither set means 100%."""
    if new is not None:
        return new.value
    return float(old) if old is not None else 100.0


def fault(src: hr.HTTPFaultInjection | None) -> m.Fault | None:
    if src is None:
        return None
    delay, abort = src.delay, src.abort
    return m.Fault(
        delay=delay.fixed_delay if delay else None,
        delay_percent=_percent(delay.percentage, delay.percent) if delay else 100.0,
        abort_http_status=abort.http_status if abort else None,
        abort_grpc_status=hr.GRPC_STATUS[abort.grpc_status] if abort and abort.grpc_status else None,
        abort_percent=_percent(abort.percentage, None) if abort else 100.0,
    )


def mirrors(src: hr.HTTPRoute, namespace: str, domain: str) -> tuple[m.Mirror, ...]:
    if src.mirror is not None:
        percent = _percent(src.mirror_percentage, src.mirror_percent)
        return (m.Mirror(destination(src.mirror, namespace, domain), percent),)
    return tuple(
        m.Mirror(destination(p.destination, namespace, domain), _percent(p.percentage, None)) for p in src.mirrors
    )


def cors(src: hr.CorsPolicy | None) -> m.CorsPolicy | None:
    if src is None:
        return None
    origins = [sm for o in src.allow_origins if (sm := string_match(o)) is not None]
    # Deprecated allowOrigin: exact origins, with "*" meaning any.
    origins += [m.StringMatch("regex", ".*") if o == "*" else m.StringMatch("exact", o) for o in src.allow_origin]
    return m.CorsPolicy(
        allow_origins=tuple(origins),
        allow_methods=src.allow_methods,
        allow_headers=src.allow_headers,
        expose_headers=src.expose_headers,
        max_age=src.max_age,
        allow_credentials=src.allow_credentials,
        forward_unmatched_preflights=src.unmatched_preflights != "IGNORE",
    )


def retries(src: hr.HTTPRetry | None) -> m.Retries | None:
    if src is None:
        return None
    return m.Retries(
        attempts=src.attempts,
        per_try_timeout=src.per_try_timeout,
        retry_on=src.retry_on,
        retry_remote_localities=bool(src.retry_remote_localities),
        retry_ignore_previous_hosts=src.retry_ignore_previous_hosts,
        backoff=src.backoff,
    )


def redirect(src: hr.HTTPRedirect | None) -> m.Redirect | None:
    if src is None:
        return None
    return m.Redirect(
        uri=src.uri, authority=src.authority, port=src.port, scheme=src.scheme, code=src.redirect_code or 301,
        port_from_request=src.derive_port == hr.DerivePort.FROM_REQUEST_PORT,
    )


def direct_response(src: hr.HTTPDirectResponse | None) -> m.DirectResponse | None:
    if src is None:
        return None
    if src.body is None:
        return m.DirectResponse(status=src.status)
    return m.DirectResponse(status=src.status, body=src.body.string, body_bytes=src.body.decoded())


def http_route(src: hr.HTTPRoute, namespace: str, domain: str) -> m.HttpRoute:
    single = len(src.route) == 1
    # Istio: a lone destination takes all traffic whatever its weight says.
    dests = tuple(
        destination(d.destination, namespace, domain, 100 if single else (d.weight or 0), d.headers) for d in src.route
    )
    rewrite = src.rewrite or hr.HTTPRewrite()
    regex = rewrite.uri_regex_rewrite
    return m.HttpRoute(
        name=src.name or "",
        matches=tuple(route_match(x, namespace) for x in src.match),
        destinations=dests,
        redirect=redirect(src.redirect),
        direct_response=direct_response(src.direct_response),
        timeout=src.timeout,
        retries=retries(src.retries),
        rewrite_uri=rewrite.uri,
        rewrite_authority=rewrite.authority,
        rewrite_uri_regex=(regex.match, regex.rewrite) if regex else None,
        fault=fault(src.fault),
        mirrors=mirrors(src, namespace, domain),
        cors=cors(src.cors_policy),
        headers=header_rules(src.headers),
    )


def l4_match(src: vs.L4MatchAttributes | vs.TLSMatchAttributes, namespace: str) -> m.L4Match:
    return m.L4Match(
        port=src.port,
        destination_subnets=src.destination_subnets,
        sni_hosts=src.sni_hosts if isinstance(src, vs.TLSMatchAttributes) else (),
        source_labels=_labels(src.source_labels),
        source_namespace=src.source_namespace,
        gateways=tuple(sorted(qualify_gateway(g, namespace) for g in src.gateways)),
    )


def l4_route(src: vs.TCPRoute | vs.TLSRoute, namespace: str, domain: str) -> m.L4Route:
    single = len(src.route) == 1
    return m.L4Route(
        matches=tuple(l4_match(x, namespace) for x in src.match),
        destinations=tuple(
            destination(d.destination, namespace, domain, 100 if single else (d.weight or 0)) for d in src.route
        ),
    )


def routing_rule(src: vs.VirtualService, cluster_domain: str) -> m.RoutingRule:
    ns = src.metadata.namespace
    return m.RoutingRule(
        namespace=ns,
        name=src.metadata.name,
        hosts=tuple(qualify(h, ns, cluster_domain) for h in src.spec.hosts),
        http=tuple(http_route(r, ns, cluster_domain) for r in src.spec.http),
        tcp=tuple(l4_route(r, ns, cluster_domain) for r in src.spec.tcp),
        tls=tuple(l4_route(r, ns, cluster_domain) for r in src.spec.tls),
        gateways=tuple(sorted(qualify_gateway(g, ns) for g in src.spec.gateways)) or (MESH_GATEWAY,),
    )


def all_destinations(rule: m.RoutingRule) -> Iterator[m.RouteDestination]:
    """Every destination a rule can send to: http routes and mirrors, tcp and tls routes."""
    for route in rule.http:
        yield from route.destinations
        yield from (mirror.destination for mirror in route.mirrors)
    for l4 in (*rule.tcp, *rule.tls):
        yield from l4.destinations
