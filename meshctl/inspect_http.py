"""HTTP to pilot's debug API and to Envoy admins, for the inspecting commands (proxy-status, proxy-config).

Every call opens a short-lived session with a 10 s budget and ignores proxy settings from the
environment (the addresses are loopback or port-forwards). Failures become `UnreachableError`
(exit code 3) naming the URL and the reason. `resolve_proxy` is pure: it picks one row of
pilot's `/debug/syncz` for the name a user typed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import click

from meshctl.output import UnreachableError

_TIMEOUT = aiohttp.ClientTimeout(total=10)


async def request(method: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """The body of `method url`; UnreachableError on a connection failure or a non-2xx answer."""
    try:
        async with aiohttp.ClientSession(timeout=_TIMEOUT, trust_env=False) as session, \
                session.request(method, url, params=params) as resp:
            body = await resp.text()
            if resp.status >= 300:
                raise UnreachableError(f"{method} {resp.url} answered {resp.status}: {body.strip()[:500]}")
            return body
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UnreachableError(f"cannot reach {url}: {exc or type(exc).__name__}") from None


async def get_json(url: str, params: Mapping[str, str] | None = None) -> Any:


    text = await request("GET", url, params)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UnreachableError(f"GET {url} did not return JSON: {exc}") from None


def http_base(addr: str) -> str:
    """`host:port` (or a URL) as an http:// base URL without a trailing slash."""
    return (addr if "://" in addr else f"http://{addr}").rstrip("/")


def resolve_proxy(rows: Sequence[Mapping[str, Any]], name: str) -> Mapping[str, Any]:
    """The syncz row a user means by `name`: a node id, `namespace/workload`, `workload.namespace`,
    or a workload name or id fragment that only one connected proxy has.

    Raises click.BadParameter listing the candidates when none or several match.
    """
    for key in (_node_id, _slash, _dotted):
        hits = [r for r in rows if key(r) == name]
        if len(hits) == 1:
            return hits[0]
    hits = [r for r in rows if r.get("workload") == name] or [r for r in rows if name in str(r["proxy"])]
    if len(hits) == 1:
        return hits[0]
    known = ", ".join(sorted(_slash(r) for r in rows)) or "none is connected"
    if not hits:
        raise click.BadParameter(f"no connected proxy matches {name!r}; connected: {known}", param_hint="PROXY")
    several = ", ".join(sorted(str(r["proxy"]) for r in hits))
    raise click.BadParameter(f"{name!r} matches several proxies ({several}); give a node id", param_hint="PROXY")


def _node_id(row: Mapping[str, Any]) -> str:
    return str(row["proxy"])


def _slash(row: Mapping[str, Any]) -> str:
    return f'{row.get("namespace")}/{row.get("workload")}'


def _dotted(row: Mapping[str, Any]) -> str:
    return f'{row.get("workload")}.{row.get("namespace")}'
