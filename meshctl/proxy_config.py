"""`meshctl proxy-config`: what one Envoy really holds, read from its admin API, as tables or raw.

Every subcommand fetches the proxy's own `/config_dump` (or `/clusters?format=json` for endpoint
health, `/logging` for log levels) - not what pilot meant to send; compare both with
`meshctl proxy-status PROXY`. Rows come from the pure functions of `meshctl.envoy_dump`; this
module only fetches and prints. A dump of a sidecar is some 100 KB: one HTTP call per command.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import click
from rich.table import Table

from meshctl import envoy_dump as ed
from meshctl.inspect_http import get_json, request
from meshctl.output import console, emit, output_option
from meshctl.proxy_target import Target, admin_option, complete_proxy, config_index, debug_option, reach

T = TypeVar("T")
LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")

EXAMPLES = """
\b
Examples:
  meshctl proxy-config clusters default/frontend
  meshctl proxy-config clusters frontend --fqdn reviews.default.svc.cluster.local --subset v1
  meshctl proxy-config listeners frontend --port 15001
  meshctl proxy-config routes frontend --name outbound -o json
  meshctl proxy-config endpoints frontend --direction outbound
  meshctl proxy-config secrets frontend
  meshctl proxy-config bootstrap frontend -o json
  meshctl proxy-config log frontend --level debug
  meshctl proxy-config all --admin 127.0.0.1:15000 -o yaml   # e.g. a kubectl port-forward
"""


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def _proxy_args(func: Callable[..., Any]) -> Callable[..., Any]:
    """PROXY, --debug, --admin and -o: what every subcommand takes."""
    func = output_option()(func)
    func = admin_option(func)
    func = debug_option(func)
    return click.argument("proxy", required=False, shell_complete=complete_proxy)(func)


def _cluster_filters(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--direction", type=click.Choice(["inbound", "outbound"]), help="Only this direction.")(func)
    func = click.option("--subset", help="Only clusters of this DestinationRule subset.")(func)
    func = click.option("--port", type=int, help="Only clusters of this service port.")(func)
    return click.option("--fqdn", help="Only clusters of this service host (or host prefix).")(func)


async def _dump(target: Target, include_eds: bool = False) -> dict[str, Any]:
    params = {"include_eds": ""} if include_eds else None
    dump: dict[str, Any] = await get_json(f"{target.admin_url}/config_dump", params)
    return dump


async def _dump_of(proxy: str | None, where: dict[str, Any]) -> dict[str, Any]:
    async with reach(proxy, **where) as target:
        return await _dump(target)


async def _dump_and_index(proxy: str | None, where: dict[str, Any]) -> tuple[dict[str, Any], ed.ConfigIndex]:
    async with reach(proxy, **where) as target:
        return await _dump(target), await config_index(where["debug_addr"])


async def _cluster_status(proxy: str | None, where: dict[str, Any]) -> dict[str, Any]:
    async with reach(proxy, **where) as target:
        status: dict[str, Any] = await get_json(f"{target.admin_url}/clusters", {"format": "json"})
        return status


@click.group("proxy-config", epilog=EXAMPLES)
def proxy_config() -> None:
    """Show one proxy's live Envoy config (clusters, listeners, routes, endpoints, secrets, bootstrap, log levels).

    PROXY is a node id, `namespace/workload`, `workload.namespace` or a workload name; pilot
    (--debug) says where that proxy's Envoy admin is (a pod's is reached with `kubectl
    port-forward`). Use --admin to reach an Envoy directly. Tables for people; `-o json|yaml`
    prints Envoy's own JSON for the selection.
    """


@proxy_config.command(epilog=EXAMPLES)
@_proxy_args
@_cluster_filters
def clusters(proxy: str | None, output: str, fqdn: str | None, port: int | None, subset: str | None,
             direction: str | None, **where: Any) -> None:
    """Clusters: service host, port, subset, direction, discovery type and the DestinationRule behind each."""
    keep = ed.ClusterFilter(fqdn, port, subset, direction)
    dump, index = _run(_dump_and_index(proxy, where))
    if output != "table":
        emit(ed.select_clusters(dump, keep), output)
        return
    console().print(_table(ed.CLUSTER_COLUMNS, ed.cluster_rows(dump, keep, index)))


@proxy_config.command(epilog=EXAMPLES)
@_proxy_args
@click.option("--port", type=int, help="Only listeners on this port.")
@click.option("--name", help="Only the listener of this name.")
def listeners(proxy: str | None, output: str, port: int | None, name: str | None, **where: Any) -> None:
    """Listeners, one row per filter chain: address, port, what the chain matches and where it sends."""
    dump = _run(_dump_of(proxy, where))
    if output != "table":
        part = ed.section(dump, ed.LISTENERS)
        items = [x["listener"] for x in part.get("static_listeners", ())] + [
            x["active_state"]["listener"] for x in part.get("dynamic_listeners", ()) if "active_state" in x]
        emit([x for x in ed.select_named(items, name)
              if port is None or x.get("address", {}).get("socket_address", {}).get("port_value") == port], output)
        return
    console().print(_table(ed.LISTENER_COLUMNS, ed.listener_rows(dump, port, name)))


@proxy_config.command(epilog=EXAMPLES)
@_proxy_args
@click.option("--name", help="Only the route configuration of this name.")
def routes(proxy: str | None, output: str, name: str | None, **where: Any) -> None:
    """Routes: route configuration, virtual host, domains, match and the VirtualService behind each."""
    dump, index = _run(_dump_and_index(proxy, where))
    if output != "table":
        part = ed.section(dump, ed.ROUTES)
        items = [r["route_config"] for r in (*part.get("static_route_configs", ()),
                                             *part.get("dynamic_route_configs", ()))]
        emit(ed.select_named(items, name), output)
        return
    console().print(_table(ed.ROUTE_COLUMNS, ed.route_rows(dump, index, name)))


@proxy_config.command(epilog=EXAMPLES)
@_proxy_args
@_cluster_filters
def endpoints(proxy: str | None, output: str, fqdn: str | None, port: int | None, subset: str | None,
              direction: str | None, **where: Any) -> None:
    """Endpoints of every cluster with their health (EDS status) and outlier-detection state."""
    keep = ed.ClusterFilter(fqdn, port, subset, direction)
    status = _run(_cluster_status(proxy, where))
    if output != "table":
        emit(ed.select_endpoints(status, keep), output)
        return
    console().print(_table(ed.ENDPOINT_COLUMNS, ed.endpoint_rows(status, keep)))


@proxy_config.command(epilog=EXAMPLES)
@_proxy_args
@click.option("--name", help="Only the secret of this name (e.g. default, ROOTCA).")
def secrets(proxy: str | None, output: str, name: str | None, **where: Any) -> None:
    """Secrets Envoy holds (SDS): type, state, and the certificate's validity and serial number."""
    dump = _run(_dump_of(proxy, where))
    if output != "table":
        part = ed.section(dump, ed.SECRETS)  # Envoy has already redacted private keys
        items = [*part.get("dynamic_active_secrets", ()), *part.get("dynamic_warming_secrets", ()),
                 *part.get("static_secrets", ())]
        emit(ed.select_named(items, name), output)
        return
    now = datetime.datetime.now(datetime.UTC)
    console().print(_table(ed.SECRET_COLUMNS, ed.secret_rows(dump, now, name)))


