"""Finding a proxy for the inspecting commands: its syncz row at pilot, and a way to its Envoy admin.

Local-mesh sidecars tell pilot where they bind; pilot's `/debug/syncz` reports each one's Envoy
admin as `admin` (host:port). A Kubernetes sidecar's admin listens on its pod's loopback only and
pilot reports none: `reach` then forwards the pod's port 15000 with `kubectl port-forward` for as
long as the command needs it. `--admin` skips both. Calls to pilot are awaited on the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from meshctl.envoy_dump import ConfigIndex
from meshctl.inspect_http import get_json, http_base, resolve_proxy
from meshctl.output import UnreachableError
from meshctl.portforward import pod_of, port_forward

DEFAULT_DEBUG = "127.0.0.1:15014"


def debug_option(func: Any) -> Any:
    return click.option("--debug", "debug_addr", default=DEFAULT_DEBUG, show_default=True,
                        help="Pilot's debug API (host:port).")(func)


def admin_option(func: Any) -> Any:
    """--admin, and --kubeconfig/--context for the port-forward to a pod's admin."""
    func = click.option("--context", "kube_context", default=None,
                        help="kubeconfig context for the port-forward to a pod's sidecar.")(func)
    func = click.option("--kubeconfig", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        help="kubeconfig for the port-forward to a pod's sidecar [kubectl's default].")(func)
    return click.option("--admin", "admin_addr", default=None, metavar="HOST:PORT",
                        help="The proxy's Envoy admin, given directly; default: the address pilot reports "
                             "for PROXY, or a `kubectl port-forward` to its pod's 15000 on Kubernetes.")(func)


@dataclass(frozen=True)
class Target:
    """One proxy: its pilot status row (empty when only --admin was given) and its admin base URL."""

    admin_url: str
    row: Mapping[str, Any] = field(default_factory=dict)


async def syncz(debug_addr: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = await get_json(f"{http_base(debug_addr)}/debug/syncz")
    return rows


async def find_row(proxy: str | None, debug_addr: str, admin_addr: str | None) -> Mapping[str, Any]:
    """Pilot's row for `proxy` (see `resolve_proxy`); {} without PROXY, or when pilot is down and --admin given."""
    if proxy is None and admin_addr is None:
        raise click.UsageError("name a PROXY (node id, namespace/workload or workload), or give --admin HOST:PORT")
    if proxy is None:
        return {}
    try:
        return resolve_proxy(await syncz(debug_addr), proxy)
    except UnreachableError:
        if admin_addr is None:
            raise
        return {}


@contextlib.asynccontextmanager
async def reach(proxy: str | None, debug_addr: str, admin_addr: str | None, kubeconfig: Path | None = None,
                kube_context: str | None = None) -> AsyncIterator[Target]:
    """The proxy and a base URL of its Envoy admin, valid inside the block (a port-forward ends with it)."""
    row = await find_row(proxy, debug_addr, admin_addr)
    if admin_addr is not None:
        yield Target(http_base(admin_addr), row)
        return
    if row.get("admin"):
        yield Target(http_base(str(row["admin"])), row)
        return
    namespace = str(row.get("namespace") or "")
    try:
        pod = pod_of(str(row.get("proxy")), namespace)
    except ValueError as exc:
        raise click.UsageError(f"pilot knows no Envoy admin address for {row.get('proxy')} and {exc}; "
                               "give --admin HOST:PORT") from None
    async with port_forward(namespace, pod, kubeconfig, kube_context) as forwarded:
        yield Target(http_base(forwarded), row)


async def config_index(debug_addr: str) -> ConfigIndex:
    """VirtualServices and DestinationRules pilot has in force; empty if pilot cannot be asked."""
    try:
        return ConfigIndex.from_configz(await get_json(f"{http_base(debug_addr)}/debug/configz"))
    except UnreachableError:
        return ConfigIndex()


def complete_proxy(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of PROXY: `namespace/workload` of the proxies pilot (--debug) has connected.

    Runs in the completing shell's subprocess; a pilot that does not answer means no suggestions.
    """
    debug_addr = str(ctx.params.get("debug_addr") or DEFAULT_DEBUG)
    try:
        rows = asyncio.run(syncz(debug_addr))
    except (UnreachableError, OSError):
        return []
    names = sorted({f'{r.get("namespace")}/{r.get("workload")}' for r in rows})
    return [n for n in names if n.startswith(incomplete)]
