"""Whatever pilot accepts, Envoy accepts (issue 8, point 2): a property test against the real Envoy.

Hypothesis writes random Istio documents (VirtualServices with matches, regexes, header edits,
retries, timeouts, faults, mirrors, rewrites, redirects, CORS; DestinationRules with subsets and
traffic policies), mostly valid and sometimes at the edges Istio's schema allows (long names,
odd characters, large numbers, and values Envoy refuses, which pilot must refuse too). Pilot parses
each one; those it accepts go through build_mesh -> generate for a sidecar and for the ingress
gateway, and each result is folded into one static bootstrap that `envoy --mode validate` must
accept (a translation that raises fails the test too). Validate mode runs Envoy's own proto
rules and compiles every regex, route and filter config as an ADS push would, so a failure here
is a NACK a user would see. One example batches several services (one Envoy run per proxy), and
the example count is small: the whole file runs in well under a minute.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshctl.envoy import find_envoy
from pilot.api import ApiError, ApiObject, parse_object
from pilot.api.envoy_limits import COMMANDS_OPTIONAL_ARGUMENTS, COMMANDS_WITH_ARGUMENTS, COMMANDS_WITHOUT_ARGUMENTS
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate
from tests.golden.test_envoy_accepts import static_bootstrap

pytestmark = pytest.mark.e2e

NAMESPACE = "default"
SUBSETS = ("v1", "v2", "canary")
TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_!#$&'*+.^`|~"
# Printable ASCII and a few non-ASCII characters, plus tab: what a header value may hold.
VALUE_CHARS = st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs"), exclude_characters="%")
PATH_CHARS = st.characters(codec="utf-8", categories=("L", "N", "P", "S"), exclude_characters="%")


def _doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": kind,
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def _host(i: int) -> str:
    return f"svc{i}.{NAMESPACE}.svc.cluster.local"


def _service(i: int) -> dict[str, Any]:
    return _doc("ServiceEntry", f"svc{i}", {
        "hosts": [_host(i)], "location": "MESH_INTERNAL", "resolution": "STATIC",
        "ports": [{"number": 80, "name": "http", "protocol": "HTTP"},
                  {"number": 9090, "name": "grpc", "protocol": "GRPC"}],
        "workloadSelector": {"labels": {"app": f"svc{i}"}},
    })


header_names = st.one_of(
    st.sampled_from(["x-user", "X-Request-Id", "end-user", "cookie", "user-agent", "x-b3-traceid"]),
    st.text(TOKEN, min_size=1, max_size=30),
    st.text(TOKEN, min_size=200, max_size=400),
)
header_values = st.one_of(
    st.sampled_from(["", "jason", "a b", "v1", "%%", "100%%", "%HOSTNAME%", "%DOWNSTREAM_REMOTE_ADDRESS%",
                     "%REQ(x-user)%", "%START_TIME(%s)%", "tab\tin", "%ENVIRONMENT(HOME)%"]),
    st.text(VALUE_CHARS, max_size=40),
    st.text(VALUE_CHARS, max_size=40),
    st.text(VALUE_CHARS, min_size=500, max_size=2000),
    st.sampled_from(["%UNKNOWN%", "50%", "a%b", "x\ny", "\x7f", "%REQ()%", "%HOSTNAME(x)%"]),  # refused
)
# Mostly regexes Envoy takes; a few it refuses (pilot must refuse them too).
_good_regexes = st.one_of(
    st.sampled_from([".*", "^/api/v[0-9]+/.*", "/a{20}", "(?i)jason", "[a-z]+", "\\d{3}", "a|b|c",
                     "(?P<id>[0-9]+)", "/\\Q.*\\E", "\\bword\\b", "é+", "[^/]*", "^$", "(a)(b)?"]),
    st.builds(lambda n: f"/a{{{n}}}", st.integers(0, 120)),
)
_odd_regexes = st.sampled_from(["/a{1001}", "(?=x)", "(a)\\1", "[", "a{97}", ""]) | st.text(
    "ab.*+?|()[]{}^$\\-09,", min_size=1, max_size=8)
regexes = st.one_of(*[_good_regexes] * 9, _odd_regexes)
paths = st.one_of(
    st.sampled_from(["/", "/api", "/api/v1/", "/ratings", "/a b", "/ü"]),
    st.builds(lambda s: "/" + s, st.text(PATH_CHARS, max_size=30)),
    st.text(PATH_CHARS, max_size=10),
)


def _string_match(values: st.SearchStrategy[str], allow_empty: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    options = [
        st.builds(lambda v: {"exact": v}, values),
        st.builds(lambda v: {"prefix": v}, values),
        st.builds(lambda r: {"regex": r}, regexes),
    ]
    if allow_empty:
        options.append(st.just({}))
    return st.one_of(*options)


durations = st.one_of(
    st.sampled_from(["1ms", "250ms", "1s", "10s", "1.5s", "1m30s", "1h", "0.001s", "100000h", "2562047h"]),
    st.builds(lambda n: f"{n}ms", st.integers(1, 10**9)),
    st.builds(lambda n: f"{n}ms", st.integers(1, 10**9)),
    st.sampled_from(["2562048h", "87660000h", "0.0005s"]),  # refused: over Envoy's limit, under 1ms
)
percentages = st.builds(lambda v: {"value": v}, st.one_of(
    st.sampled_from([0.0, 0.00001, 0.0001, 0.5, 50.0, 99.9999, 100.0]), st.floats(0, 100, allow_nan=False)))


@st.composite
def http_matches(draw: st.DrawFn) -> dict[str, Any]:
    match: dict[str, Any] = {}
    if draw(st.booleans()):
        match["uri"] = draw(st.one_of(
            st.builds(lambda v: {"exact": v}, paths), st.builds(lambda v: {"prefix": v}, paths),
            st.builds(lambda r: {"regex": r}, regexes)))
    if draw(st.booleans()):
        match["headers"] = draw(st.dictionaries(header_names, _string_match(header_values, True), max_size=3))
    if draw(st.integers(0, 3)) == 0:
        match["withoutHeaders"] = draw(st.dictionaries(header_names, _string_match(header_values, True), max_size=2))
    if draw(st.integers(0, 3)) == 0:
        match["queryParams"] = draw(st.dictionaries(
            st.text(TOKEN, min_size=1, max_size=10),
            st.one_of(st.builds(lambda v: {"exact": v}, header_values), st.builds(lambda r: {"regex": r}, regexes),
                      st.just({})),
            max_size=2))
    if draw(st.integers(0, 3)) == 0:
        match["method"] = draw(_string_match(st.sampled_from(["GET", "POST", "get"])))
    if draw(st.integers(0, 3)) == 0:
        match["authority"] = draw(_string_match(st.sampled_from(["example.com", "a:80", "*"])))
    if draw(st.integers(0, 4)) == 0:
        match["scheme"] = draw(_string_match(st.sampled_from(["http", "https"])))
    if draw(st.integers(0, 3)) == 0:
        match["ignoreUriCase"] = True
    if draw(st.integers(0, 3)) == 0:
        match["port"] = draw(st.sampled_from([80, 9090]))
    if draw(st.integers(0, 3)) == 0:
        match["name"] = draw(st.text(TOKEN + " /:", min_size=1, max_size=40))
    return match


def _header_ops() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={
        "set": st.dictionaries(header_names, header_values, max_size=3),
        "add": st.dictionaries(header_names, header_values, max_size=2),
        "remove": st.lists(header_names, max_size=2),
    })


headers = st.fixed_dictionaries({}, optional={"request": _header_ops(), "response": _header_ops()})


def _destination(i: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"host": st.just(_host(i))}, optional={
        "subset": st.sampled_from(SUBSETS), "port": st.builds(lambda n: {"number": n}, st.sampled_from([80, 9090]))})


@st.composite
def route_destinations(draw: st.DrawFn, i: int) -> list[dict[str, Any]]:
    count = draw(st.integers(1, 3))
    dests: list[dict[str, Any]] = [{"destination": draw(_destination(i))} for _ in range(count)]
    if count > 1:  # weights adding up to 100, valid before and after Istio's normalisation
        cuts = sorted(draw(st.lists(st.integers(0, 100), min_size=count - 1, max_size=count - 1)))
        for d, lo, hi in zip(dests, [0, *cuts], [*cuts, 100], strict=True):
            d["weight"] = hi - lo
    for d in dests:
        if draw(st.integers(0, 3)) == 0:
            d["headers"] = draw(headers)
    return dests


retries = st.fixed_dictionaries({"attempts": st.integers(0, 10)}, optional={
    "perTryTimeout": durations,
    "retryOn": st.lists(st.sampled_from(["5xx", "gateway-error", "connect-failure", "retriable-4xx", "reset",
                                         "503", "404", "retriable-status-codes", "cancelled", "unavailable"]),
                        min_size=1, max_size=4).map(",".join),
    "retryRemoteLocalities": st.booleans(),
})
faults = st.one_of(
    st.fixed_dictionaries({"delay": st.fixed_dictionaries({"fixedDelay": durations},
                                                          optional={"percentage": percentages})}),
    st.fixed_dictionaries({"abort": st.fixed_dictionaries(
        {}, optional={"percentage": percentages}).flatmap(lambda a: st.one_of(
            st.builds(lambda s: {**a, "httpStatus": s}, st.integers(200, 599)),
            st.builds(lambda g: {**a, "grpcStatus": g}, st.sampled_from(["UNAVAILABLE", "NOT_FOUND", "OK"])))),
    }),
)
cors = st.fixed_dictionaries({}, optional={
    "allowOrigins": st.lists(_string_match(st.sampled_from(["https://a.com", "*", "http://x:8080"])), max_size=2),
    "allowMethods": st.lists(st.sampled_from(["GET", "POST", "OPTIONS"]), max_size=3),
    "allowHeaders": st.lists(header_names, max_size=2),
    "exposeHeaders": st.lists(header_names, max_size=2),
    "maxAge": st.sampled_from(["1s", "24h", "86400s"]),
    "allowCredentials": st.booleans(),
    "unmatchedPreflights": st.sampled_from(["FORWARD", "IGNORE"]),
})


@st.composite
def http_routes(draw: st.DrawFn, i: int) -> dict[str, Any]:
    route: dict[str, Any] = {}
    if draw(st.booleans()):
        route["match"] = draw(st.lists(http_matches(), min_size=1, max_size=3))
    if draw(st.integers(0, 3)) == 0:
        route["name"] = draw(st.text(TOKEN + " /:", min_size=1, max_size=40))
    action = draw(st.integers(0, 9))
    if action == 0:
        route["redirect"] = draw(st.fixed_dictionaries({}, optional={
            "uri": paths, "authority": st.sampled_from(["a.example.com", "b:8080"]),
            "redirectCode": st.sampled_from([301, 302, 307, 308]), "scheme": st.sampled_from(["https", "http"])}))
    elif action == 1:
        route["directResponse"] = draw(st.fixed_dictionaries({"status": st.integers(200, 599)}, optional={
            "body": st.one_of(st.builds(lambda s: {"string": s}, st.text(VALUE_CHARS, max_size=5000)),
                              st.builds(lambda b: {"bytes": base64.b64encode(b).decode()}, st.binary(max_size=6000)))}))
    else:
        route["route"] = draw(route_destinations(i))
        if draw(st.booleans()):
            route["timeout"] = draw(durations)
        if draw(st.booleans()):
            route["retries"] = draw(retries)
        if draw(st.integers(0, 2)) == 0:
            route["rewrite"] = draw(st.one_of(
                st.fixed_dictionaries({}, optional={"uri": paths, "authority": st.sampled_from(["a.com", "b:81"])}),
                st.fixed_dictionaries({"uriRegexRewrite": st.fixed_dictionaries(
                    {"match": regexes, "rewrite": st.sampled_from(["/", "/v2/\\1", "\\2"])})})))
        mirroring = draw(st.integers(0, 5))
        if mirroring == 0:
            route["mirror"] = draw(_destination(i))
            if draw(st.booleans()):
                route["mirrorPercentage"] = draw(percentages)
        elif mirroring == 1:
            route["mirrors"] = draw(st.lists(st.fixed_dictionaries(
                {"destination": _destination(i)}, optional={"percentage": percentages}), min_size=1, max_size=3))
    if draw(st.integers(0, 2)) == 0:
        route["fault"] = draw(faults)
    if draw(st.integers(0, 2)) == 0:
        route["headers"] = draw(headers)
    if draw(st.integers(0, 3)) == 0:
        route["corsPolicy"] = draw(cors)
    return route


big_ints = st.one_of(st.integers(0, 100), st.just(2**31 - 1), st.integers(0, 2**31 - 1))
connection_pool = st.fixed_dictionaries({}, optional={
    "tcp": st.fixed_dictionaries({}, optional={
        "maxConnections": big_ints, "connectTimeout": durations, "idleTimeout": durations,
        "maxConnectionDuration": durations,
        "tcpKeepalive": st.fixed_dictionaries({}, optional={
            "probes": big_ints, "time": durations, "interval": durations})}),
    "http": st.fixed_dictionaries({}, optional={
        "http1MaxPendingRequests": big_ints, "http2MaxRequests": big_ints, "maxRequestsPerConnection": big_ints,
        "maxRetries": big_ints, "idleTimeout": durations, "maxConcurrentStreams": big_ints,
        "h2UpgradePolicy": st.sampled_from(["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"])}),
}).filter(bool)
load_balancer = st.one_of(
    st.fixed_dictionaries({"simple": st.sampled_from(["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM", "PASSTHROUGH",
                                                      "LEAST_CONN"])}),
    st.fixed_dictionaries({"consistentHash": st.one_of(
        st.fixed_dictionaries({"httpHeaderName": header_names}),
        st.fixed_dictionaries({"httpCookie": st.fixed_dictionaries(
            {"name": st.text(TOKEN, min_size=1, max_size=20)}, optional={"ttl": durations, "path": paths})}),
        st.fixed_dictionaries({"useSourceIp": st.just(True)}),
        st.fixed_dictionaries({"httpQueryParameterName": st.text(TOKEN, min_size=1, max_size=20)}),
    ).flatmap(lambda h: st.one_of(
        st.just(h),
        st.builds(lambda n: {**h, "ringHash": {"minimumRingSize": n}}, st.one_of(big_ints, st.just(8388608))),
        st.builds(lambda n: {**h, "maglev": {"tableSize": n}}, st.sampled_from([65537, 5000011 - 2, 7, 131]))))}),
)
outlier = st.fixed_dictionaries({}, optional={
    "consecutive5xxErrors": big_ints, "consecutiveGatewayErrors": big_ints, "interval": durations,
    "consecutiveLocalOriginFailures": big_ints, "splitExternalLocalOriginErrors": st.just(True),
    "baseEjectionTime": durations, "maxEjectionPercent": st.integers(0, 100), "minHealthPercent": st.integers(0, 100),
})
CERTS = Path(__file__).resolve().parents[1] / "golden" / "cases" / "dr-tls" / "certs"
tls = st.one_of(
    st.fixed_dictionaries({"mode": st.sampled_from(["DISABLE", "SIMPLE"])}, optional={
        "sni": st.sampled_from(["a.example.com", "svc"]),
        "subjectAltNames": st.lists(st.sampled_from(["a.com", "spiffe://x/y"]), max_size=2),
        "caCertificates": st.just(str(CERTS / "ca.pem")),
        "insecureSkipVerify": st.booleans(),
    }),
    st.fixed_dictionaries({"mode": st.just("MUTUAL"), "clientCertificate": st.just(str(CERTS / "client.pem")),
                           "privateKey": st.just(str(CERTS / "client-key.pem"))}, optional={
        "sni": st.sampled_from(["a.example.com", "svc"]),
        "subjectAltNames": st.lists(st.sampled_from(["a.com", "spiffe://x/y"]), max_size=2),
        "caCertificates": st.just(str(CERTS / "ca.pem")),
    }),
)
traffic_policy = st.fixed_dictionaries({}, optional={
    "loadBalancer": load_balancer, "connectionPool": connection_pool, "outlierDetection": outlier, "tls": tls,
}).filter(bool)


GATEWAY = _doc("Gateway", "gw", {"selector": {"istio": "ingressgateway"}, "servers": [
    {"port": {"number": 8080, "name": "http", "protocol": "HTTP"}, "hosts": ["*/*"]}]})


@st.composite
def bundles(draw: st.DrawFn, i: int) -> list[dict[str, Any]]:
    """A service, a VirtualService for it (for sidecars, the ingress gateway or both) and
    (usually) a DestinationRule with subsets."""
    spec = {"hosts": [_host(i)], "http": draw(st.lists(http_routes(i), min_size=1, max_size=4))}
    spec["gateways"] = draw(st.sampled_from([["mesh"], ["gw"], ["mesh", "gw"]]))
    vs = _doc("VirtualService", f"svc{i}", spec)
    docs = [_service(i), vs]
    if draw(st.integers(0, 4)):
        subsets = [{"name": s, "labels": {"version": s}} for s in SUBSETS]
        for subset in subsets:
            if draw(st.integers(0, 3)) == 0:
                subset["trafficPolicy"] = draw(traffic_policy)
        dr: dict[str, Any] = {"host": _host(i), "subsets": subsets}
        if draw(st.booleans()):
            dr["trafficPolicy"] = draw(traffic_policy)
            if draw(st.booleans()):
                dr["trafficPolicy"]["portLevelSettings"] = [
                    {"port": {"number": port}, **draw(traffic_policy)} for port in draw(
                        st.lists(st.sampled_from([80, 9090]), unique=True, min_size=1))]
        docs.append(_doc("DestinationRule", f"svc{i}", dr))
    return docs


@st.composite
def meshes(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(1, 6))
    return [GATEWAY, *(doc for i in range(count) for doc in draw(bundles(i)))]


def accepted(docs: list[dict[str, Any]]) -> list[ApiObject]:
    """The documents pilot accepts (a rejected one is pilot saying no, not a NACK)."""
    out = []
    for doc in docs:
        try:
            out.append(parse_object(doc))
        except ApiError:
            continue
    return out


def as_pushed(bootstrap: Any) -> Any:
    """Route configs as an RDS push checks them: a route to a cluster that does not exist (a subset
    no DestinationRule defines) is a 503 at request time, not a NACK (`validate_clusters` is off
    for RDS; on for static routes, where validate mode would refuse it)."""
    for listener in bootstrap.static_resources.listeners:
        for flt in (f for chain in listener.filter_chains for f in chain.filters):
            hcm = hcm_pb2.HttpConnectionManager()
            if flt.typed_config.Unpack(hcm) and hcm.HasField("route_config"):
                hcm.route_config.validate_clusters.value = False
                flt.typed_config.Pack(hcm)
    return bootstrap


SIDECAR = ProxyClass(ProxyKind.SIDECAR, NAMESPACE, labels=(("app", "client"),), workload="client")
INGRESS = ProxyClass(ProxyKind.ROUTER, NAMESPACE, labels=(("istio", "ingressgateway"),), workload="ingress")


def envoy_validate(
    objects: list[ApiObject], workdir: Path, proxy: ProxyClass = SIDECAR
) -> subprocess.CompletedProcess[str]:
    mesh = build_mesh(objects)
    path = workdir / "envoy.json"
    path.write_text(json_format.MessageToJson(as_pushed(static_bootstrap(generate(mesh, proxy)))))
    return subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                           "--log-level", "error"],
                          capture_output=True, text=True, timeout=60, check=False)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.data_too_large])
@given(docs=meshes())
def test_envoy_accepts_whatever_pilot_accepts(tmp_path: Path, docs: list[dict[str, Any]]) -> None:
    objects = accepted(docs)
    for proxy in (SIDECAR, INGRESS):
        result = envoy_validate(objects, tmp_path, proxy)
        assert result.returncode == 0, f"{proxy.describe()}: " + (result.stdout + result.stderr)[-3000:]


def _validate_json(text: str, workdir: Path) -> bool:
    path = workdir / "envoy.json"
    path.write_text(text)
    result = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                             "--log-level", "error"], capture_output=True, text=True, timeout=60, check=False)
    return result.returncode == 0


PLACEHOLDER = "placeholder-regex"


def _bootstrap_with_regex(regex: str) -> str:
    """A sidecar's config whose one route matches `regex` (set after pilot, so pilot cannot refuse it)."""
    docs = [_service(0), _doc("VirtualService", "svc0", {"hosts": [_host(0)], "http": [
        {"match": [{"uri": {"regex": PLACEHOLDER}}], "route": [{"destination": {"host": _host(0)}}]}]})]
    mesh = build_mesh([parse_object(d) for d in docs])
    text = json_format.MessageToJson(as_pushed(static_bootstrap(generate(mesh, SIDECAR))))
    assert PLACEHOLDER in text
    return text.replace(json.dumps(PLACEHOLDER), json.dumps(regex))


