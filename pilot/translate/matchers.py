"""Istio StringMatch -> Envoy StringMatcher, shared by route matches, CORS origins and more."""

from __future__ import annotations

from typing import Any

from envoy.type.matcher.v3 import regex_pb2, string_pb2

from pilot.model import mesh as m


def string_matcher(match: m.StringMatch, ignore_case: bool = False) -> Any:
    if match.kind == "exact":
        return string_pb2.StringMatcher(exact=match.value, ignore_case=ignore_case)
    if match.kind == "prefix":
        return string_pb2.StringMatcher(prefix=match.value, ignore_case=ignore_case)
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=match.value))
