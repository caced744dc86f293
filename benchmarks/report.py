"""Benchmark results: latency summaries, targets, the printed tables and the JSON file."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

MB = 1024 * 1024
KINDS = ("route", "endpoint")
# Targets at 1,000 proxies.
TARGET_N = 1000
TARGET_ROUTE_P99 = 1.0
TARGET_ENDPOINT_P99 = 0.3
TARGET_RSS_MB = 300.0


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Latency:
    """Seconds from the trigger (file write, push, phase start) to each client's ACK."""

    count: int
    p50: float
    p99: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Latency:
        return cls(len(values), percentile(values, 50), percentile(values, 99),
                   min(values, default=math.nan), max(values, default=math.nan))


@dataclass
class Phase:
    name: str  # connect | route | endpoint
    clients: int
    converged: int
    latency: Latency
    server_cpu_s: float
    server_peak_rss_mb: float
    client_cpu_s: float
    reconnects: int = 0  # streams that failed and were reopened by their client during the phase
    error: str = ""

    @property
    def complete(self) -> bool:
        return self.converged == self.clients and not self.error


@dataclass
class Run:
    """One server (pilot or baseline) under one protocol and client count."""

    server: str
    protocol: str
    clients: int
    phases: list[Phase] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    samples: dict[str, list[float]] = field(default_factory=dict)  # kind -> pooled latencies
    error: str = ""

    def phase(self, name: str) -> list[Phase]:
        return [p for p in self.phases if p.name == name]

    def pooled(self, kind: str) -> Latency:
        return Latency.of(self.samples.get(kind, []))

    def cpu(self, name: str) -> float:
        return sum(p.server_cpu_s for p in self.phase(name))

    @property
    def converged(self) -> bool:
        return not self.error and bool(self.phases) and all(p.complete for p in self.phases)


@dataclass
class Report:
    machine: dict[str, Any]
    settings: dict[str, Any]
    runs: list[Run] = field(default_factory=list)

    def pairs(self) -> list[tuple[Run, Run | None]]:
        """Each pilot run with the baseline run of the same protocol and N."""
        base = {(r.protocol, r.clients): r for r in self.runs if r.server == "baseline"}
        return [(r, base.get((r.protocol, r.clients))) for r in self.runs if r.server == "pilot"]

    def targets(self) -> list[dict[str, Any]]:
        rows = []
        for run in self.runs:
            if run.server != "pilot" or run.clients != TARGET_N:
                continue
            checks = [
                ("route change p99", run.pooled("route").p99, TARGET_ROUTE_P99, "s"),
                ("endpoint change p99", run.pooled("endpoint").p99, TARGET_ENDPOINT_P99, "s"),
                ("pilot peak RSS", run.peak_rss_mb, TARGET_RSS_MB, "MB"),
            ]
            rows += [{"protocol": run.protocol, "clients": run.clients, "target": name, "value": value,
                      "limit": limit, "unit": unit, "met": bool(value < limit and run.converged)}
                     for name, value, limit, unit in checks]
        return rows

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for run, raw in zip(self.runs, out["runs"], strict=True):
            raw["summary"] = {k: asdict(run.pooled(k)) for k in KINDS}
            raw.pop("samples")
        out["targets"] = self.targets()
        out["ratios"] = [_ratios(p, b) for p, b in self.pairs() if b is not None]
        return out

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, default=_nan_safe) + "\n", encoding="utf-8")


def _nan_safe(value: object) -> object:
    return str(value)


def _ratios(pilot: Run, base: Run) -> dict[str, Any]:
    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 and not math.isnan(a) and not math.isnan(b) else math.nan

    out: dict[str, Any] = {"protocol": pilot.protocol, "clients": pilot.clients}
    out["connect"] = ratio(_connect(pilot).max, _connect(base).max)
    for kind in KINDS:
        p, b = pilot.pooled(kind), base.pooled(kind)
        out[f"{kind}_p99"] = ratio(p.p99, b.p99)
        # Fan-out alone: the spread between the first and last ACK, without detection/debounce.
        out[f"{kind}_spread"] = ratio(p.max - p.min, b.max - b.min)
    return out


def _connect(run: Run) -> Latency:
    found = run.phase("connect")
    return found[0].latency if found else Latency.of([])


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.0f}"


def _x(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}x"


def print_report(report: Report, console: Console | None = None) -> None:
    console = console or Console()
    console.print(_results_table(report))
    pairs = [(p, b) for p, b in report.pairs() if b is not None]
    if pairs:
        console.print(_ratio_table(pairs))
    targets = report.targets()
    if targets:
        console.print(_targets_table(targets))
    console.print(f"[dim]{report.machine['note']}[/]")


def _results_table(report: Report) -> Table:
    table = Table(title="ADS load (ms unless noted; first = earliest ACK, i.e. detection + build + first send; "
                        "reopened = streams that failed and were reconnected by their client)")
    for col in ("proto", "N", "server", "connect p50/p99", "route p50/p99", "route first",
                "endpoint p50/p99", "endpoint first", "server CPU s conn/route/ep", "client CPU s",
                "peak RSS MB", "reopened", "ok"):
        table.add_column(col, justify="left" if col in ("proto", "server", "ok") else "right")
    for run in report.runs:
        c = _connect(run)
        route, endpoint = run.pooled("route"), run.pooled("endpoint")
        table.add_row(
            run.protocol, str(run.clients), run.server,
            f"{_ms(c.p50)}/{_ms(c.p99)}",
            f"{_ms(route.p50)}/{_ms(route.p99)}", _ms(route.min),
            f"{_ms(endpoint.p50)}/{_ms(endpoint.p99)}", _ms(endpoint.min),
            f"{run.cpu('connect'):.2f}/{run.cpu('route'):.2f}/{run.cpu('endpoint'):.2f}",
            f"{sum(p.client_cpu_s for p in run.phases):.1f}", f"{run.peak_rss_mb:.0f}",
            str(sum(p.reconnects for p in run.phases)),
            "yes" if run.converged else f"[red]NO[/] {run.error[:60]}",
        )
    return table


def _ratio_table(pairs: list[tuple[Run, Run]]) -> Table:
    table = Table(title="pilot / baseline (raw grpc.aio fan-out of the same bytes)")
    for col in ("proto", "N", "connect", "route p99", "route spread", "endpoint p99", "endpoint spread"):
        table.add_column(col, justify="right")
    for pilot, base in pairs:
        r = _ratios(pilot, base)
        table.add_row(pilot.protocol, str(pilot.clients), _x(r["connect"]), _x(r["route_p99"]),
                      _x(r["route_spread"]), _x(r["endpoint_p99"]), _x(r["endpoint_spread"]))
    return table


def _targets_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"targets at {TARGET_N} proxies")
    for col in ("proto", "target", "value", "limit", "met"):
        table.add_column(col)
    for row in rows:
        value = f"{row['value']:.3f}" if row["unit"] == "s" else f"{row['value']:.0f}"
        table.add_row(row["protocol"], row["target"], f"{value} {row['unit']}", f"< {row['limit']} {row['unit']}",
                      "[green]yes[/]" if row["met"] else "[red]no[/]")
    return table
