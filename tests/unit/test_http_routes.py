"""VirtualService route features: Istio's validation errors, defaults, and their Envoy translation."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from envoy.extensions.filters.http.fault.v3 import fault_pb2

from pilot.api import InvalidObjectError, parse_object
from pilot.model import mesh as m
from pilot.model.build import build_mesh
from pilot.translate.faults import FAULT_FILTER
from pilot.translate.http_routes import virtual_service_routes
from pilot.translate.retries import DEFAULT_RETRY_ON, parse_retry_on
from pilot.translate.route_source import RouteSource
from pilot.translate.routes import outbound_route_config

SE = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "ServiceEntry",
    "metadata": {"name": "r", "namespace": "default"},
    "spec": {"hosts": ["r.default.svc.cluster.local"], "ports": [{"number": 80, "name": "http"}]},
}
DEST = {"destination": {"host": "r"}}


def vs(*http: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "r", "namespace": "default"},
        "spec": {"hosts": ["r"], "http": list(http), **spec},
    }


@pytest.mark.parametrize(
    ("route", "path", "reason"),
    [
        ({"route": [DEST], "timeout": "0s"}, "spec.http[0].timeout", "at least 1ms"),
        (
            {"route": [DEST], "retries": {"attempts": 2, "retryOn": "5xx,bogus"}},
            "spec.http[0].retries.retryOn",
            "'bogus'",
        ),
        (
            {"route": [DEST], "retries": {"attempts": 2, "perTryTimeout": "0ms"}},
            "spec.http[0].retries.perTryTimeout",
            "1ms",
        ),
        ({"route": [DEST], "fault": {}}, "spec.http[0].fault", "delay, abort or both"),
        (
            {"route": [DEST], "fault": {"delay": {"percentage": {"value": 5}}}},
            "spec.http[0].fault.delay.fixedDelay",
            "required",
        ),
        (
            {"route": [DEST], "fault": {"abort": {"httpStatus": 700}}},
            "spec.http[0].fault.abort.httpStatus",
            "200 and 599",
        ),
        (
            {"route": [DEST], "fault": {"abort": {"grpcStatus": "NOPE"}}},
            "spec.http[0].fault.abort.grpcStatus",
            "gRPC status",
        ),
        (
            {"route": [DEST], "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 101}}}},
            "spec.http[0].fault.abort.percentage.value",
            "between 0 and 100",
        ),
        (
            {"route": [DEST], "mirror": {"host": "r"}, "mirrors": [DEST]},
            "spec.http[0]",
            "at most one of mirror, mirrors",
        ),
        (
            {"route": [DEST], "mirrorPercentage": {"value": 5}},
            "spec.http[0].mirrorPercentage",
            "only applies to mirror",
        ),
        ({"redirect": {"uri": "/x", "redirectCode": 305}}, "spec.http[0].redirect.redirectCode", "305 is not one of"),
        ({"redirect": {"uri": "/x"}, "rewrite": {"uri": "/y"}}, "spec.http[0].rewrite", "cannot be used with redirect"),
        (
            {"route": [DEST], "rewrite": {"uri": "/a", "uriRegexRewrite": {"match": "a", "rewrite": "b"}}},
            "spec.http[0].rewrite",
            "at most one of uri, uriRegexRewrite",
        ),
        (
            {"match": [{"uri": {"regex": "(a"}}], "route": [DEST]},
            "spec.http[0].match[0].uri.regex",
            "not a valid regex",
        ),
        ({"match": [{"uri": {"regex": "(?=a)"}}], "route": [DEST]}, "spec.http[0].match[0].uri.regex", "RE2"),
        (
            {"directResponse": {"status": 200, "body": {"string": "a", "bytes": "YQ=="}}},
            "spec.http[0].directResponse.body",
            "at most one of string, bytes",
        ),
        (
            {"directResponse": {"status": 200, "body": {"bytes": "not base64!"}}},
            "spec.http[0].directResponse.body.bytes",
            "is not valid base64",
        ),
        (
            {"directResponse": {"status": 200, "body": {"string": "x" * (1024 * 1024 + 1)}}},
            "spec.http[0].directResponse.body",
            "is 1048577 bytes; a direct response body may be at most 1 MB",
        ),
        # Istio's catch-all "*" is for headers only; elsewhere it is an invalid regex.
        ({"match": [{"uri": {"regex": "*"}}], "route": [DEST]}, "spec.http[0].match[0].uri.regex", "not a valid"),
        (
            {"match": [{"queryParams": {"q": {"regex": "*"}}}], "route": [DEST]},
            "spec.http[0].match[0].queryParams.q.regex",
            "not a valid regex",
        ),
        ({"match": [{"uri": {}}], "route": [DEST]}, "spec.http[0].match[0].uri", "exactly one of"),
        (
            {"match": [{"queryParams": {"q": {"prefix": "a"}}}], "route": [DEST]},
            "spec.http[0].match[0].queryParams.q",
            "prefix",
        ),
        (
            {"route": [DEST], "headers": {"request": {"remove": ["host"]}}},
            "spec.http[0].headers.request",
            "only be set",
        ),
        (
            {"route": [DEST], "corsPolicy": {"allowMethods": ["FETCH"]}},
            "spec.http[0].corsPolicy.allowMethods",
            "not an HTTP method",
        ),
        (
            {"route": [DEST], "corsPolicy": {"maxAge": "1.5s"}},
            "spec.http[0].corsPolicy.maxAge",
            "whole number of seconds",
        ),
        (
            {"route": [DEST], "retries": {"attempts": 0, "perTryTimeout": "1s"}},
            "spec.http[0].retries",
            "attempts are set to 0 (disabled)",
        ),
        (
            {"route": [{**DEST, "weight": 0}, {"destination": {"host": "r", "subset": "b"}}]},
            "spec.http[0].route",
            "total destination weight = 0",
        ),
        (
            {"route": [{**DEST, "weight": -1}, {"destination": {"host": "r", "subset": "b"}, "weight": 1}]},
            "spec.http[0].route[0].weight",
            "between 0 and 2147483647",
        ),
        (
            {"route": [{**DEST, "weight": 2**31 - 1}, {**DEST, "weight": 2**31 - 1}, {**DEST, "weight": 2}]},
            "spec.http[0].route",
            "exceeds Envoy's limit 4294967295",
        ),
    ],
)
def test_invalid_http_routes_name_the_field_and_reason(route: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(InvalidObjectError) as info:
        parse_object(vs(route))
    assert str(info.value).startswith("VirtualService default/r: ")
    assert any(i.path == path and reason in i.message for i in info.value.issues), info.value.issues


@pytest.mark.parametrize(
    ("spec", "path", "reason"),
    [
        ({"tcp": [{"route": []}]}, "spec.tcp[0].route", "at least one destination"),
        (
            {"tcp": [{"match": [{"destinationSubnets": ["10.0.0.0/33"]}], "route": [DEST]}]},
            "spec.tcp[0].match[0].destinationSubnets[0]",
            "CIDR",
        ),
        ({"tls": [{"route": [DEST]}]}, "spec.tls[0].match", "sniHosts"),
        ({"tls": [{"match": [{"port": 443}], "route": [DEST]}]}, "spec.tls[0].match[0].sniHosts", "at least one SNI"),
    ],
)
def test_invalid_l4_routes_name_the_field_and_reason(spec: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(InvalidObjectError) as info:
        parse_object(vs(**spec))
    assert any(i.path == path and reason in i.message for i in info.value.issues), info.value.issues


def test_sni_outside_the_hosts_is_a_warning() -> None:
    doc = vs(tls=[{"match": [{"sniHosts": ["other.example.com"]}], "route": [DEST]}])
    doc["spec"]["hosts"] = ["r.example.com"]
    obj = parse_object(doc)
    assert [w.path for w in obj.warnings] == ["spec.tls[0].match[0].sniHosts"]


def routes(*http: dict[str, Any], source: RouteSource | None = None) -> list[Any]:
    mesh = build_mesh([parse_object(SE), parse_object(vs(*http))])
    rule = mesh.virtual_services["r.default.svc.cluster.local"]
    return virtual_service_routes(mesh, rule, 80, source)


def test_catch_all_regex_is_accepted_in_headers_and_means_present() -> None:
    match = {"headers": {"x-a": {"regex": "*"}}, "withoutHeaders": {"x-b": {"regex": "*"}}}
    obj = parse_object(vs({"match": [match], "route": [DEST]}))
    (rule,) = build_mesh([parse_object(SE), obj]).virtual_services.values()
    (route_match,) = rule.http[0].matches
    present = m.StringMatch("regex", ".*")
    assert route_match.headers == (("x-a", present),) and route_match.without_headers == (("x-b", present),)


@pytest.mark.parametrize(("body", "limit"), [({"string": "x" * 4096}, 0), ({"string": "x" * 4097}, 1024 * 1024),
                                             ({"bytes": base64.b64encode(b"\0" * 5000).decode()}, 1024 * 1024)])
def test_route_configs_raise_envoys_body_limit_only_for_bodies_over_4k(body: dict[str, str], limit: int) -> None:
    mesh = build_mesh([parse_object(SE), parse_object(vs({"directResponse": {"status": 200, "body": body}}))])
    config = outbound_route_config(mesh, "default")
    assert config.max_direct_response_body_size_bytes.value == limit
    (route,) = [r for vh in config.virtual_hosts for r in vh.routes if r.HasField("direct_response")]
    expected = body["string"].encode() if "string" in body else base64.b64decode(body["bytes"])
    assert route.direct_response.body.inline_string.encode() + route.direct_response.body.inline_bytes == expected


def test_istio_defaults_no_timeout_and_two_retries_on_connection_failures_but_not_on_503() -> None:
    (route,) = routes({"route": [DEST]})
    action = route.route
    assert action.timeout.ToSeconds() == 0 and action.HasField("timeout")
    assert action.max_grpc_timeout.ToSeconds() == 0 and action.HasField("max_grpc_timeout")
    policy = action.retry_policy
    assert policy.retry_on == DEFAULT_RETRY_ON
    assert DEFAULT_RETRY_ON == "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
    assert policy.num_retries.value == 2
    assert list(policy.retriable_status_codes) == []  # Istio 1.24: a 503 is not retried by default
    assert [p.name for p in policy.retry_host_predicate] == ["envoy.retry_host_predicates.previous_hosts"]
    assert policy.host_selection_retry_max_attempts == 5


def test_a_grpc_timeout_header_may_shorten_the_route_timeout_but_not_exceed_it() -> None:
    (route,) = routes({"route": [DEST], "timeout": "3s"})
    assert route.route.timeout.ToSeconds() == route.route.max_grpc_timeout.ToSeconds() == 3


def test_a_service_without_a_virtual_service_gets_the_same_default_policy() -> None:
    mesh = build_mesh([parse_object(SE)])
    (vhost,) = outbound_route_config(mesh, "default").virtual_hosts
    (route,) = vhost.routes
    assert route.route.retry_policy.retry_on == DEFAULT_RETRY_ON
    assert list(route.route.retry_policy.retriable_status_codes) == []


def test_a_lone_hashed_destination_retries_without_the_previous_hosts_predicate() -> None:
    dr = {
        "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "r", "namespace": "default"},
        "spec": {"host": "r", "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}},
                 "subsets": [{"name": "b", "labels": {"v": "b"}}]},
    }  # fmt: skip
    http: list[dict[str, Any]] = [
        {"name": "lone", "match": [{"uri": {"prefix": "/lone"}}], "route": [DEST]},
        {"name": "explicit", "match": [{"uri": {"prefix": "/x"}}], "route": [DEST],
         "retries": {"attempts": 3, "retryIgnorePreviousHosts": True}},
        {"name": "split", "route": [{**DEST, "weight": 1}, {"destination": {"host": "r", "subset": "b"}, "weight": 1}]},
    ]  # fmt: skip
    mesh = build_mesh([parse_object(SE), parse_object(dr), parse_object(vs(*http))])
    rule = mesh.virtual_services["r.default.svc.cluster.local"]
    lone, explicit, split = virtual_service_routes(mesh, rule, 80)
    assert lone.route.hash_policy and not lone.route.retry_policy.retry_host_predicate  # stays on the hashed host
    assert lone.route.retry_policy.host_selection_retry_max_attempts == 5
    assert len(explicit.route.retry_policy.retry_host_predicate) == 1  # asked for explicitly
    assert len(split.route.retry_policy.retry_host_predicate) == 1  # Istio: only a lone destination counts


def test_retry_ignore_previous_hosts_false_drops_only_the_predicate() -> None:
    (route,) = routes({"route": [DEST], "retries": {"attempts": 1, "retryIgnorePreviousHosts": False}})
    assert not route.route.retry_policy.retry_host_predicate
    assert route.route.retry_policy.host_selection_retry_max_attempts == 5


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ((3, 1), {"a": 3, "b": 1}),
        ((1, 1), {"a": 1, "b": 1}),
        ((0, 7), None),
        ((2**31 - 1, 5), {"a": 2**31 - 1, "b": 5}),
    ],
)
def test_weights_are_relative_and_envoy_gets_them_as_given(
    weights: tuple[int, int], expected: dict[str, int] | None
) -> None:
    """Istio 1.15 on: 3 and 1 mean 75/25; Envoy sums the weights itself (no total_weight); a 0
    weight leaves its destination out, and a route left with one destination names its cluster."""
    route_spec = [{"destination": {"host": "r", "subset": s}, "weight": w} for s, w in zip("ab", weights, strict=True)]
    (route,) = routes({"route": route_spec})
    action = route.route
    assert not action.weighted_clusters.HasField("total_weight")
    got = {c.name.split("|")[2]: c.weight.value for c in action.weighted_clusters.clusters}
    if expected is None:
        assert not got and action.cluster == "outbound|80|b|r.default.svc.cluster.local"
    else:
        assert got == expected


def test_attempts_zero_disables_retries_and_codes_in_retry_on_become_status_codes() -> None:
    off, custom = routes(
        {"match": [{"uri": {"exact": "/off"}}], "route": [DEST], "retries": {"attempts": 0}},
        {"route": [DEST], "retries": {"attempts": 4, "retryOn": "gateway-error,502, 504", "perTryTimeout": "1s"}},
    )
    assert not off.route.HasField("retry_policy")
    policy = custom.route.retry_policy
    assert (policy.retry_on, list(policy.retriable_status_codes)) == (
        "gateway-error,retriable-status-codes",
        [502, 504],
    )
    assert (policy.num_retries.value, policy.per_try_timeout.ToMilliseconds()) == (4, 1000)
    assert parse_retry_on("unavailable,cancelled") == ("unavailable,cancelled", ())


def test_source_labels_and_namespace_select_the_sender() -> None:
    http = (
        {"name": "canary", "match": [{"sourceLabels": {"env": "canary"}}], "route": [DEST]},
        {"name": "shop", "match": [{"sourceNamespace": "shop"}], "route": [DEST]},
        {"name": "all", "route": [DEST]},
    )
    assert [r.name for r in routes(*http)] == ["all"]
    canary = RouteSource("default", {"env": "canary", "app": "x"})
    assert [r.name for r in routes(*http, source=canary)] == ["canary", "all"]
    assert [r.name for r in routes(*http, source=RouteSource("shop"))] == ["shop", "all"]


def test_fault_percentages_become_parts_per_million() -> None:
    fault = {"delay": {"fixedDelay": "2s", "percent": 7}, "abort": {"httpStatus": 418, "percentage": {"value": 0.5}}}
    (route,) = routes({"route": [DEST], "fault": fault})
    config = fault_pb2.HTTPFault()
    assert route.typed_per_filter_config[FAULT_FILTER].Unpack(config)
    assert (config.delay.fixed_delay.seconds, config.delay.percentage.numerator) == (2, 70_000)
    assert (config.abort.http_status, config.abort.percentage.numerator) == (418, 5_000)


def test_a_missing_delegate_costs_only_its_route() -> None:
    assert routes({"delegate": {"name": "child"}}) == []


def test_missing_delegate_and_dangling_l4_and_mirror_destinations_are_warned_about() -> None:
    doc = vs(
        {"delegate": {"name": "child"}},
        {"route": [DEST], "mirror": {"host": "ghost"}},
        tcp=[{"route": [{"destination": {"host": "r", "subset": "v9"}}]}],
    )
    mesh = build_mesh([parse_object(SE), parse_object(doc)])
    assert mesh.warnings == (
        "VirtualService default/r: http[0].delegate default/child: no delegate VirtualService (one without hosts) "
        "by that name; route left out",
        "VirtualService default/r: destination ghost.default.svc.cluster.local: no ServiceEntry defines this host",
        "VirtualService default/r: destination r.default.svc.cluster.local: "
        "subset 'v9' is not defined by a DestinationRule",
    )


def test_an_edit_checks_the_destinations_of_the_edited_virtual_service_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dangling destinations are checked per VirtualService and kept while the services and
    DestinationRules stay: an edit re-checks its own rule, not every rule of the mesh."""
    from pilot.model import build
    from pilot.model.conversions import Conversions

    checked: list[str] = []
    real = build._dangling_in

    def counting(rule: m.RoutingRule, *args: Any) -> list[str]:
        checked.append(rule.name)
        return real(rule, *args)

    monkeypatch.setattr(build, "_dangling_in", counting)

    def named(name: str, *http: dict[str, Any]) -> Any:
        doc = vs(*http)
        doc["metadata"]["name"], doc["spec"]["hosts"] = name, [f"{name}.example"]
        return parse_object(doc)

    entry, others = parse_object(SE), [named(f"r{i}", {"route": [DEST]}) for i in range(5)]
    memo = Conversions()
    first = build_mesh([entry, *others, named("edited", {"route": [DEST]})], conversions=memo)
    assert sorted(checked) == sorted([*(f"r{i}" for i in range(5)), "edited"]) and not first.warnings
    checked.clear()
    again = build_mesh([entry, *others, named("edited", {"route": [DEST], "mirror": {"host": "ghost"}})],
                       conversions=memo)
    assert checked == ["edited"]
    assert again.warnings == (
        "VirtualService default/edited: destination ghost.default.svc.cluster.local: no ServiceEntry defines this host",
    )
