"""Envoy's own limits on values pilot copies from Istio documents, checked before they reach Envoy.

Istio's schema allows some values Envoy then refuses (its proto validation rules, `validate.rules`
in envoyproxy/envoy `api/`, and what its config loaders parse). One such value NACKs a whole
route configuration or cluster set on every proxy, so pilot refuses the object instead, naming
the field. The numbers are Envoy's (the rule each one comes from is named beside it); the
property test `tests/e2e/test_envoy_accepts_valid_istio.py` holds them to the real Envoy.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from pydantic import BaseModel
from pydantic.alias_generators import to_camel

from pilot.api.errors import FieldIssue

# `config.core.v3.HeaderValue`: key and value `max_bytes: 16384`.
MAX_HEADER_BYTES = 16384
# `config.route.v3.QueryParameterMatcher.name`: `max_bytes: 1024`.
MAX_QUERY_PARAMETER_NAME_BYTES = 1024
# `config.cluster.v3.Cluster.RingHashLbConfig.minimum_ring_size`: `lte: 8388608`.
MAX_RING_SIZE = 8388608
# `google.protobuf.UInt32Value` fields such as `TcpKeepalive.keepalive_time` (seconds).
MAX_UINT32 = 2**32 - 1
# Envoy refuses any Duration whose milliseconds overflow an int64 ("Duration out-of-range"):
# at most 9,223,372,036 seconds, about 292 years (measured with `envoy --mode validate`).
MAX_DURATION_SECONDS = 9_223_372_036

# An HTTP header name: an RFC 7230 token.
HEADER_NAME = re.compile(r"^[-_A-Za-z0-9!#$%&'*+.^`|~]+$")
# Istio's header value rule: no control characters but tab. It covers Envoy's
# `HTTP_HEADER_VALUE` rule (no NUL, CR, LF).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Envoy's `HTTP_HEADER_VALUE`/`HTTP_HEADER_NAME` rules in their non-strict form.
_LINE_BREAK = re.compile(r"[\x00\r\n]")

# Envoy reads a header value to add as a format string: `%%` is a literal `%`, and `%COMMAND%`,
# `%COMMAND(args)%` or `%COMMAND(args):N%` is replaced per request. An unknown COMMAND, or a lone
# `%`, fails the whole route configuration ("Not supported field in StreamInfo", "Couldn't find
# valid command"). These are the commands pilot lets through (Envoy's substitution formatter).
_OPERATOR = re.compile(r"%([A-Z][A-Z0-9_]*)(?:\(([^)]*)\))?(?::(\d+))?%")
COMMANDS_WITHOUT_ARGUMENTS = frozenset({
    "BYTES_RECEIVED", "BYTES_SENT", "CONNECTION_ID", "CONNECTION_TERMINATION_DETAILS",
    "DOWNSTREAM_DIRECT_REMOTE_ADDRESS", "DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT",
    "DOWNSTREAM_LOCAL_ADDRESS", "DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", "DOWNSTREAM_LOCAL_PORT",
    "DOWNSTREAM_LOCAL_SUBJECT", "DOWNSTREAM_LOCAL_URI_SAN", "DOWNSTREAM_PEER_CERT",
    "DOWNSTREAM_PEER_FINGERPRINT_256", "DOWNSTREAM_PEER_ISSUER", "DOWNSTREAM_PEER_SERIAL",
    "DOWNSTREAM_PEER_SUBJECT", "DOWNSTREAM_PEER_URI_SAN", "DOWNSTREAM_REMOTE_ADDRESS",
    "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", "DOWNSTREAM_REMOTE_PORT", "DOWNSTREAM_TLS_CIPHER",
    "DOWNSTREAM_TLS_SESSION_ID", "DOWNSTREAM_TLS_VERSION", "DURATION", "HOSTNAME", "PROTOCOL",
    "REQUESTED_SERVER_NAME", "RESPONSE_CODE", "RESPONSE_CODE_DETAILS", "RESPONSE_FLAGS", "ROUTE_NAME",
    "UPSTREAM_CLUSTER", "UPSTREAM_HOST", "UPSTREAM_LOCAL_ADDRESS", "UPSTREAM_REMOTE_ADDRESS",
    "UPSTREAM_TRANSPORT_FAILURE_REASON",
})  # fmt: skip
# Commands that need an argument: a header name, a variable, a metadata or state key.
COMMANDS_WITH_ARGUMENTS = frozenset({"REQ", "RESP", "TRAILER", "ENVIRONMENT", "DYNAMIC_METADATA", "FILTER_STATE"})
# START_TIME takes an optional strftime-like format.
COMMANDS_OPTIONAL_ARGUMENTS = frozenset({"START_TIME"})


def header_value_problem(value: str) -> str | None:
    """Why Envoy (or Istio) would refuse ``value`` as a header value to set or add, or None."""
    if _CONTROL.search(value):
        return "must not contain control characters (other than tab)"
    if len(value.encode()) > MAX_HEADER_BYTES:
        return f"is {len(value.encode())} bytes; Envoy takes header values of at most {MAX_HEADER_BYTES}"
    return _format_problem(value)


def _format_problem(value: str) -> str | None:
    pos = 0
    while (start := value.find("%", pos)) != -1:
        if value.startswith("%%", start):
            pos = start + 2
            continue
        match = _OPERATOR.match(value, start)
        if match is None:
            return (
                f"{value!r}: a lone '%' at position {start}; write '%%' for a literal '%' "
                "or %COMMAND% for an Envoy variable such as %DOWNSTREAM_REMOTE_ADDRESS%"
            )
        if why := _command_problem(match.group(1), match.group(2)):
            return f"{value!r}: {why}"
        pos = match.end()
    return None


def _command_problem(command: str, argument: str | None) -> str | None:
    if command in COMMANDS_WITHOUT_ARGUMENTS:
        return None if argument is None else f"%{command}% takes no argument"
    if command in COMMANDS_WITH_ARGUMENTS:
        return None if argument else f"%{command}(...)% needs an argument"
    if command in COMMANDS_OPTIONAL_ARGUMENTS:
        return None
    return f"%{command}% is not an Envoy variable pilot knows (such as %DOWNSTREAM_REMOTE_ADDRESS%, %REQ(name)%)"


def header_name_problem(name: str) -> str | None:
    """Envoy's limit on a header name beyond the token syntax checked by the API models."""
    if len(name.encode()) > MAX_HEADER_BYTES:
        return f"is {len(name.encode())} bytes; Envoy takes header names of at most {MAX_HEADER_BYTES}"
    return None


def line_break_problems(path: str, model: BaseModel, fields: tuple[str, ...]) -> Iterator[FieldIssue]:
    """Envoy's rule for paths, authorities and rewrites it puts into headers: no NUL, CR or LF."""
    for name in fields:
        value = getattr(model, name)
        if isinstance(value, str) and _LINE_BREAK.search(value):
            yield FieldIssue(f"{path}.{to_camel(name)}", f"{value!r} must not contain NUL, CR or LF characters")
