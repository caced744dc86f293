"""When one HTTP match admits every request another admits (so the later one never applies).

Conservative on purpose: `covers` answers True only when it can prove it from the fields alone
(equal conditions, a prefix of a prefix or of an exact path, fewer conditions); regexes are
compared only for equality. A False may still be a shadowed match; a True never is a false alarm.
"""

from __future__ import annotations

from collections.abc import Mapping

from pilot.api.route_common import StringMatch
from pilot.api.virtual_service import HTTPMatchRequest

# Fields compared for equality: an earlier match that sets one covers a later one only if the
# later one sets the same value.
_EQUAL_FIELDS = ("scheme", "method", "authority", "port", "source_namespace")


def string_covers(a: StringMatch | None, b: StringMatch | None) -> bool:
    """Whether condition `a` holds for every value condition `b` admits (None: no condition)."""
    if a is None:
        return True
    if b is None:
        return False
    if a.prefix is not None:
        later = b.prefix if b.prefix is not None else b.exact
        return later is not None and later.startswith(a.prefix)
    return a == b


def _map_covers(a: Mapping[str, StringMatch], b: Mapping[str, StringMatch]) -> bool:
    return all(key in b and string_covers(match, b[key]) for key, match in a.items())


def covers(a: HTTPMatchRequest, b: HTTPMatchRequest) -> bool:
    """Whether every request matching `b` also matches `a` (see the module docstring)."""
    if a.ignore_uri_case != b.ignore_uri_case and a.uri is not None:
        return False
    if not string_covers(a.uri, b.uri):
        return False
    if any(getattr(a, f) is not None and getattr(a, f) != getattr(b, f) for f in _EQUAL_FIELDS):
        return False
    if not (_map_covers(a.headers, b.headers) and _map_covers(a.query_params, b.query_params)):
        return False
    if any(b.without_headers.get(k) != v for k, v in a.without_headers.items()):
        return False
    if any(b.source_labels.get(k) != v for k, v in a.source_labels.items()):
        return False
    # A match limited to some gateways covers one limited to fewer of them, never an unlimited one.
    return not a.gateways or (bool(b.gateways) and set(b.gateways) <= set(a.gateways))
