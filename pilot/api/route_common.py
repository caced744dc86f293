"""Message types shared by VirtualService HTTP, TCP and TLS routes: matches, destinations, weights.

Validation follows Istio's and Envoy's: a regex must compile in RE2 (Envoy's engine) within
Envoy's program-size limit, a percentage is a float in [0, 100], and weights are relative
(several destinations need a total above 0).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Annotated, Any, Protocol

import re2  # type: ignore[import-untyped]
from pydantic import AfterValidator, Field

from pilot.api.base import FloatPercent, Host, IstioModel, NonNegative, one_of, rule_error
from pilot.api.common import PortSelector
from pilot.api.errors import FieldIssue
from pilot.runtime_limits import ENVOY_RE2_MAX_PROGRAM_SIZE

FULL_WEIGHT = 100
MIN_DURATION = timedelta(milliseconds=1)
# Istio's webhook refuses a regex of more bytes than this (it stands in for RE2's program size there).
MAX_REGEX_LENGTH = 1024


def _re2_options() -> Any:
    """RE2 options under which a regex compiles as it does in Envoy.

    Envoy compiles with `RE2::Quiet`; measured against Envoy 1.40 (`envoy --mode validate` with the
    program-size threshold at 0 reports each size), its programs and errors are those of RE2 with
    Latin-1 encoding over the regex's UTF-8 bytes: `.` is 6 there (12 as UTF-8), `\\pL` 11 (1200),
    and `\\x{100}` is an invalid escape. The e2e test
    `test_pilot_refuses_exactly_the_regexes_envoy_refuses` keeps the two in step.
    """
    options = re2.Options()
    options.log_errors = False  # we report the error ourselves
    options.encoding = re2.Options.Encoding.LATIN1
    return options


_RE2_OPTIONS = _re2_options()


def regex_problem(value: str) -> str | None:
    """Why Envoy would refuse ``value`` as a regex, or None if it compiles there.

    The check is the real engine: RE2 (PyPI ``google-re2``), compiled with Envoy's options and
    held to Envoy's program-size limit, so whatever passes here Envoy accepts, and a bad regex is
    refused with this message instead of NACKing the whole route configuration of every proxy.
    Cost: one RE2 compilation per regex per parse (microseconds for the sizes allowed).
    """
    if not value:
        return "must not be empty"
    if len(value.encode()) > MAX_REGEX_LENGTH:
        return f"is {len(value.encode())} bytes long; a regex may be at most {MAX_REGEX_LENGTH}"
    try:
        size = int(re2.compile(value.encode(), _RE2_OPTIONS).programsize)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return f"{value!r} is not a valid regex for RE2 (Envoy's engine): {reason}"
    if size > ENVOY_RE2_MAX_PROGRAM_SIZE:
        return (
            f"{value!r} compiles to an RE2 program of size {size}; Envoy refuses regexes over "
            f"{ENVOY_RE2_MAX_PROGRAM_SIZE} (simplify it, e.g. fewer or smaller repetitions)"
        )
    return None


def duration_problem(path: str, value: timedelta | None) -> Iterator[FieldIssue]:
    """Istio's rule for every duration field: at least 1ms when set."""
    if value is not None and value < MIN_DURATION:
        yield FieldIssue(path, "must be at least 1ms")


class Percentage(IstioModel):
    """Istio's ``Percent``: a float in [0, 100]."""

    value: FloatPercent = 0.0


class StringMatch(IstioModel):
    """exact / prefix / regex; empty means "present" where Istio allows that (headers, query params)."""

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @property
    def empty(self) -> bool:
        return self.exact is None and self.prefix is None and self.regex is None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        # Empty is legal here (presence); where it is not, the enclosing model says so.
        yield from one_of(self, path, ("exact", "prefix", "regex"), "a string match", required=not self.empty)
        if self.regex is not None and (why := regex_problem(self.regex)):
            yield FieldIssue(f"{path}.regex", why)


# Istio's spelling of "any value" in a header match: `regex: "*"` means the header is present
# (it is not a valid RE2 regex; Istio turns it into a presence match).
CATCH_ALL_REGEX = "*"


# Envoy's `StringMatcher.prefix` (and a header matcher's) has `min_len: 1`: an empty prefix NACKs.
EMPTY_PREFIX = "must not be empty (Envoy refuses an empty prefix; an empty match {} matches any value)"


class HeaderStringMatch(StringMatch):
    """A header's match: a StringMatch that also takes Istio's catch-all ``regex: "*"``."""

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if self.regex == CATCH_ALL_REGEX and self.exact is None and self.prefix is None:
            return
        yield from super().problems(path)
        if self.prefix == "":
            yield FieldIssue(f"{path}.prefix", EMPTY_PREFIX)


class Destination(IstioModel):
    host: Host
    subset: str | None = None
    port: PortSelector | None = None


class RouteDestination(IstioModel):
    """A weighted L4 destination (tcp and tls routes)."""

    destination: Destination
    weight: NonNegative | None = None  # relative to the route's other destinations (Istio 1.15)


def _check_subnet(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise rule_error(f"{value!r} is not an IP address or CIDR block") from exc
    return value


Subnet = Annotated[str, AfterValidator(_check_subnet)]
LabelMap = Annotated[dict[str, str], Field(default_factory=dict)]


class _Weighted(Protocol):
    @property
    def weight(self) -> int | None: ...


# Envoy sums a route's weights into a uint32 and refuses a route whose sum is larger.
MAX_TOTAL_WEIGHT = 2**32 - 1


def weight_problems(path: str, destinations: Sequence[_Weighted]) -> Iterator[FieldIssue]:
    """Istio's rule (1.15 on): weights are relative, each >= 0 (a field check), and several
    destinations need a total above 0; 3 and 1 mean 75% and 25%. Envoy adds that the total
    must fit in 32 bits. A lone destination takes all traffic whatever its weight says."""
    if len(destinations) > 1:
        total = sum(d.weight or 0 for d in destinations)
        if total == 0:
            yield FieldIssue(path, "total destination weight = 0: several destinations need a weight above 0")
        elif total > MAX_TOTAL_WEIGHT:
            yield FieldIssue(path, f"total destination weight {total} exceeds Envoy's limit {MAX_TOTAL_WEIGHT}")