# The issue's `/a{1001}`, RE2's other refusals, the program-size limit the bootstrap sets (32768,
# as Istio's) on both sides of it (`\pL{1000}` x4 + `\pL{680}` compiles to 32764, + `\pL{684}` to
# 32792), regexes both engines take, and Unicode, where Envoy's sizes and errors are RE2's with
# Latin-1 encoding (`\pL` 11, not 1200; `\x{100}` an error).
AGREEMENT = ["/a{1001}", "/a{1000}", "a{96}", "a{97}", "\\pL{1000}" * 4 + "\\pL{680}",
             "\\pL{1000}" * 4 + "\\pL{684}", "(?=x)", "(a)\\1", "a++", "\\Z", "[", "",
             "^/api/v[0-9]+/.*", "(?i)jason", "(?P<id>[0-9]+)", "(?<id>[0-9]+)", "\\C", "é+", "[[:alpha:]]+",
             "\\pL", "\\pN{30}", "\\x{100}", "(?i)straße", "[^/]+" * 16, "[^/]+" * 17]


@pytest.mark.parametrize("regex", AGREEMENT)
def test_pilot_refuses_exactly_the_regexes_envoy_refuses(tmp_path: Path, regex: str) -> None:
    envoy_accepts = _validate_json(_bootstrap_with_regex(regex), tmp_path)
    vs = _doc("VirtualService", "r", {"hosts": [_host(0)], "http": [
        {"match": [{"uri": {"regex": regex}}], "route": [{"destination": {"host": _host(0)}}]}]})
    try:
        parse_object(vs)
        pilot_accepts = True
    except ApiError:
        pilot_accepts = False
    assert pilot_accepts == envoy_accepts, f"pilot {'accepts' if pilot_accepts else 'refuses'} {regex!r}"


def test_every_header_variable_pilot_accepts_is_one_envoy_knows(tmp_path: Path) -> None:
    """The Envoy variables pilot lets through in header values (`envoy_limits`) all load, in one run."""
    values = [f"%{c}%" for c in sorted(COMMANDS_WITHOUT_ARGUMENTS)]
    values += [f"%{c}(x-user)%" for c in sorted(COMMANDS_WITH_ARGUMENTS)]
    values += [f"%{c}%" for c in sorted(COMMANDS_OPTIONAL_ARGUMENTS)]
    values += ["%START_TIME(%s)%", "%REQ(x-user):10%", "100%% of %HOSTNAME%"]
    headers = {f"x-v{i}": v for i, v in enumerate(values)}
    docs = [_service(0), _doc("VirtualService", "svc0", {"hosts": [_host(0)], "http": [
        {"route": [{"destination": {"host": _host(0)}}], "headers": {"request": {"set": headers}}}]})]
    result = envoy_validate([parse_object(d) for d in docs], tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
