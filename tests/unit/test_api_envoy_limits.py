"""Pilot refuses what Envoy would NACK: RE2 regexes, header values, lengths, durations, ring sizes.

Each case is a value Istio's schema lets through and Envoy refuses (found by the property test in
`tests/e2e/test_envoy_accepts_valid_istio.py`, which holds these checks to the real Envoy); the
error names the object, the field and the reason.
"""

from __future__ import annotations

from typing import Any

import pytest

from pilot.api import InvalidObjectError, parse_object
from pilot.api.envoy_limits import MAX_DURATION_SECONDS, MAX_HEADER_BYTES, header_value_problem
from pilot.api.route_common import regex_problem
from pilot.runtime_limits import ENVOY_RE2_MAX_PROGRAM_SIZE

DEST = {"destination": {"host": "reviews"}}


def vs(route: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "r", "namespace": "default"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [DEST], **route}]}}


def dr(policy: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "r", "namespace": "default"},
            "spec": {"host": "reviews", "trafficPolicy": policy}}


def issues(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidObjectError) as info:
        parse_object(doc)
    assert str(info.value).startswith(f"{doc['kind']} default/r: ")
    return {i.path: i.message for i in info.value.issues}


# --- regexes: RE2 itself, with Envoy's program-size limit


def test_the_issue_regex_is_refused_with_re2s_reason() -> None:
    got = issues(vs({"match": [{"uri": {"regex": "/a{1001}"}}]}))
    assert "invalid repetition size" in got["spec.http[0].match[0].uri.regex"]


@pytest.mark.parametrize("regex", ["(?=x)", "(?!x)", "(?<=x)", "(a)\\1", "a++", "\\Z", "[", "(", "a{2,1}"])
def test_what_re2_does_not_support_is_refused(regex: str) -> None:
    why = regex_problem(regex)
    assert why is not None and why.startswith(repr(regex)) and "RE2" in why


@pytest.mark.parametrize("regex", ["^/api/v[0-9]+/.*", "(?i)jason", "(?P<id>\\d+)", "(?<id>\\d+)", "[[:alpha:]]+",
                                   "é+", "a{96}", "\\pL"])
def test_what_re2_supports_within_the_size_limit_is_accepted(regex: str) -> None:
    assert regex_problem(regex) is None


def test_program_size_limit_is_the_one_istios_bootstrap_sets() -> None:
    assert ENVOY_RE2_MAX_PROGRAM_SIZE == 32768
    assert regex_problem("a{97}") is None  # over Envoy's default of 100, within Istio's limit
    assert regex_problem("\\pL{1000}" * 4 + "\\pL{680}") is None  # program size 32764
    why = regex_problem("\\pL{1000}" * 4 + "\\pL{684}")  # program size 32792
    assert why is not None and "size 32792" in why and "over 32768" in why


def test_an_empty_or_overlong_regex_is_refused() -> None:
    assert regex_problem("") == "must not be empty"
    assert "at most 1024" in (regex_problem("a" * 1025) or "")


@pytest.mark.parametrize(
    ("route", "path"),
    [
        ({"match": [{"headers": {"x-user": {"regex": "(?=x)"}}}]}, "spec.http[0].match[0].headers.x-user.regex"),
        ({"match": [{"withoutHeaders": {"x-user": {"regex": "["}}}]},
         "spec.http[0].match[0].withoutHeaders.x-user.regex"),
        ({"match": [{"queryParams": {"q": {"regex": "a++"}}}]}, "spec.http[0].match[0].queryParams.q.regex"),
        ({"match": [{"method": {"regex": "\\pL{1000}" * 4 + "\\pL{684}"}}]}, "spec.http[0].match[0].method.regex"),
        ({"match": [{"authority": {"regex": "/a{1001}"}}]}, "spec.http[0].match[0].authority.regex"),
        ({"rewrite": {"uriRegexRewrite": {"match": "(?=x)", "rewrite": "/"}}},
         "spec.http[0].rewrite.uriRegexRewrite.match"),
        ({"corsPolicy": {"allowOrigins": [{"regex": "\\Z"}]}}, "spec.http[0].corsPolicy.allowOrigins[0].regex"),
    ],
)
def test_every_regex_field_is_checked_by_re2(route: dict[str, Any], path: str) -> None:
    assert path in issues(vs(route))


def test_istio_catch_all_header_regex_stays_accepted() -> None:
    parse_object(vs({"match": [{"headers": {"x-user": {"regex": "*"}}}]}))


# --- headers: Envoy's HeaderValue rules and its format strings


@pytest.mark.parametrize("value", ["jason", "", "a b\tc", "100%%", "%HOSTNAME%", "%REQ(x-user)%", "%START_TIME(%s)%",
                                   "%ENVIRONMENT(HOME):10%", "pre %DOWNSTREAM_REMOTE_ADDRESS% post"])
def test_header_values_envoy_takes_are_accepted(value: str) -> None:
    assert header_value_problem(value) is None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("a\nb", "control characters"),
        ("a\x00b", "control characters"),
        ("\x7f", "control characters"),
        ("50%", "lone '%' at position 2"),
        ("a%b", "lone '%' at position 1"),
        ("%%%", "lone '%' at position 2"),
        ("%UNKNOWN%", "%UNKNOWN% is not an Envoy variable"),
        ("%HOSTNAME(x)%", "takes no argument"),
        ("%REQ()%", "needs an argument"),
        ("x" * (MAX_HEADER_BYTES + 1), f"at most {MAX_HEADER_BYTES}"),
    ],
)
def test_header_values_envoy_refuses_are_refused(value: str, reason: str) -> None:
    assert reason in (header_value_problem(value) or "")


