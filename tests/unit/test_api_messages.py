"""Schema errors read as Istio's validation words them, not as pydantic's Python types (issue 8, point 7).

The issue's row: a string where a list is expected said "spec.hosts: Input should be a valid tuple".
"""

from __future__ import annotations

from typing import Any

import pytest

from pilot.api import InvalidObjectError, parse_object


def doc(kind: str, spec: Any, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": kind,
            "metadata": {"name": "r", "namespace": "default", **meta}, "spec": spec}


def issues(document: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidObjectError) as info:
        parse_object(document)
    text = str(info.value)
    assert "Input should" not in text and "valid tuple" not in text and "dictionary" not in text, text
    return {i.path: i.message for i in info.value.issues}


def test_the_issue_row_a_string_where_a_list_is_expected() -> None:
    got = issues(doc("VirtualService", {"hosts": "reviews"}))
    assert got == {"spec.hosts": "must be a list, not the string 'reviews'"}
    with pytest.raises(InvalidObjectError) as info:
        parse_object(doc("VirtualService", {"hosts": "reviews"}))
    assert str(info.value) == "VirtualService default/r: spec.hosts: must be a list, not the string 'reviews'"


@pytest.mark.parametrize(
    ("kind", "spec", "path", "message"),
    [
        ("VirtualService", {"hosts": ["r"], "http": {"route": []}}, "spec.http", "must be a list, not a map"),
        ("VirtualService", {"hosts": ["r"], "http": ["x"]}, "spec.http[0]",
         "must be a map of fields, not the string 'x'"),
        ("VirtualService", {"hosts": [5]}, "spec.hosts[0]", "must be a string, not the number 5"),
        ("VirtualService", {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}, "weight": "50"}]}]},
         "spec.http[0].route[0].weight", "must be an integer, not the string '50'"),
        ("VirtualService", {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}],
                                                      "retries": {"attempts": 1.5}}]},
         "spec.http[0].retries.attempts", "must be an integer, not the number 1.5"),
        ("VirtualService", {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}],
                                                      "fault": {"abort": {"httpStatus": 503,
                                                                          "percentage": {"value": "x"}}}}]},
         "spec.http[0].fault.abort.percentage.value", "must be a number, not the string 'x'"),
        ("VirtualService", {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}],
                                                      "headers": {"request": {"set": ["a"]}}}]},
         "spec.http[0].headers.request.set", "must be a map, not a list"),
        ("VirtualService", {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}],
                                                      "corsPolicy": {"allowCredentials": "maybe"}}]},
         "spec.http[0].corsPolicy.allowCredentials", "must be true or false, not the string 'maybe'"),
        ("DestinationRule", {"host": "r", "trafficPolicy": {"loadBalancer": {"simple": "FASTEST"}}},
         "spec.trafficPolicy.loadBalancer.simple",
         "must be one of 'UNSPECIFIED', 'LEAST_CONN', 'RANDOM', 'PASSTHROUGH', 'ROUND_ROBIN', 'LEAST_REQUEST', "
         "not 'FASTEST'"),
        ("DestinationRule", {"host": "r", "subsets": None}, "spec.subsets", "must be a list, not null"),
        ("DestinationRule", {}, "spec.host", "required"),
        ("ServiceEntry", {"hosts": ["a.com"], "ports": [{"number": 80, "name": ""}]}, "spec.ports[0].name",
         "must not be empty"),
        ("ServiceEntry", {"hosts": ["a.com"], "ports": [{"number": True, "name": "http"}]}, "spec.ports[0].number",
         "must be an integer, not true"),
    ],
)
def test_pydantic_errors_name_what_the_field_must_be(kind: str, spec: Any, path: str, message: str) -> None:
    assert issues(doc(kind, spec))[path] == message


def test_metadata_errors_use_the_same_words() -> None:
    got = issues(doc("VirtualService", {"hosts": ["r"]}, labels={"app": 1}))
    assert got == {"metadata.labels.app": "must be a string, not the number 1"}


def test_long_values_are_shortened_in_messages() -> None:
    message = issues(doc("VirtualService", {"hosts": "x" * 200}))["spec.hosts"]
    assert message.startswith("must be a list, not the string 'xxx") and message.endswith("...'")
    assert len(message) < 80


def test_our_own_rule_errors_pass_through_unchanged() -> None:
    got = issues(doc("VirtualService", {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}],
                                                                  "timeout": 3}]}))
    assert got == {"spec.http[0].timeout": "must be a duration string such as '10s' or '250ms'"}


@pytest.mark.parametrize("code", ["\u00b2", "\u0665\u0660\u0663"])
def test_a_retry_status_code_of_non_ascii_digits_is_an_error_not_a_crash(code: str) -> None:
    """`str.isdigit()` holds for superscripts (which `int()` refuses) and for other scripts' digits
    (which `int()` reads): neither is a status code Envoy accepts."""
    spec = {"hosts": ["r"], "http": [{"route": [{"destination": {"host": "r"}}],
                                      "retries": {"attempts": 2, "retryOn": f"5xx,{code}"}}]}
    assert issues(doc("VirtualService", spec)) == {
        "spec.http[0].retries.retryOn": f"{code!r} is not a retry condition or an HTTP status code"}
