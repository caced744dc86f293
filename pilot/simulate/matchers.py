"""Envoy's matchers on a request: strings, headers, query parameters, paths and domains (pure).

Semantics follow Envoy's `StringMatcher`, `HeaderMatcher` (a missing header matches only
`present_match: false`, or `present_match: true` inverted; repeated values are joined with ","),
`QueryParameterMatcher` (first value; absent never matches) and `RouteMatch` path specifiers
(`prefix`, `path`, `safe_regex` as an RE2 full match, `path_separated_prefix`), whose
`case_sensitive` (default true) applies to prefix and path only. Regexes are compiled by RE2 once
per pattern and cached for the process (bounded).
"""

from __future__ import annotations

import functools
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import re2  # type: ignore[import-untyped]

from pilot.simulate.request import Request, strip_port

Json = Mapping[str, Any]


@functools.lru_cache(maxsize=1024)
def _regex(pattern: str) -> Any:
    return re2.compile(pattern)


def regex_full_match(pattern: str, value: str) -> bool:
    return _regex(pattern).fullmatch(value) is not None


def string_match(matcher: Json, value: str) -> bool:
    """Envoy's StringMatcher (`exact`, `prefix`, `suffix`, `contains`, `safeRegex`; `ignoreCase`)."""
    if "safeRegex" in matcher:
        return regex_full_match(str(matcher["safeRegex"].get("regex", "")), value)
    fold = bool(matcher.get("ignoreCase"))
    got = value.lower() if fold else value
    for kind, test in (("exact", str.__eq__), ("prefix", str.startswith), ("suffix", str.endswith),
                       ("contains", str.__contains__)):
        if kind in matcher:
            want = str(matcher[kind])
            return bool(test(got, want.lower() if fold else want))
    return False


def header_match(matcher: Json, request: Request) -> bool:
    """One HeaderMatcher against the request (pseudo-headers included)."""
    value = request.header(str(matcher.get("name", "")))
    invert = bool(matcher.get("invertMatch"))
    if value is None and matcher.get("treatMissingHeaderAsEmpty"):
        value = ""
    if value is None:
        if "presentMatch" not in matcher:
            return False
        present = bool(matcher["presentMatch"])
        return present if invert else not present
    return _header_value_match(matcher, value) != invert


def _header_value_match(matcher: Json, value: str) -> bool:
    if "presentMatch" in matcher:
        return bool(matcher["presentMatch"])
    if "stringMatch" in matcher:
        return string_match(matcher["stringMatch"], value)
    legacy = {"exactMatch": "exact", "prefixMatch": "prefix", "suffixMatch": "suffix", "containsMatch": "contains"}
    for key, kind in legacy.items():
        if key in matcher:
            return string_match({kind: matcher[key]}, value)
    if "safeRegexMatch" in matcher:
        return regex_full_match(str(matcher["safeRegexMatch"].get("regex", "")), value)
    if "rangeMatch" in matcher:
        try:
            number = int(value)
        except ValueError:
            return False
        rng = matcher["rangeMatch"]
        return int(rng.get("start", 0)) <= number < int(rng.get("end", 0))
    return True  # no value matcher: presence is enough


def query_match(matcher: Json, request: Request) -> bool:
    """One QueryParameterMatcher: the parameter must be there; then `presentMatch` or `stringMatch`."""
    value = request.query.get(str(matcher.get("name", "")))
    if value is None:
        return False
    if "stringMatch" in matcher:
        return string_match(matcher["stringMatch"], value)
    return True


def path_match(match: Json, path: str) -> bool:
    """The path specifier of a RouteMatch against the path (query already removed)."""
    sensitive = match.get("caseSensitive", True) is not False
    folded = path if sensitive else path.lower()
    if "prefix" in match:
        want = str(match["prefix"])
        return folded.startswith(want if sensitive else want.lower())
    if "path" in match:
        want = str(match["path"])
        return folded == (want if sensitive else want.lower())
    if "pathSeparatedPrefix" in match:
        want = str(match["pathSeparatedPrefix"])
        want = want if sensitive else want.lower()
        return folded == want or folded.startswith(want + "/")
    if "safeRegex" in match:
        return regex_full_match(str(match["safeRegex"].get("regex", "")), path)
    return False


def route_match(match: Json, request: Request, path: str) -> bool:
    """A whole RouteMatch: path specifier, every header matcher, every query parameter matcher."""
    return (path_match(match, path)
            and all(header_match(h, request) for h in match.get("headers", ()))
            and all(query_match(q, request) for q in match.get("queryParameters", ())))


def normalize_path(path: str) -> str:
    """RFC 3986 dot-segment removal, as HCM `normalize_path` does before routing."""
    if not path.startswith("/"):
        return path
    clean = posixpath.normpath(path)
    clean = "/" + clean.lstrip("/")  # normpath keeps a leading "//"
    return clean + "/" if path.endswith("/") and clean != "/" else clean


def select_virtual_host(vhosts: Sequence[Json], authority: str, ignore_port: bool = False) -> Json | None:
    """Envoy's virtual host choice for a Host header.

    Exact domains first, then suffix wildcards (`*.example.com`, `*-svc.local`) longest first,
    then prefix wildcards (`api.*`) longest first, then `*`. Host names compare case-insensitively;
    a wildcard must cover at least one character. `ignore_port` strips the port first.
    """
    host = (strip_port(authority) if ignore_port else authority).lower()
    exact: dict[str, Json] = {}
    suffixes: list[tuple[str, Json]] = []
    prefixes: list[tuple[str, Json]] = []
    default: Json | None = None
    for vhost in vhosts:
        for domain in (str(d).lower() for d in vhost.get("domains", ())):
            if domain == "*":
                default = default if default is not None else vhost
            elif domain.startswith("*"):
                suffixes.append((domain[1:], vhost))
            elif domain.endswith("*"):
                prefixes.append((domain[:-1], vhost))
            else:
                exact.setdefault(domain, vhost)
    if host in exact:
        return exact[host]
    for suffix, vhost in sorted(suffixes, key=lambda kv: -len(kv[0])):
        if len(host) > len(suffix) and host.endswith(suffix):
            return vhost
    for prefix, vhost in sorted(prefixes, key=lambda kv: -len(kv[0])):
        if len(host) > len(prefix) and host.startswith(prefix):
            return vhost
    return default
