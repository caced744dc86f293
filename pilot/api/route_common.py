"""Message types shared by VirtualService HTTP, TCP and TLS routes: matches, destinations, weights.

Validation follows Istio's: a regex must be RE2 (Envoy's engine), a percentage is a float in
[0, 100], and several weighted destinations must add up to 100.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Annotated, Protocol

from pydantic import AfterValidator, Field

from pilot.api.base import FloatPercent, Host, IstioModel, Percent, one_of, rule_error
from pilot.api.common import PortSelector
from pilot.api.errors import FieldIssue

FULL_WEIGHT = 100
MIN_DURATION = timedelta(milliseconds=1)
# Python's `re` accepts these; RE2 (Envoy) rejects them, and one bad regex NACKs a whole RDS.
_NOT_RE2 = re.compile(r"\(\?[=!]|\(\?<[=!]|\\[1-9]|\(\?P=|[*+?}]\+")


def regex_problem(value: str) -> str | None:
    """Why ``value`` is not a regex Envoy's RE2 engine accepts, or None."""
    if _NOT_RE2.search(value):
        return f"{value!r} uses lookaround, backreferences or possessive quantifiers, which RE2 does not support"
    try:
        re.compile(value)
    except re.error as exc:
        return f"{value!r} is not a valid regex: {exc}"
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


class HeaderStringMatch(StringMatch):
    """A header's match: a StringMatch that also takes Istio's catch-all ``regex: "*"``."""

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if self.regex == CATCH_ALL_REGEX and self.exact is None and self.prefix is None:
            return
        yield from super().problems(path)


class Destination(IstioModel):
    host: Host
    subset: str | None = None
    port: PortSelector | None = None


class RouteDestination(IstioModel):
    """A weighted L4 destination (tcp and tls routes)."""

    destination: Destination
    weight: Percent | None = None


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


def weight_problems(path: str, destinations: Sequence[_Weighted]) -> Iterator[FieldIssue]:
    """Several destinations must carry weights adding up to 100; a lone one may omit its weight."""
    if len(destinations) > 1:
        total = sum(d.weight or 0 for d in destinations)
        if total != FULL_WEIGHT:
            yield FieldIssue(path, f"weights of several destinations must add up to 100, not {total}")
