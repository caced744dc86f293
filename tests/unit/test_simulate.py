"""`pilot.simulate` on crafted resources: Envoy's matching rules, step by step, and on generated config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from meshctl.simulate import experimental, render_text
from pilot.config import load_file
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.simulate import Request, RequestError, Resources, parse_request, simulate
from pilot.simulate.listeners import select_chain
from pilot.simulate.matchers import header_match, normalize_path, path_match, select_virtual_host
from pilot.translate import generate
from tests.golden.test_golden import read_proxies

HCM = "envoy.filters.network.http_connection_manager"
CASES = Path(__file__).parent.parent / "golden" / "cases"


def _listener(name: str, address: str, port: int, hcm: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "address": {"socketAddress": {"address": address, "portValue": port}},
            "filterChains": [{"filters": [{"name": HCM, "typedConfig": hcm}]}], **extra}


def _resources(routes: list[dict[str, Any]], domains: tuple[str, ...] = ("web", "web:8080"),
               http_filters: list[dict[str, Any]] | None = None) -> Resources:
    hcm = {"rds": {"routeConfigName": "outbound"}, "httpFilters": http_filters or [], "normalizePath": True}
    return Resources(
        listeners=(_listener("127.0.0.10_15001", "127.0.0.10", 15001, hcm),),
        routes={"outbound": {"name": "outbound", "virtualHosts": [
            {"name": "web", "domains": list(domains), "routes": routes},
            {"name": "allow_any", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "name": "allow_any",
                                                                  "route": {"cluster": "PassthroughCluster"}}]},
        ]}},
        clusters={"web-v1": {"name": "web-v1", "type": "EDS", "edsClusterConfig": {"serviceName": "web-v1"}},
                  "web-v2": {"name": "web-v2", "type": "EDS", "edsClusterConfig": {"serviceName": "web-v2"}},
                  "empty": {"name": "empty", "type": "EDS"}},
        endpoints={f"web-{v}": {"clusterName": f"web-{v}", "endpoints": [{"lbEndpoints": [
            {"endpoint": {"address": {"socketAddress": {"address": f"127.0.0.{10 + i}", "portValue": 9000}}}}]}]}
            for i, v in enumerate(("v1", "v2"), start=1)},
    )


def _to(cluster: str, name: str, match: dict[str, Any], **route: Any) -> dict[str, Any]:
    return {"name": name, "match": match, "route": {"cluster": cluster, **route}}


def _route_of(res: Resources, url: str, *headers: str, method: str = "GET") -> str | None:
    return simulate(res, parse_request(url, headers, method)).route


def test_path_specifiers_prefix_exact_regex_separated_and_case() -> None:
    assert path_match({"prefix": "/api"}, "/apiary")
    assert not path_match({"prefix": "/api"}, "/API")
    assert path_match({"prefix": "/api", "caseSensitive": False}, "/API/x")
    assert path_match({"path": "/exact"}, "/exact") and not path_match({"path": "/exact"}, "/exact/")
    assert path_match({"safeRegex": {"regex": "/items/[0-9]+"}}, "/items/42")
    assert not path_match({"safeRegex": {"regex": "/items/[0-9]+"}}, "/items/42x")  # full match, not search
    assert not path_match({"safeRegex": {"regex": "/img/.*"}, "caseSensitive": False}, "/IMG/a")  # regex ignores it
    sep = {"pathSeparatedPrefix": "/api"}
    assert path_match(sep, "/api") and path_match(sep, "/api/v1") and not path_match(sep, "/apiary")


def test_first_matching_route_wins_and_query_is_not_part_of_the_path() -> None:
    res = _resources([
        _to("web-v1", "exact", {"path": "/exact"}),
        _to("web-v1", "api", {"prefix": "/api"}),
        _to("web-v2", "api-v2", {"prefix": "/api/v2"}),  # shadowed by /api
        _to("web-v2", "item", {"safeRegex": {"regex": "/items/[0-9]+"}}),
        _to("web-v1", "fallback", {"prefix": "/"}),
    ])
    assert _route_of(res, "http://web:8080/exact?x=1") == "exact"
    assert _route_of(res, "http://web:8080/api/v2/x") == "api"
    assert _route_of(res, "http://web:8080/items/7?page=2") == "item"
    assert _route_of(res, "http://web:8080/items/../exact") == "exact"  # normalize_path first
    assert _route_of(res, "http://web:8080/EXACT") == "fallback"


def test_header_matchers_present_invert_missing_and_string() -> None:
    req = parse_request("http://web/", ["x-tier: gold-plus", "x-id: 123", "x-id: 456"])
    assert header_match({"name": "x-tier", "stringMatch": {"prefix": "gold"}}, req)
    assert header_match({"name": "x-id", "stringMatch": {"exact": "123,456"}}, req)  # values joined
    assert header_match({"name": "x-tier", "presentMatch": True}, req)
    assert not header_match({"name": "x-nope", "stringMatch": {"exact": ""}}, req)
    assert header_match({"name": "x-nope", "stringMatch": {"exact": ""}, "treatMissingHeaderAsEmpty": True}, req)
    # A missing header: only "present: false" matches; inverted, only "present: true".
    assert header_match({"name": "x-nope", "presentMatch": False}, req)
    assert header_match({"name": "x-nope", "presentMatch": True, "invertMatch": True}, req)
    assert not header_match({"name": "x-nope", "stringMatch": {"prefix": "a"}, "invertMatch": True}, req)
    assert header_match({"name": "x-tier", "stringMatch": {"prefix": "silver"}, "invertMatch": True}, req)
    assert header_match({"name": ":method", "stringMatch": {"exact": "GET"}}, req)
    assert header_match({"name": "x-tier", "stringMatch": {"exact": "GOLD-PLUS", "ignoreCase": True}}, req)
    assert header_match({"name": "x-id", "rangeMatch": {"start": "100", "end": "200"}},
                        parse_request("http://web/", ["x-id: 150"]))


def test_query_parameters_and_methods_in_routes() -> None:
    res = _resources([
        _to("web-v1", "user", {"prefix": "/", "queryParameters": [{"name": "user",
                                                                   "stringMatch": {"exact": "jason"}}]}),
        _to("web-v1", "debug", {"prefix": "/", "queryParameters": [{"name": "debug", "presentMatch": True}]}),
        _to("web-v1", "post", {"prefix": "/", "headers": [{"name": ":method", "stringMatch": {"exact": "POST"}}]}),
        _to("web-v2", "fallback", {"prefix": "/"}),
    ])
    assert _route_of(res, "http://web:8080/?a=1&user=jason") == "user"
    assert _route_of(res, "http://web:8080/?user=Jason") == "fallback"
    assert _route_of(res, "http://web:8080/?debug") == "debug"
    assert _route_of(res, "http://web:8080/", method="post") == "post"


def test_virtual_host_domains_exact_suffix_prefix_default_and_port() -> None:
    vhosts = [{"name": "star", "domains": ["*"]}, {"name": "short", "domains": ["*.com"]},
              {"name": "long", "domains": ["*.example.com"]}, {"name": "prefix", "domains": ["api.*"]},
              {"name": "exact", "domains": ["www.example.com", "web:8080"]}]

    def pick(host: str, ignore_port: bool = False) -> str | None:
        found = select_virtual_host(vhosts, host, ignore_port)
        return None if found is None else str(found["name"])

    assert pick("WWW.example.com") == "exact"
    assert pick("shop.example.com") == "long"  # longest suffix first
    assert pick("other.com") == "short"
    assert pick(".example.com") == "short"  # a wildcard covers at least one character
    assert pick("api.internal") == "prefix"  # suffix wildcards before prefix wildcards
    assert pick("web:8080") == "exact" and pick("web") == "star"
    assert pick("www.example.com:80") == "star"  # the port is part of the host: no domain covers it...
    assert pick("www.example.com:80", ignore_port=True) == "exact"  # ...unless ignore_port_in_host_matching
    assert select_virtual_host(vhosts[1:], "nothing.local") is None


def test_actions_weighted_redirect_direct_response_and_404() -> None:
    res = _resources([
        {"name": "split", "match": {"prefix": "/split"}, "route": {"weightedClusters": {"clusters": [
            {"name": "web-v1", "weight": 0}, {"name": "web-v2", "weight": 100}]}}},
        {"name": "moved", "match": {"prefix": "/old"}, "redirect": {"pathRedirect": "/new",
                                                                    "responseCode": "PERMANENT_REDIRECT"}},
        {"name": "teapot", "match": {"path": "/tea"}, "directResponse": {"status": 418,
                                                                         "body": {"inlineString": "short"}}},
        _to("empty", "empty", {"path": "/empty"}),
        _to("missing", "missing", {"path": "/missing"}),
    ])
    split = simulate(res, parse_request("http://web:8080/split"))
    assert [(b.cluster, b.percent, b.endpoints) for b in split.backends] == [
        ("web-v1", 0.0, ["127.0.0.11:9000 (weight 1)"]), ("web-v2", 100.0, ["127.0.0.12:9000 (weight 1)"])]
    assert split.timeout == "15s"  # Envoy's default route timeout
    moved = simulate(res, parse_request("http://web:8080/old?q=1"))
    assert (moved.outcome, moved.status, moved.redirect) == ("redirect", 308, "http://web:8080/new?q=1")
    tea = simulate(res, parse_request("http://web:8080/tea"))
    assert (tea.outcome, tea.status, tea.body, tea.matched) == ("direct_response", 418, "short", True)
    nothing = simulate(res, parse_request("http://web:8080/none"))
    assert (nothing.outcome, nothing.status, nothing.matched) == ("not_found", 404, False)
    assert simulate(res, parse_request("http://web:8080/empty")).status == 503  # no endpoints
    assert simulate(res, parse_request("http://web:8080/missing")).outcome == "no_cluster"


def test_fault_retry_mirror_and_jwt_on_the_route() -> None:
    fault = {"envoy.filters.http.fault": {"abort": {"httpStatus": 503, "percentage": {
        "numerator": 1000000, "denominator": "MILLION"}}}}
    jwt = {"name": "envoy.filters.http.jwt_authn", "typedConfig": {
        "providers": {"p": {"issuer": "i", "fromHeaders": [{"name": "x-jwt"}]}},
        "rules": [{"match": {"prefix": "/secure"}, "requires": {"providerName": "p"}}]}}
    res = _resources([
        {"name": "chaos", "match": {"prefix": "/chaos"}, "route": {"cluster": "web-v1"}, "typedPerFilterConfig": fault},
        {"name": "secure", "match": {"prefix": "/secure"}, "route": {"cluster": "web-v1"}},
        _to("web-v1", "flaky", {"prefix": "/"}, timeout="2s", retryPolicy={"numRetries": 3, "retryOn": "5xx"},
            requestMirrorPolicies=[{"cluster": "web-v2", "runtimeFraction": {"defaultValue": {"numerator": 50}}}]),
    ], http_filters=[jwt, {"name": "envoy.filters.http.fault"}, {"name": "envoy.filters.http.router"}])
    chaos = simulate(res, parse_request("http://web:8080/chaos"))
    assert (chaos.outcome, chaos.status, chaos.matched) == ("fault_abort", 503, True)
    flaky = simulate(res, parse_request("http://web:8080/x"))
    assert flaky.retry == {"attempts": 3, "on": "5xx", "per_try_timeout": None}
    assert (flaky.timeout, flaky.mirrors) == ("2s", ["web-v2 (50%)"])
    assert simulate(res, parse_request("http://web:8080/secure")).outcome == "unauthenticated"
    assert simulate(res, parse_request("http://web:8080/secure", ["x-jwt: a.b.c"])).outcome == "routed"


def _rbac(action: str, permissions: list[dict[str, Any]], principals: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "envoy.filters.http.rbac", "typedConfig": {"rules": {"action": action, "policies": {
        "p": {"permissions": permissions, "principals": principals}}}}}


def test_rbac_deny_allow_and_unknown() -> None:
    admin = [{"urlPath": {"path": {"prefix": "/admin"}}}]
    web_sa = [{"authenticated": {"principalName": {"exact": "spiffe://cluster.local/ns/default/sa/web"}}}]
    jwt_claim = [{"metadata": {"filter": "envoy.filters.http.jwt_authn"}}]
    res = _resources([_to("web-v1", "all", {"prefix": "/"})],
                     http_filters=[_rbac("DENY", admin, [{"any": True}]), _rbac("ALLOW", [{"any": True}], web_sa),
                                   _rbac("LOG", [{"any": True}], jwt_claim)])
    denied = simulate(res, parse_request("http://web:8080/admin/x", source_principal="spiffe://cluster.local/ns/default/sa/web"))
    assert (denied.outcome, denied.status, denied.rbac[0].outcome) == ("denied", 403, "deny")
    assert simulate(res, parse_request("http://web:8080/x")).outcome == "denied"  # no principal: ALLOW misses
    ok = simulate(res, parse_request("http://web:8080/x", source_principal="spiffe://cluster.local/ns/default/sa/web"))
    assert ok.outcome == "routed" and [d.outcome for d in ok.rbac] == ["allow", "allow", "allow"]
    unknown = _resources([_to("web-v1", "all", {"prefix": "/"})],
                         http_filters=[_rbac("DENY", [{"any": True}], jwt_claim)])
    maybe = simulate(unknown, parse_request("http://web:8080/"))
    assert maybe.outcome == "routed" and maybe.rbac[0].outcome == "unknown" and maybe.notes


def test_listener_choice_direct_captured_and_local_outbound() -> None:
    hcm = {"routeConfig": {"name": "inbound|8080", "virtualHosts": [{"name": "in", "domains": ["*"], "routes": [
        _to("inbound|8080||", "default", {"prefix": "/"})]}]}}
    tcp = {"name": "envoy.filters.network.tcp_proxy", "typedConfig": {"cluster": "PassthroughCluster"}}
    res = Resources(listeners=(
        _listener("0.0.0.0_9080", "0.0.0.0", 9080, hcm, bindToPort=False),
        _listener("10.0.0.5_8080", "10.0.0.5", 8080, hcm),
        {"name": "virtualOutbound", "useOriginalDst": True,
         "address": {"socketAddress": {"address": "0.0.0.0", "portValue": 15001}},
         "filterChains": [{"name": "catchall", "filters": [tcp]}]},
    ))
    assert simulate(res, parse_request("http://10.0.0.5:8080/")).entry == "direct"
    assert simulate(res, parse_request("http://10.96.0.1:9080/")).listener == "0.0.0.0_9080"
    passthrough = simulate(res, parse_request("http://10.96.0.1:5432/"))
    assert (passthrough.listener, passthrough.outcome) == ("virtualOutbound", "tcp")
    assert simulate(Resources(), parse_request("http://web/")).outcome == "no_listener"


def test_filter_chain_stages_most_specific_wins() -> None:
    chains: list[dict[str, Any]] = [{"filterChainMatch": {}}, {"filterChainMatch": {"destinationPort": 9080}},
              {"filterChainMatch": {"destinationPort": 9080, "transportProtocol": "tls"}},
              {"filterChainMatch": {"prefixRanges": [{"addressPrefix": "10.0.0.0", "prefixLen": 8}]}},
              {"filterChainMatch": {"prefixRanges": [{"addressPrefix": "10.1.0.0", "prefixLen": 16}]}}]
    assert select_chain(chains, parse_request("http://10.0.0.1:9080/"), 9080) == 1
    assert select_chain(chains, parse_request("https://10.0.0.1:9080/"), 9080) == 2
    assert select_chain(chains, parse_request("http://10.1.2.3:80/"), 80) == 4
    assert select_chain(chains, parse_request("http://192.168.0.1:80/"), 80) == 0


def test_parse_request_errors_name_the_input() -> None:
    with pytest.raises(RequestError, match="ftp://x"):
        parse_request("ftp://x/")
    with pytest.raises(RequestError, match="'nocolon'"):
        parse_request("http://web/", ["nocolon"])
    req = parse_request("https://web/a?b=c", ["Host: other:8443", "X-A: 1"])
    assert req == Request(scheme="https", authority="other:8443", path="/a?b=c", port=443, headers=(("x-a", "1"),))
    assert normalize_path("/a/./b/../c/") == "/a/c/"


def test_generated_canary_config_and_the_text_form() -> None:
    """Pilot's own output for the canary example: the 80/20 split to real endpoints."""
    case = CASES / "canary"
    mesh = build_mesh(load_file(case / "input.yaml", display_name="input.yaml").objects)
    proxy = ProxyClass(kind=ProxyKind.SIDECAR, namespace="default", workload="frontend", bind_address="127.0.0.10")
    res = Resources.from_messages(generate(mesh, proxy))
    trace = simulate(res, parse_request("http://reviews:9080/"))
    assert (trace.listener, trace.virtual_host) == ("127.0.0.10_15001", "reviews.default.svc.cluster.local:9080")
    assert [(b.cluster, b.percent) for b in trace.backends] == [
        ("outbound|9080|v1|reviews.default.svc.cluster.local", 80.0),
        ("outbound|9080|v2|reviews.default.svc.cluster.local", 20.0)]
    text = render_text(trace)
    assert "80% outbound|9080|v1|reviews.default.svc.cluster.local: 127.0.0.11:9081 (weight 1)" in text
    assert "Outcome:" in text and "routed" in text


