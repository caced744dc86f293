"""`meshctl x simulate`: which listener, route, cluster, endpoints and policies a request would meet.

The answer is computed (by `pilot.simulate`) from the config pilot would send the proxy now,
`/debug/config_dump?proxy=`, so it explains a change before or without any traffic. Two HTTP
calls to pilot per run (syncz to resolve PROXY, the config dump); the rest is pure.

Exit codes: 0 a route (or TCP proxy) takes the request, also when it redirects, answers directly
or aborts by a fault; 1 it would not: no listener, no virtual host or route (404), no cluster,
denied by RBAC or missing a required JWT; 2 usage; 3 pilot unreachable.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import click

from meshctl.inspect_http import get_json, http_base
from meshctl.output import PROBLEM, emit
from meshctl.proxy_target import complete_proxy, debug_option, find_row
from pilot.simulate import Request, RequestError, Resources, Trace, parse_request, simulate

EXAMPLES = """
\b
Examples:
  meshctl x simulate frontend http://reviews:9080/api/v1 -H 'x-user: jason'
  meshctl x simulate default/frontend http://web:8080/admin -X POST -o json
  meshctl x simulate web-v1 http://127.0.0.11:8081/admin --from-principal spiffe://cluster.local/ns/default/sa/web
  meshctl x simulate shop/cart-5d9 http://10.96.0.10:9080/ --from-ip 10.1.0.7        # captured (Kubernetes)
  meshctl x simulate shop/cart-5d9 http://10.1.0.9:9080/ --inbound                   # arriving at the pod

Exit codes: 0 a route takes the request (also a redirect, a direct response, a fault abort);
1 it would be refused (404 no route, no listener or cluster, RBAC denied, JWT required); 3 pilot unreachable.
"""


@click.group(name="x", epilog="""
\b
Examples:
  meshctl x simulate frontend http://reviews:9080/
""")
def experimental() -> None:
    """Experimental commands: their output may change between releases."""


@experimental.command(name="simulate", epilog=EXAMPLES)
@click.argument("proxy", shell_complete=complete_proxy)
@click.argument("url")
@click.option("-H", "--header", "headers", multiple=True, metavar="'NAME: VALUE'",
              help="A request header (repeatable); `Host:` replaces the URL's authority.")
@click.option("-X", "--request", "method", default="GET", show_default=True, help="HTTP method.")
@click.option("--from-principal", default=None, metavar="SPIFFE_ID",
              help="The client's mTLS identity, for RBAC (default: none, as a plaintext client).")
@click.option("--from-ip", "source_ip", default=None, help="The client's address, for RBAC and filter chains.")
@click.option("--to", "destination_ip", default=None,
              help="The address the client connects to (captured traffic's original destination) when the URL "
                   "names a host rather than an IP.")
@click.option("--inbound", is_flag=True, help="The request arrives at a captured pod (virtualInbound, 15006).")
@click.option("-o", "--output", "output", type=click.Choice(("text", "json", "yaml")), default="text",
              show_default=True, help="text for people; json or yaml for scripts.")
@debug_option
def simulate_cmd(proxy: str, url: str, headers: Sequence[str], method: str, from_principal: str | None,
                 source_ip: str | None, destination_ip: str | None, inbound: bool, output: str,
                 debug_addr: str) -> None:
    """Which listener, route, cluster, endpoints and policies a request to URL would meet at PROXY.

    PROXY is a node id, namespace/workload or workload name of a connected proxy. The config is
    the one pilot would send that proxy now. Load balancing among endpoints, partial faults and
    weighted splits are not predicted: the candidates and their shares are listed.
    """
    try:
        request = parse_request(url, headers, method, destination_ip=destination_ip, source_ip=source_ip,
                                source_principal=from_principal, inbound=inbound)
    except RequestError as exc:
        raise click.BadParameter(str(exc)) from None
    trace = asyncio.run(_simulate(proxy, request, debug_addr))
    if output == "text":
        click.echo(render_text(trace), nl=False)
    else:
        emit(trace.to_dict(), output)
    if not trace.matched:
        raise SystemExit(PROBLEM)


async def _simulate(proxy: str, request: Request, debug_addr: str) -> Trace:
    row = await find_row(proxy, debug_addr, None)
    dump = await get_json(f"{http_base(debug_addr)}/debug/config_dump", {"proxy": str(row["proxy"])})
    return simulate(Resources.from_config_dump(dump), request)


def render_text(trace: Trace) -> str:
    """The trace as labelled lines, one step per line, in the order Envoy takes them."""
    lines: list[tuple[str, str]] = []
    req = trace.request
    lines.append(("Request", f'{req["method"]} {req["scheme"]}://{req["authority"]}{req["path"]}'))
    if trace.listener is None:
        lines.append(("Listener", "none takes the connection"))
    else:
        lines.append(("Listener", f"{trace.listener} ({trace.entry}), filter chain {trace.filter_chain}"))
    for step, value in (("Route config", trace.route_config), ("Virtual host", trace.virtual_host)):
        if value is not None:
            lines.append((step, value))
    if trace.route_index is not None:
        lines.append(("Route", f"{trace.route or '(unnamed)'} (#{trace.route_index}) match "
                               f"{json.dumps(trace.match, sort_keys=True)}"))
    for decision in trace.rbac:
        lines.append(("RBAC", f"{decision.action}: {decision.outcome}" +
                      (f" (policy {decision.policy})" if decision.policy else "")))
    lines += [("JWT", text) for text in trace.jwt]
    if trace.action is not None:
        lines.append(("Action", trace.action))
    for backend in trace.backends:
        where = ", ".join(backend.endpoints) or backend.dynamic or ("no endpoints" if backend.known else "NOT IN CDS")
        tls = f" [{backend.tls}]" if backend.tls else ""
        lines.append(("Cluster", f"{backend.percent:g}% {backend.cluster}{tls}: {where}"))
    if trace.redirect:
        lines.append(("Redirect", trace.redirect))
    if trace.body is not None:
        lines.append(("Body", trace.body))
    lines += _policies(trace)
    status = trace.status if trace.status is not None else "from the upstream"
    lines.append(("Outcome", f"{trace.outcome} (status {status})"))
    lines += [("Note", note) for note in trace.notes]
    width = max(len(k) for k, _ in lines) + 1
    return "".join(f"{k + ':':<{width}} {v}\n" for k, v in lines)


def _policies(trace: Trace) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if trace.fault:
        out.append(("Fault", json.dumps(trace.fault, sort_keys=True)))
    if trace.timeout is not None:
        out.append(("Timeout", "none" if trace.timeout == "0s" else trace.timeout))
    if trace.retry:
        retry: dict[str, Any] = trace.retry
        out.append(("Retry", f'{retry["attempts"]} attempts on {retry["on"]}' +
                    (f', per try {retry["per_try_timeout"]}' if retry.get("per_try_timeout") else "")))
    out += [("Mirror", m) for m in trace.mirrors]
    return out
