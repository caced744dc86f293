"""Benchmark results: latency summaries, the printed tables and the JSON file (the targets: `benchmarks.targets`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.targets import (
    BYTES_BOUND_MB,
    BYTES_BOUND_SHARE,
    MISSION,
    MISSION_SERVICES,
    REPLAY_FACTOR,
    TARGET_N,
    ratio,
    target_rows,
)

MB = 1024 * 1024
KINDS = ("route", "endpoint")
PER_WORKLOAD = "per-workload"


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
    server_system_s: float = 0.0  # the part of server_cpu_s spent in the kernel (socket copies, page faults)
    server_minor_faults: int = 0  # pages the server touched for the first time during the phase
    # server_cpu_s by thread (`benchmarks.procs.thread_cpu`): "main" (the event loop), gRPC's
    # "event_engine", the rest by name
    server_threads: dict[str, float] = field(default_factory=dict)
    # CPU seconds the host took from the machine's CPUs while the phase ran (`procs.machine_steal`):
    # a change slowed by the machine rather than by its server shows here
    machine_steal_s: float = 0.0

    @property
    def complete(self) -> bool:
        return self.converged == self.clients and not self.error


@dataclass
class Run:
    """One server (pilot or baseline) under one protocol and client count."""

    server: str
    protocol: str
    clients: int
    services: int = 0
    classes: int = 0  # config classes the clients actually fall into (baseline: 1, it replays one)
    class_mode: str = "fixed"  # fixed | per-workload | replay
    phases: list[Phase] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    empty_rss_mb: float = math.nan  # mesh loaded, before any client connected
    steady_rss_mb: float = math.nan  # all clients connected and ACKed, then idle
    settled_after_s: float = math.nan  # when its RSS stopped moving after connect (`runner.settled_rss`)
    connections: int = 0  # TCP connections the server held at steady RSS (`ResourceMeter.inbound_connections`)
    after_rss_mb: float = math.nan  # settled again after round 1's changes, the fleet connected
    idle_cpu_s: float = math.nan  # server CPU seconds over `idle_seconds` of idleness after connect
    idle_seconds: float = 0.0
    # pilot_class_publish_cpu_seconds after connect; None when pilot does not export it.
    class_publish_cpu_s: float | None = None
    class_publishes: int | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)  # kind -> pooled latencies
    # kind -> the quiet time the server waits on purpose before acting on a change of that kind
    # (pilot's configured debounce; the baseline replays at once): what `_ratios` takes off.
    debounce_s: dict[str, float] = field(default_factory=dict)
    # kind -> [bytes of one proxy's response to the change, bytes of its ACK] (`benchmarks.wirebytes`)
    wire: dict[str, list[int]] = field(default_factory=dict)
    error: str = ""

    def phase(self, name: str) -> list[Phase]:
        return [p for p in self.phases if p.name == name]

    def pooled(self, kind: str) -> Latency:
        return Latency.of(self.samples.get(kind, []))

    def cpu(self, name: str) -> float:
        return sum(p.server_cpu_s for p in self.phase(name))

    def cpu_per_change(self, kind: str) -> float:
        """Server CPU seconds of one change, averaged over the repeats that were measured."""
        phases = self.phase(kind)
        return self.cpu(kind) / len(phases) if phases else math.nan

    def cpu_floor(self, kind: str, cores: int) -> float:
        """Seconds a change of `kind` takes at the least on `cores` cores: the server's and the
        simulated Envoys' CPU for it (averaged over the repeats), spread over every core with
        nothing else to do. They share the machine, so no server's last ACK can come sooner; for
        the baseline, which adds nothing to the bytes, it is what this machine allows at all."""
        phases = self.phase(kind)
        if not phases or cores <= 0:
            return math.nan
        return sum(p.server_cpu_s + p.client_cpu_s for p in phases) / len(phases) / cores

    @property
    def connect(self) -> Latency:
        """Connect latencies, pooled over the rounds that connected a fleet (`benchmarks.paired`)."""
        if "connect" in self.samples:
            return self.pooled("connect")
        found = self.phase("connect")
        return found[0].latency if found else Latency.of([])

    @property
    def connected_all_s(self) -> float:
        """Until the last client ACKed its full initial config, in the slowest connect; NaN if a
        connect did not complete."""
        found = self.phase("connect")
        if not found or not all(p.complete for p in found):
            return math.nan
        return max(p.latency.max for p in found)

    @property
    def memory_delta_kb(self) -> float:
        """What the connected clients cost the server: steady RSS minus empty RSS, in KB."""
        return (self.steady_rss_mb - self.empty_rss_mb) * 1024

    @property
    def kb_per_stream(self) -> float:
        """The delta per client; it includes the classes' snapshots (with few classes ~ per stream)."""
        return self.memory_delta_kb / self.clients if self.clients else math.nan

    @property
    def kb_per_class(self) -> float:
        """The same delta per config class: the streams' own cost is folded in."""
        return self.memory_delta_kb / self.classes if self.classes and self.server == "pilot" else math.nan

    @property
    def idle_vcpu(self) -> float:
        return self.idle_cpu_s / self.idle_seconds if self.idle_seconds > 0 else math.nan

    @property
    def class_cpu_ms(self) -> float | None:
        """Pilot's CPU to generate and publish one class's snapshot; None if not exported."""
        if self.class_publish_cpu_s is None or not self.class_publishes:
            return None
        return self.class_publish_cpu_s / self.class_publishes * 1000

    @property
    def mission_scale(self) -> bool:
        return self.server == "pilot" and self.services >= MISSION_SERVICES and self.class_mode == PER_WORKLOAD

    @property
    def converged(self) -> bool:
        return not self.error and bool(self.phases) and all(p.complete for p in self.phases)

    def summary(self) -> dict[str, Any]:
        """Derived figures, as printed: latencies pooled over repeats, CPU per change, memory."""
        return {
            **{k: asdict(self.pooled(k)) for k in KINDS},
            "connect": asdict(self.connect),
            "connected_all_s": self.connected_all_s,
            "cpu_per_route_change_s": self.cpu_per_change("route"),
            "cpu_per_endpoint_change_s": self.cpu_per_change("endpoint"),
            "cpu_per_new_class_ms": self.class_cpu_ms,
            "kb_per_stream": self.kb_per_stream,
            "kb_per_class": self.kb_per_class,
            "idle_vcpu": self.idle_vcpu,
            "streams_reopened": sum(p.reconnects for p in self.phases),
        }




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
        """Every target's row for every pilot run it applies to (`benchmarks.targets`)."""
        return target_rows(self.pairs(), int(self.machine.get("cpus") or 0))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for run, raw in zip(self.runs, out["runs"], strict=True):
            raw["summary"] = run.summary()
            raw.pop("samples")
        out["targets"] = self.targets()
        out["ratios"] = [_ratios(p, b) for p, b in self.pairs() if b is not None]
        clean: dict[str, Any] = _nan_to_none(out)
        return clean

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _nan_to_none(value: Any) -> Any:
    """NaN (a figure not measured) as JSON null, so the file is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value



def _ratios(pilot: Run, base: Run) -> dict[str, Any]:
    out: dict[str, Any] = {"protocol": pilot.protocol, "clients": pilot.clients}
    out["connect"] = ratio(pilot.connected_all_s, base.connected_all_s)  # until all clients ACKed
    out["connect_p99"] = ratio(pilot.connect.p99, base.connect.p99)
    for kind in KINDS:
        p, b = pilot.pooled(kind), base.pooled(kind)
        out[f"{kind}_p99"] = ratio(p.p99, b.p99)
        # The same from the end of pilot's configured debounce (Istio's PILOT_DEBOUNCE_AFTER is
        # 100 ms too): a wait pilot chooses, which the baseline, replaying at once, does not have.
        out[f"{kind}_p99_past_debounce"] = ratio(p.p99 - pilot.debounce_s.get(kind, 0.0), b.p99)
        # Fan-out alone: the spread between the first and last ACK, without detection/debounce.
        out[f"{kind}_spread"] = ratio(p.max - p.min, b.max - b.min)
    # Pilot's k-th phase of a kind against the baseline's k-th, made right after it (`benchmarks.paired`:
    # connects in turn, changes in turn): the pooled figures above follow the worst change, these show
    # whether one change decided them.
    out["per_round_p99"] = {
        name: [ratio(a.latency.p99, c.latency.p99) for a, c in zip(pilot.phase(name), base.phase(name), strict=False)]
        for name in ("connect", *KINDS)}
    # The simulated Envoys' CPU in the same rounds, pilot's over the baseline's: they run the same
    # code on the same bytes against both servers. A round far above 1.0x had the clients doing more
    # for the same bytes: the machine moving under it, or the server's writes arriving more spread
    # out (a client woken for each response pays the wake-up each time, one woken for a burst once),
    # which a slower server causes itself. A hint to read a round's p99 ratio with, not a verdict.
    out["per_round_client_cpu"] = {
        name: [ratio(a.client_cpu_s, c.client_cpu_s)
               for a, c in zip(pilot.phase(name), base.phase(name), strict=False)]
        for name in KINDS}
    # The host's steal in the same rounds, pilot's phase and the baseline's (seconds, all CPUs).
    out["per_round_steal_s"] = {
        name: [[a.machine_steal_s, c.machine_steal_s]
               for a, c in zip(pilot.phase(name), base.phase(name), strict=False)]
        for name in KINDS}
    out["slowest"] = {name: _slowest(pilot.phase(name), base.phase(name)) for name in KINDS}
    return out


def _slowest(mine: list[Phase], theirs: list[Phase]) -> dict[str, Any] | None:
    """Pilot's change of one kind with the highest p99, with the host's steal during it and the
    baseline's change made right after it: the pooled p99 follows its slowest changes, so this is
    the change a missed latency row is about, and whether the machine was taken from under it.
    None when no change of the kind was measured."""
    timed = [(i, p) for i, p in enumerate(mine) if not math.isnan(p.latency.p99)]
    if not timed:
        return None
    i, phase = max(timed, key=lambda item: item[1].latency.p99)
    pair = theirs[i] if i < len(theirs) else None
    return {"index": i + 1, "of": len(mine), "p99_s": phase.latency.p99, "steal_s": phase.machine_steal_s,
            "replay_p99_s": pair.latency.p99 if pair is not None else None,
            "replay_steal_s": pair.machine_steal_s if pair is not None else None}


def _slowest_text(found: dict[str, Any]) -> str:
    """"route 2 of 9, p99 1276 ms, host steal 0 ms (the replay's next: 575 ms, steal 0 ms)"."""
    text = (f"{found['index']} of {found['of']}, p99 {found['p99_s'] * 1000:.0f} ms, "
            f"host steal {found['steal_s'] * 1000:.0f} ms")
    if found["replay_p99_s"] is not None:
        text += (f" (the replay's next: {_ms(found['replay_p99_s'])} ms, "
                 f"steal {found['replay_steal_s'] * 1000:.0f} ms)")
    return text


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 1000:.0f}"


def _x(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


def _num(value: float | None, digits: int = 0) -> str:
    """A figure, or "-" when it was not measured (NaN) or not available (None)."""
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def print_report(report: Report, console: Console | None = None) -> None:
    console = console or Console()
    console.print(_results_table(report))
    console.print(_footprint_table(report))
    pairs = [(p, _ratios(p, b)) for p, b in report.pairs() if b is not None]
    if pairs:
        console.print(_ratio_table(pairs))
        for pilot, ratios in pairs:
            rounds, clients = ratios["per_round_p99"], ratios["per_round_client_cpu"]
            console.print(f"{pilot.protocol} {pilot.clients}: p99 ratio per phase (pilot's k-th / the baseline's k-th, "
                          "made in turn): "
                          + "; ".join(f"{name} " + " ".join(_x(v) for v in values) for name, values in rounds.items())
                          + " | the clients' CPU, same ratio: "
                          + "; ".join(f"{name} " + " ".join(_x(v) for v in values) for name, values in clients.items()))
            steal = ratios["per_round_steal_s"]
            if any(s for pairs in steal.values() for pair in pairs for s in pair):
                console.print(f"{pilot.protocol} {pilot.clients}: the host's steal per phase in ms (pilot's k-th / "
                              "the baseline's k-th): " + "; ".join(
                                  f"{name} " + " ".join(f"{a * 1000:.0f}/{b * 1000:.0f}" for a, b in pairs)
                                  for name, pairs in steal.items()))
            console.print(f"{pilot.protocol} {pilot.clients}: pilot's slowest change of each kind: " + "; ".join(
                f"{name} {_slowest_text(found)}" for name, found in ratios["slowest"].items() if found is not None))
    targets = report.targets()
    if targets:
        console.print(_targets_table(targets))
    console.print(f"[dim]{report.machine['note']}[/]")


def _results_table(report: Report) -> Table:
    table = Table(title="ADS load (ms unless noted; first = earliest ACK, i.e. detection + build + first send; "
                        "reopened = streams that failed and were reconnected by their client)")
    for col in ("proto", "N", "server", "connect p50/p99/all", "route p50/p99", "route first",
                "endpoint p50/p99", "endpoint first", "server CPU s conn/route/ep", "client CPU s",
                "peak RSS MB", "reopened", "ok"):
        table.add_column(col, justify="left" if col in ("proto", "server", "ok") else "right")
    for run in report.runs:
        c = run.connect
        route, endpoint = run.pooled("route"), run.pooled("endpoint")
        table.add_row(
            run.protocol, str(run.clients), run.server,
            f"{_ms(c.p50)}/{_ms(c.p99)}/{_ms(run.connected_all_s)}",
            f"{_ms(route.p50)}/{_ms(route.p99)}", _ms(route.min),
            f"{_ms(endpoint.p50)}/{_ms(endpoint.p99)}", _ms(endpoint.min),
            f"{run.cpu('connect'):.2f}/{run.cpu('route'):.2f}/{run.cpu('endpoint'):.2f}",
            f"{sum(p.client_cpu_s for p in run.phases):.1f}", f"{run.peak_rss_mb:.0f}",
            str(sum(p.reconnects for p in run.phases)),
            "yes" if run.converged else f"[red]NO[/] {run.error[:60]}",
        )
    return table


def _footprint_table(report: Report) -> Table:
    table = Table(title="server cost (CPU per change averaged over repeats; memory per stream+class and per "
                        "class = (steady - empty RSS) / N and / classes; idle = CPU s / idle window)")
    for col in ("proto", "N", "server", "services", "classes", "CPU s/route chg", "CPU s/ep chg",
                "CPU ms/new class", "empty RSS MB", "steady RSS MB", "peak RSS MB", "KB/stream+class",
                "KB/class", "idle vCPU"):
        table.add_column(col, justify="left" if col in ("proto", "server") else "right")
    for run in report.runs:
        table.add_row(
            run.protocol, str(run.clients), run.server, str(run.services), f"{run.classes} {run.class_mode}",
            _num(run.cpu_per_change("route"), 3), _num(run.cpu_per_change("endpoint"), 3),
            _num(run.class_cpu_ms, 2), _num(run.empty_rss_mb), _num(run.steady_rss_mb), _num(run.peak_rss_mb),
            _num(run.kb_per_stream, 1), _num(run.kb_per_class, 1), _num(run.idle_vcpu, 3),
        )
    return table


def _ratio_table(pairs: list[tuple[Run, dict[str, Any]]]) -> Table:
    """One row per pilot run: its ratios to the baseline of the same run (`_ratios`)."""
    table = Table(title="pilot / baseline (raw grpc.aio fan-out of the same bytes)")
    for col in ("proto", "N", "connect p99", "connect all", "route p99", "route p99 past debounce",
                "route spread", "endpoint p99", "endpoint p99 past debounce", "endpoint spread"):
        table.add_column(col, justify="right")
    for pilot, r in pairs:
        table.add_row(pilot.protocol, str(pilot.clients), _x(r["connect_p99"]), _x(r["connect"]),
                      _x(r["route_p99"]), _x(r["route_p99_past_debounce"]), _x(r["route_spread"]),
                      _x(r["endpoint_p99"]), _x(r["endpoint_p99_past_debounce"]), _x(r["endpoint_spread"]))
    return table


def _targets_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"targets ({TARGET_N} proxies: runs with N = {TARGET_N}; {MISSION}: runs with "
                        f">= {MISSION_SERVICES} services and per-workload classes; the replay: the baseline's figure; "
                        "CPU floor: (its CPU + the clients' per change) / cores, the least this machine allows; "
                        f"x the replay's: checked for changes that move >= {BYTES_BOUND_MB:g} MB where the replay's "
                        f"figure is >= {BYTES_BOUND_SHARE:g} of the limit, n/a where the bytes do not decide, p99s "
                        "past pilot's configured debounce; bytes: the change moves >= "
                        f"{BYTES_BOUND_MB:g} MB and {REPLAY_FACTOR:g}x the replay's figure misses the limit, so the "
                        "bytes decide and the row's x the replay's is its verdict; the bytes: per change, what every "
                        "proxy is sent and ACKs; for a p99 ratio, the ratio with the debounce)")
    for col in ("proto", "N", "scope", "target", "value", "limit", "met", "the replay", "CPU floor", "the bytes"):
        table.add_column(col)
    for row in rows:
        digits = 3 if row["unit"] in ("s", "vCPU") else 2 if row["unit"] in ("ms", "x") else 0
        table.add_row(row["protocol"], str(row["clients"]), row["scope"], row["target"],
                      f"{_num(row['value'], digits)} {row['unit']}", f"{row['op']} {row['limit']} {row['unit']}",
                      _verdict(row), _num(row.get("replay"), digits), _num(row.get("floor"), digits),
                      row.get("bytes") or row.get("with_debounce", ""))
    return table


def _verdict(row: dict[str, Any]) -> str:
    if row["met"] is not None:
        return "[green]yes[/]" if row["met"] else "[red]no[/]"
    return {False: "n/a", "bytes": "[yellow]bytes[/]"}.get(row.get("applies"), "-")
