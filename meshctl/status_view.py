"""Renders pilot's /debug/syncz as the `meshctl proxy-status` table (pure: rows in, table out)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

TYPES = ("CDS", "EDS", "LDS", "RDS")
_STYLE = {"SYNCED": "green", "STALE": "yellow", "NACKED": "bold red", "NOT_SENT": "dim"}
_WORSE = {"SYNCED": 0, "NOT_SENT": 1, "STALE": 2, "NACKED": 3}  # which of two states a column shows


def column_state(types: dict[str, Any], short: str) -> str:
    """A type's state in the table. A VHDS proxy's virtual hosts are part of its routes, so its RDS
    column shows the worse of RDS and VHDS (a NACKed virtual host is a NACKed route change)."""
    state = str(types.get(short, {}).get("state", "NOT_SENT"))
    if short == "RDS" and "VHDS" in types:
        state = max(state, str(types["VHDS"].get("state", "NOT_SENT")), key=lambda s: _WORSE.get(s, 1))
    return state


def _age(since: float, now: float) -> str:
    seconds = max(0, int(now - since))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def status_table(rows: Sequence[dict[str, Any]], now: float | None = None) -> Table:
    """One line per connected proxy, one column per xDS type."""
    now = time.time() if now is None else now
    table = Table(box=None, header_style="bold")
    for col in ("PROXY", "WORKLOAD", "PROTOCOL", *TYPES, "CONNECTED"):
        table.add_column(col, overflow="fold")
    for row in rows:
        cells = []
        for t in TYPES:
            state = column_state(row["types"], t)
            cells.append(Text(state, style=_STYLE.get(state, "")))
        table.add_row(
            row["proxy"], f'{row["namespace"]}/{row["workload"]}', row["protocol"], *cells,
            _age(row["connected_since"], now),
        )
    return table


def nack_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """`proxy TYPE: Envoy's message` for every type a proxy currently rejects."""
    return [
        f'{row["proxy"]} {t}: {st["nack"]}'
        for row in rows for t, st in row["types"].items() if st.get("state") == "NACKED"
    ]
