"""Conversions from Istio API shapes to mesh model values (one object at a time, pure)."""

from __future__ import annotations

from pilot.api import destination_rule as dr
from pilot.api import virtual_service as vs
from pilot.model import mesh as m
from pilot.model.convert_policy import port_policies, traffic_policy


def qualify(host: str, namespace: str, cluster_domain: str) -> str:
    """Istio's short-name rule: ``reviews`` in ``default`` is ``reviews.default.svc.<domain>``.

    Names with a dot, wildcards and ``*`` are already fully qualified.
    """
    if "." in host or host.startswith("*"):
        return host
    return f"{host}.{namespace}.svc.{cluster_domain}"


def destination_policy(rule: dr.DestinationRule, host: str) -> m.DestinationPolicy:
    subsets = {
        s.name: m.Subset(
            name=s.name,
            labels=m.frozen_map(s.labels),
            policy=traffic_policy(s.traffic_policy),
            port_policies=m.frozen_map(port_policies(s.traffic_policy)),
        )
        for s in rule.spec.subsets
    }
    return m.DestinationPolicy(
        host=host,
        namespace=rule.metadata.namespace,
        name=rule.metadata.name,
        policy=traffic_policy(rule.spec.traffic_policy),
        port_policies=m.frozen_map(port_policies(rule.spec.traffic_policy)),
        subsets=m.frozen_map(subsets),
    )


def string_match(src: vs.StringMatch | None) -> m.StringMatch | None:
    if src is None:
        return None
    if src.exact is not None:
        return m.StringMatch("exact", src.exact)
    if src.prefix is not None:
        return m.StringMatch("prefix", src.prefix)
    return m.StringMatch("regex", src.regex or "")


def _named(src: dict[str, vs.StringMatch]) -> tuple[tuple[str, m.StringMatch], ...]:
    return tuple((k, sm) for k, v in sorted(src.items()) if (sm := string_match(v)) is not None)


def route_match(src: vs.HTTPMatchRequest) -> m.RouteMatch:
    return m.RouteMatch(
        uri=string_match(src.uri),
        ignore_uri_case=src.ignore_uri_case,
        method=string_match(src.method),
        authority=string_match(src.authority),
        scheme=string_match(src.scheme),
        headers=_named(src.headers),
        without_headers=_named(src.without_headers),
        query_params=_named(src.query_params),
        port=src.port,
    )


def http_route(src: vs.HTTPRoute, namespace: str, cluster_domain: str) -> m.HttpRoute:
    single = len(src.route) == 1
    destinations = tuple(
        m.RouteDestination(
            host=qualify(d.destination.host, namespace, cluster_domain),
            subset=d.destination.subset or "",
            port=d.destination.port.number if d.destination.port else None,
            # Istio: a lone destination takes all traffic whatever its weight says.
            weight=vs.FULL_WEIGHT if single else (d.weight or 0),
        )
        for d in src.route
    )
    return m.HttpRoute(
        name=src.name or "",
        matches=tuple(route_match(x) for x in src.match),
        destinations=destinations,
        redirect=_redirect(src.redirect),
        direct_response=_direct_response(src.direct_response),
        timeout=src.timeout,
        retries=_retries(src.retries),
        rewrite_uri=src.rewrite.uri if src.rewrite else None,
        rewrite_authority=src.rewrite.authority if src.rewrite else None,
    )


def _redirect(src: vs.HTTPRedirect | None) -> m.Redirect | None:
    if src is None:
        return None
    return m.Redirect(
        uri=src.uri, authority=src.authority, port=src.port, scheme=src.scheme, code=src.redirect_code or 301
    )


def _direct_response(src: vs.HTTPDirectResponse | None) -> m.DirectResponse | None:
    if src is None:
        return None
    body = src.body or {}
    text = body.get("string")
    return m.DirectResponse(status=src.status, body=text if isinstance(text, str) else None)


def _retries(src: vs.HTTPRetry | None) -> m.Retries | None:
    if src is None:
        return None
    return m.Retries(attempts=src.attempts, per_try_timeout=src.per_try_timeout, retry_on=src.retry_on)


def routing_rule(src: vs.VirtualService, cluster_domain: str) -> m.RoutingRule:
    ns = src.metadata.namespace
    return m.RoutingRule(
        namespace=ns,
        name=src.metadata.name,
        hosts=tuple(qualify(h, ns, cluster_domain) for h in src.spec.hosts),
        http=tuple(http_route(r, ns, cluster_domain) for r in src.spec.http),
    )
