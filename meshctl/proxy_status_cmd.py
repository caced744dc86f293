"""`meshctl proxy-status [PROXY]`: every proxy's xDS state, or one proxy's config diffed against pilot's.

Without PROXY: pilot's `/debug/syncz` as a table (SYNCED / STALE / NACKED per type, Envoy's
NACK message below it); `--wide` adds the ACKed version per type and the pilot asked. With PROXY:
what pilot would send it now (`/debug/config_dump?proxy=`) against what its Envoy holds (admin
`/config_dump`), resource by resource (`meshctl.config_diff`), as a unified diff; exit code 1 when
they differ. Three HTTP calls at most, each awaited in turn on one event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from meshctl.config_diff import TypeDiff, diff_proxy
from meshctl.inspect_http import get_json, http_base, resolve_proxy
from meshctl.output import PROBLEM, console, emit
from meshctl.proxy_target import admin_option, complete_proxy, debug_option, reach, syncz
from meshctl.status_view import TYPES, column_state, nack_lines, status_table

EXAMPLES = """
\b
Examples:
  meshctl proxy-status                          # every proxy: SYNCED / STALE / NACKED per type
  meshctl proxy-status --wide                   # with ACKed versions and the pilot asked
  meshctl proxy-status -o json | jq '.[].types.RDS.state'
  meshctl proxy-status default/frontend         # pilot's config against the proxy's, as a diff
  meshctl proxy-status frontend --debug 127.0.0.1:15014 || echo "frontend differs from pilot"

\b
Exit codes: 0 shown (and, for one proxy, in sync); 1 the proxy's config differs from pilot's;
2 bad usage; 3 pilot or the proxy's Envoy admin cannot be reached.
"""


@click.command("proxy-status", epilog=EXAMPLES)
@click.argument("proxy", required=False, shell_complete=complete_proxy)
@debug_option
@admin_option
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table", show_default=True,
              help="table for people; json or yaml: pilot's status rows (or the per-type diff for one PROXY).")
@click.option("--json", "as_json", is_flag=True, help="Same as -o json (pilot's raw /debug/syncz).")
@click.option("--wide", is_flag=True, help="Also show each type's ACKed version and the pilot asked.")
def proxy_status(proxy: str | None, debug_addr: str, output: str, as_json: bool, wide: bool,
                 **where: Any) -> None:
    """Show every connected proxy and whether it is SYNCED, STALE or NACKED per xDS type.

    With PROXY (node id, namespace/workload, workload.namespace or workload name): compare the
    config pilot would send it now with what its Envoy holds, per type and per resource.
    """
    fmt = "json" if as_json else output
    if proxy is not None:
        raise SystemExit(_one(proxy, fmt, debug_addr=debug_addr, **where))
    rows = asyncio.run(syncz(debug_addr))
    if fmt != "table":
        emit(rows, fmt)
        return
    out = console()
    if not rows:
        out.print("no proxies connected")
        return
    out.print(wide_table(rows, debug_addr) if wide else status_table(rows))
    for line in nack_lines(rows):
        out.print(f"[bold red]NACK[/] {line}", highlight=False)


def wide_table(rows: Sequence[Mapping[str, Any]], pilot: str) -> Table:
    """One line per proxy: each type's state with the first 8 characters of its ACKed version."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("PROXY", "WORKLOAD", *TYPES, "PILOT", "ADMIN"):
        table.add_column(col, overflow="fold")
    for row in rows:
        cells = []
        for t in TYPES:
            st = row["types"].get(t, {})
            state = column_state(row["types"], t)
            acked = str(st.get("acked_version") or "-")[:8]
            if t == "RDS" and "VHDS" in row["types"]:  # and its virtual hosts' (see `column_state`)
                acked += "+" + (str(row["types"]["VHDS"].get("acked_version") or "-")[:8])
            cells.append(Text(f"{state} {acked}", style="red" if state == "NACKED" else ""))
        table.add_row(str(row["proxy"]), f'{row["namespace"]}/{row["workload"]}', *cells, pilot,
                      str(row.get("admin") or "-"))
    return table


def _one(proxy: str, fmt: str, **where: Any) -> int:
    diffs, name = asyncio.run(_diff(proxy, where))
    in_sync = all(d.in_sync for d in diffs)
    if fmt != "table":
        emit({"proxy": name, "in_sync": in_sync, "types": [d.as_dict() for d in diffs]}, fmt)
    else:
        _print_diffs(name, diffs)
    return 0 if in_sync else PROBLEM


async def _diff(proxy: str, where: dict[str, Any]) -> tuple[list[TypeDiff], str]:
    debug_addr = where["debug_addr"]
    async with reach(proxy, **where) as target:
        envoy_dump = await get_json(f"{target.admin_url}/config_dump", {"include_eds": ""})
    row = target.row or resolve_proxy(await syncz(debug_addr), proxy)  # pilot is needed for its side anyway
    node = str(row["proxy"])
    pilot_dump = await get_json(f"{http_base(debug_addr)}/debug/config_dump", {"proxy": node})
    acked = {t: str(st.get("acked_version") or "") for t, st in row.get("types", {}).items()}
    return diff_proxy(pilot_dump, envoy_dump, acked), node


def _print_diffs(name: str, diffs: Sequence[TypeDiff]) -> None:
    out = console()
    out.print(f"[bold]{name}[/]: pilot's config (---) against the proxy's Envoy (+++)", highlight=False)
    for d in diffs:
        versions = d.versions()
        if d.in_sync:
            out.print(f"{d.type}: [green]in sync[/] ({d.resources} resources; {versions})", highlight=False)
            continue
        parts = [f"{len(x)} {what}" for x, what in ((d.changed, "differ"), (d.only_in_pilot, "only in pilot"),
                                                    (d.only_in_proxy, "only in the proxy")) if x]
        out.print(f"{d.type}: [bold red]DIFFERS[/] ({', '.join(parts)}; {versions})", highlight=False)
        for line in d.text.splitlines():
            style = "red" if line.startswith("-") else "green" if line.startswith("+") else ""
            out.print(Text(line, style=style))
    out.print("SDS: served by the workload agent, not pilot: see `meshctl proxy-config secrets`", highlight=False)