def test_cli_bad_header_is_a_usage_error() -> None:
    result = CliRunner().invoke(experimental, ["simulate", "frontend", "http://web/", "-H", "bad"])
    assert result.exit_code == 2 and "'bad'" in result.output


def test_a_client_principal_means_mutual_tls_on_a_permissive_inbound_listener() -> None:
    """Pilot's security-mtls case: web's PERMISSIVE port has an mTLS chain and a plaintext one."""
    case = CASES / "security-mtls"
    mesh = build_mesh(load_file(case / "input.yaml", display_name="input.yaml").objects)
    res = Resources.from_messages(generate(mesh, read_proxies(case)["web"]))
    plain = simulate(res, parse_request("http://127.0.5.3:8000/"))
    peer = simulate(res, parse_request("http://127.0.5.3:8000/", source_principal="spiffe://cluster.local/ns/a/sa/x"))
    assert (plain.listener, plain.entry) == ("127.0.5.3_8000", "direct")
    assert (plain.filter_chain, peer.filter_chain) == ("#1", "#0")


def test_captured_pods_original_destination_virtual_outbound_and_inbound() -> None:
    """Pilot's captured case (Kubernetes listener model): 15001 hands off by original destination."""
    case = CASES / "captured"
    mesh = build_mesh(load_file(case / "input.yaml", display_name="input.yaml").objects)
    proxies = read_proxies(case)
    client = Resources.from_messages(generate(mesh, proxies["client"]))

    def where(res: Resources, url: str, **kw: Any) -> tuple[str | None, str | None, str | None, str]:
        trace = simulate(res, parse_request(url, **kw))
        return trace.listener, trace.entry, trace.virtual_host, trace.outcome

    assert where(client, "http://10.96.0.10:9080/") == (
        "0.0.0.0_9080", "original-destination", "reviews.default.svc.cluster.local:9080", "routed")
    by_name = where(client, "http://reviews:9080/", destination_ip="10.96.0.10")
    assert by_name[2] == "reviews.default.svc.cluster.local:9080"
    assert where(client, "http://10.96.0.20:27017/") == ("10.96.0.20_27017", "original-destination", None, "tcp")
    assert where(client, "http://10.9.9.9:7777/") == ("virtualOutbound", "virtual-outbound", None, "tcp")
    server = Resources.from_messages(generate(mesh, proxies["reviews-v1"]))
    inbound = simulate(server, parse_request("http://10.1.0.5:9080/", inbound=True))
    assert (inbound.listener, inbound.filter_chain, inbound.backends[0].cluster) == (
        "virtualInbound", "0.0.0.0_9080", "inbound|9080||")
