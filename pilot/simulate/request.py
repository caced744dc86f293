"""The request a simulation follows: what a client sends, and where (pure, no I/O)."""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class RequestError(ValueError):
    """A request that cannot be simulated (bad URL, bad header line); the message names the input."""


@dataclass(frozen=True)
class Request:
    """One HTTP request as the proxy sees it.

    `headers` holds lower-cased names (repeated names keep every value, in order) and never the
    pseudo-headers, which have their own fields. `destination_ip` is the address the client
    connected to (a listener's address, or the original destination of captured traffic);
    `inbound` says the connection arrives at a captured pod (port 15006) rather than leaving it.
    """

    method: str = "GET"
    scheme: str = "http"
    authority: str = ""
    path: str = "/"
    port: int = 80
    headers: tuple[tuple[str, str], ...] = ()
    destination_ip: str | None = None
    source_ip: str | None = None
    source_principal: str | None = None
    inbound: bool = False

    def header(self, name: str) -> str | None:
        """Every value of header `name` joined with "," (as Envoy matches them); None when absent."""
        name = name.lower()
        pseudo = {":method": self.method, ":authority": self.authority, ":path": self.path,
                  ":scheme": self.scheme, "host": self.authority}
        if name in pseudo:
            return pseudo[name]
        values = [v for k, v in self.headers if k == name]
        return ",".join(values) if values else None

    @property
    def path_only(self) -> str:
        """The path without query string or fragment (what Envoy's path matchers see)."""
        return self.path.split("?", 1)[0].split("#", 1)[0]

    @property
    def query(self) -> dict[str, str]:
        """Query parameters, percent-decoded; the first value of a repeated name."""
        raw = self.path.split("?", 1)[1].split("#", 1)[0] if "?" in self.path else ""
        out: dict[str, str] = {}
        for name, value in urllib.parse.parse_qsl(raw, keep_blank_values=True):
            out.setdefault(name, value)
        return out

    @property
    def host(self) -> str:
        """The authority without its port (IPv6 brackets kept)."""
        return strip_port(self.authority)


@dataclass(frozen=True)
class _Parsed:
    headers: list[tuple[str, str]] = field(default_factory=list)
    authority: str | None = None


def strip_port(authority: str) -> str:
    """`host:port` -> `host`; `[v6]:port` -> `[v6]`; anything else unchanged."""
    if authority.startswith("["):
        end = authority.find("]")
        return authority[: end + 1] if end > 0 else authority
    if authority.count(":") == 1:
        return authority.rsplit(":", 1)[0]
    return authority


def parse_headers(lines: Iterable[str]) -> _Parsed:
    """`Name: value` lines (curl's -H form) -> lower-cased pairs; a Host header becomes the authority."""
    out = _Parsed()
    authority = None
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or name.strip() != name.rstrip():
            raise RequestError(f"header {line!r}: expected 'Name: value'")
        key = name.strip().lower()
        if key in ("host", ":authority"):
            authority = value.strip()
        else:
            out.headers.append((key, value.strip()))
    return _Parsed(out.headers, authority)


def parse_request(url: str, headers: Iterable[str] = (), method: str = "GET", *,
                  destination_ip: str | None = None, source_ip: str | None = None,
                  source_principal: str | None = None, inbound: bool = False) -> Request:
    """A Request from what a user types: a URL, curl-style headers and options.

    The URL's host is the authority (a `Host` header overrides it); when it is an IP address it is
    also the destination address, unless `destination_ip` says otherwise. Raises RequestError.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RequestError(f"url {url!r}: expected http://host[:port]/path or https://...")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise RequestError(f"url {url!r}: bad port: {exc}") from None
    parsed = parse_headers(headers)
    hostname = parts.hostname or ""
    if destination_ip is None and _is_ip(hostname):
        destination_ip = hostname
    for name, value in (("destination", destination_ip), ("source", source_ip)):
        if value is not None and not _is_ip(value):
            raise RequestError(f"{name} address {value!r} is not an IP address")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Request(method=method.upper(), scheme=parts.scheme, authority=parsed.authority or parts.netloc,
                   path=path, port=port, headers=tuple(parsed.headers), destination_ip=destination_ip,
                   source_ip=source_ip, source_principal=source_principal, inbound=inbound)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def header_items(request: Request) -> Mapping[str, str]:
    """Headers as one joined value per name (for display)."""
    names = dict.fromkeys(k for k, _ in request.headers)
    return {k: request.header(k) or "" for k in names}