def test_header_value_errors_name_the_header() -> None:
    got = issues(vs({"headers": {"request": {"set": {"x-a": "50%"}}, "response": {"add": {"x-b": "a\nb"}}}}))
    assert "lone '%'" in got["spec.http[0].headers.request.set.x-a"]
    assert "control characters" in got["spec.http[0].headers.response.add.x-b"]


def test_a_header_name_over_envoys_limit_is_refused() -> None:
    name = "x" * (MAX_HEADER_BYTES + 1)
    got = issues(vs({"headers": {"request": {"remove": [name]}}}))
    assert f"at most {MAX_HEADER_BYTES}" in got["spec.http[0].headers.request.remove"]


def test_a_query_parameter_name_over_envoys_limit_is_refused() -> None:
    got = issues(vs({"match": [{"queryParams": {"q" * 1025: {"exact": "1"}}}]}))
    assert "at most 1024 bytes" in got["spec.http[0].match[0].queryParams"]


@pytest.mark.parametrize("field", ["headers", "withoutHeaders"])
def test_an_empty_header_prefix_is_refused(field: str) -> None:
    got = issues(vs({"match": [{field: {"x-user": {"prefix": ""}}}]}))
    assert "Envoy refuses an empty prefix" in got[f"spec.http[0].match[0].{field}.x-user.prefix"]


def test_an_empty_prefix_is_refused_for_pseudo_headers_and_cors_but_not_for_the_uri() -> None:
    got = issues(vs({"match": [{"method": {"prefix": ""}}], "corsPolicy": {"allowOrigins": [{"prefix": ""}]}}))
    assert set(got) == {"spec.http[0].match[0].method.prefix", "spec.http[0].corsPolicy.allowOrigins[0].prefix"}
    parse_object(vs({"match": [{"uri": {"prefix": ""}}]}))


@pytest.mark.parametrize(
    ("route", "path"),
    [
        ({"rewrite": {"uri": "/a\nb"}}, "spec.http[0].rewrite.uri"),
        ({"rewrite": {"authority": "a\rb"}}, "spec.http[0].rewrite.authority"),
        ({"rewrite": {"uriRegexRewrite": {"match": "^/a", "rewrite": "/\n"}}},
         "spec.http[0].rewrite.uriRegexRewrite.rewrite"),
    ],
)
def test_line_breaks_in_rewrites_are_refused(route: dict[str, Any], path: str) -> None:
    assert "NUL, CR or LF" in issues(vs(route))[path]


def test_line_breaks_in_redirects_are_refused() -> None:
    doc = vs({})
    doc["spec"]["http"][0] = {"redirect": {"uri": "/x\n", "authority": "a\x00"}}
    got = issues(doc)
    assert {"spec.http[0].redirect.uri", "spec.http[0].redirect.authority"} <= set(got)


# --- durations, ring sizes, TLS


def test_a_duration_past_envoys_limit_is_refused_and_one_at_it_accepted() -> None:
    got = issues(vs({"timeout": "2562048h"}))
    assert "longer than Envoy's longest duration" in got["spec.http[0].timeout"]
    parse_object(vs({"timeout": f"{MAX_DURATION_SECONDS}s"}))


def test_a_ring_size_over_envoys_limit_is_refused() -> None:
    got = issues(dr({"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user",
                                                         "ringHash": {"minimumRingSize": 8388609}}}}))
    assert got == {"spec.trafficPolicy.loadBalancer.consistentHash.ringHash.minimumRingSize":
                   "must be at most 8388608 (Envoy's limit)"}
    parse_object(dr({"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user",
                                                         "ringHash": {"minimumRingSize": 8388608}}}}))


def test_a_hash_header_name_must_be_a_header_name() -> None:
    got = issues(dr({"loadBalancer": {"consistentHash": {"httpHeaderName": "x user"}}}))
    assert "not a valid HTTP header name" in got["spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName"]


def test_subject_alt_names_need_a_ca_envoy_can_load() -> None:
    got = issues(dr({"tls": {"mode": "SIMPLE", "subjectAltNames": ["a.example.com"]}}))
    assert "needs caCertificates" in got["spec.trafficPolicy.tls.subjectAltNames"]
    parse_object(dr({"tls": {"mode": "SIMPLE", "subjectAltNames": ["a.example.com"], "caCertificates": "/ca.pem"}}))


def test_a_keepalive_over_envoys_32_bit_seconds_is_refused() -> None:
    """Found by the property test: pilot's translation overflowed Envoy's UInt32 keepalive_time."""
    got = issues(dr({"connectionPool": {"tcp": {"tcpKeepalive": {"time": "2562047h", "interval": "4294967295s"}}}}))
    assert got == {"spec.trafficPolicy.connectionPool.tcp.tcpKeepalive.time":
                   "must be at most 4294967295s (Envoy keeps it as 32-bit seconds)"}