@proxy_config.command(epilog=EXAMPLES)
@_proxy_args
def bootstrap(proxy: str | None, output: str, **where: Any) -> None:
    """The bootstrap Envoy started with (node, admin, static clusters and listeners); YAML by default."""
    dump = _run(_dump_of(proxy, where))
    emit(ed.section(dump, ed.BOOTSTRAP), "yaml" if output == "table" else output)


@proxy_config.command("all", epilog=EXAMPLES)
@_proxy_args
def all_config(proxy: str | None, output: str, **where: Any) -> None:
    """Everything: clusters, listeners, routes, endpoints and secrets tables; -o json|yaml the whole dump."""
    async def load() -> tuple[dict[str, Any], dict[str, Any], ed.ConfigIndex]:
        async with reach(proxy, **where) as target:
            status: dict[str, Any] = await get_json(f"{target.admin_url}/clusters", {"format": "json"})
            dump = await _dump(target, include_eds=output != "table")
            return dump, status, await config_index(where["debug_addr"])

    dump, status, index = _run(load())
    if output != "table":
        emit(dump, output)
        return
    out, keep = console(), ed.ClusterFilter()
    now = datetime.datetime.now(datetime.UTC)
    for title, table in (
        ("CLUSTERS", _table(ed.CLUSTER_COLUMNS, ed.cluster_rows(dump, keep, index))),
        ("LISTENERS", _table(ed.LISTENER_COLUMNS, ed.listener_rows(dump))),
        ("ROUTES", _table(ed.ROUTE_COLUMNS, ed.route_rows(dump, index))),
        ("ENDPOINTS", _table(ed.ENDPOINT_COLUMNS, ed.endpoint_rows(status, keep))),
        ("SECRETS", _table(ed.SECRET_COLUMNS, ed.secret_rows(dump, now))),
    ):
        out.print(f"[bold]{title}[/]")
        out.print(table)
        out.print()


def parse_levels(text: str) -> dict[str, str]:
    """Envoy's `/logging` answer (`active loggers:` then `  name: level` lines) as {logger: level}."""
    levels = {}
    for line in text.splitlines():
        name, sep, level = line.strip().partition(":")
        if sep and level.strip() and not line.startswith("active"):
            levels[name.strip()] = level.strip()
    return dict(sorted(levels.items()))


def _logger_level(value: str) -> tuple[str, str]:
    name, sep, level = value.partition(":")
    if not sep or not name or level not in LEVELS:
        raise click.BadParameter(f"{value!r} is not LOGGER:LEVEL with LEVEL one of {', '.join(LEVELS)}",
                                 param_hint="--logger")
    return name, level


@proxy_config.command(epilog=EXAMPLES)
@_proxy_args
@click.option("--level", type=click.Choice(LEVELS), help="Set every logger to this level.")
@click.option("--logger", "loggers", multiple=True, metavar="LOGGER:LEVEL",
              help="Set one logger (e.g. http:debug, upstream:trace); repeatable.")
def log(proxy: str | None, output: str, level: str | None, loggers: tuple[str, ...], **where: Any) -> None:
    """Read Envoy's log level per logger, or set them (all with --level, some with --logger)."""
    pairs = [_logger_level(x) for x in loggers]

    async def change() -> str:
        async with reach(proxy, **where) as target:
            url = f"{target.admin_url}/logging"
            text = ""
            if level is not None:
                text = await request("POST", url, {"level": level})
            for name, lvl in pairs:
                text = await request("POST", url, {name: lvl})
            return text or await request("POST", url)

    levels = parse_levels(_run(change()))
    if output != "table":
        emit(levels, output)
        return
    console().print(_table(("LOGGER", "LEVEL"), sorted(levels.items())))
