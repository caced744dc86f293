"""The targets a benchmark run is checked against: the issue's limits at 1,000 proxies and at
mission scale, and pilot's figures against the replay baseline's where the bytes decide.

A row per target and run (`Target.check`, `ReplayTarget.check`), as `benchmarks.report` prints
and writes them: the value, the limit, whether it was met, and the replay's figure and the bytes
next to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from benchmarks.wirebytes import ChangeWire, arithmetic

if TYPE_CHECKING:
    from benchmarks.report import Run

# Targets at 1,000 proxies.
TARGET_N = 1000
TARGET_ROUTE_P99 = 1.0
TARGET_ENDPOINT_P99 = 0.3
TARGET_RSS_MB = 300.0
# Mission scale: runs with at least this many services and one config class per workload.
MISSION_SERVICES = 1000


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either was not measured or b is not positive."""
    return a / b if b > 0 and not math.isnan(a) and not math.isnan(b) else math.nan


@dataclass(frozen=True)
class Target:
    """One limit on one figure of a pilot run; `applies` picks the runs it is checked on."""

    scope: str
    name: str
    op: str  # "<" or "<="
    limit: float
    unit: str
    value: Callable[[Run], float | None]
    applies: Callable[[Run], bool]
    floor: str = ""  # a change kind: the row also shows the baseline's `cpu_floor` for it
    change: str = ""  # the change kind whose bytes drive the figure: the row shows their arithmetic

    def within(self, value: float) -> bool:
        return value < self.limit if self.op == "<" else value <= self.limit

    def check(self, run: Run, base: Run | None = None, cores: int = 0) -> dict[str, Any]:
        """The row for one run: met is None when the figure is not available (not exported).
        With the baseline of the same run, the row shows the baseline's figure too ("replay":
        the same bytes with no pilot logic, on the same machine) and, for a change's latency,
        the least the machine allows (`Run.cpu_floor` of the baseline): the arithmetic next to
        a limit that the bytes, not pilot, may decide. A change's figure is bytes-bound (`applies`
        "bytes", met None) if the change moves many bytes (`heavy`) and a server within the issue's
        allowance of the replay (`REPLAY_FACTOR` times its figure) could miss the limit: there the
        two rules contradict, the limit failing a server the 1.2x rule passes, and the issue's
        rule for bytes that must be written regardless decides: its `REPLAY_TARGETS` row (pilot
        within 1.2x of the replay) is the verdict. (Until session 42 only a replay missing the
        limit itself made the figure bytes-bound; a replay at 0.49 s of a 0.5 s limit left pilot
        1.02x of it.) A change of few bytes keeps its limit, however close the replay comes: what
        the machine cannot do there is not the bytes' doing."""
        value = self.value(run)
        met: bool | None = None
        if value is not None:
            met = bool(self.within(value) and run.converged)
        replay: float | None = None
        floor: float | None = None
        applies: bool | str = True
        if base is not None and base.converged:
            replay = self.value(base)
            floor = base.cpu_floor(self.floor, cores) if self.floor else None
            if (self.change and replay is not None and not math.isnan(replay)
                    and not self.within(replay * REPLAY_FACTOR) and heavy(run, self.change)):
                met, applies = None, "bytes"
        wire = run.wire.get(self.change) if self.change else None
        return {"protocol": run.protocol, "clients": run.clients, "services": run.services, "scope": self.scope,
                "target": self.name, "value": value, "op": self.op, "limit": self.limit, "unit": self.unit,
                "met": met, "replay": replay, "floor": floor, "applies": applies,
                "bytes": arithmetic(run.clients, ChangeWire(*wire)) if wire else ""}


def _at_1000(run: Run) -> bool:
    return run.clients == TARGET_N


def _mission(run: Run) -> bool:
    return run.mission_scale


MISSION = "mission scale"
MISSION_P99 = {"route": 1.0, "endpoint": 0.3}  # the p99 limits per change at mission scale, seconds
MISSION_CPU_PER_ROUTE_CHANGE = 0.5  # seconds of the server's CPU
TARGETS = (
    Target(f"{TARGET_N} proxies", "route change p99", "<", TARGET_ROUTE_P99, "s",
           lambda r: r.pooled("route").p99, _at_1000),
    Target(f"{TARGET_N} proxies", "endpoint change p99", "<", TARGET_ENDPOINT_P99, "s",
           lambda r: r.pooled("endpoint").p99, _at_1000),
    Target(f"{TARGET_N} proxies", "pilot peak RSS", "<", TARGET_RSS_MB, "MB", lambda r: r.peak_rss_mb, _at_1000),
    Target(MISSION, "steady RSS", "<=", 300.0, "MB", lambda r: r.steady_rss_mb, _mission),
    Target(MISSION, "peak RSS", "<=", 500.0, "MB", lambda r: r.peak_rss_mb, _mission),
    Target(MISSION, "RSS after the changes", "<=", 300.0, "MB", lambda r: r.after_rss_mb, _mission),
    Target(MISSION, "route change p99", "<", MISSION_P99["route"], "s", lambda r: r.pooled("route").p99, _mission,
           "route", "route"),
    Target(MISSION, "endpoint change p99", "<", MISSION_P99["endpoint"], "s", lambda r: r.pooled("endpoint").p99,
           _mission, "endpoint", "endpoint"),
    Target(MISSION, "all connected and ACKed", "<", 15.0, "s", lambda r: r.connected_all_s, _mission),
    Target(MISSION, "pilot CPU per route change", "<", MISSION_CPU_PER_ROUTE_CHANGE, "s",
           lambda r: r.cpu_per_change("route"), _mission, change="route"),
    Target(MISSION, "CPU per new class", "<=", 1.0, "ms", lambda r: r.class_cpu_ms, _mission),
    Target(MISSION, "idle CPU", "<=", 0.05, "vCPU", lambda r: r.idle_vcpu, _mission),
)
# Where bytes must be written regardless, pilot must not be the bottleneck: at mission scale its
# p99 within this factor of the baseline's (the replay of the same bytes) in the same run.
REPLAY_FACTOR = 1.2
# When the bytes decide: the change moves at least this many megabytes between pilot and its
# proxies, both ways (`heavy`), and the replay alone takes at least `BYTES_BOUND_SHARE` of the
# change's absolute limit. The case is a SotW route change at mission scale: 2,000 x
# 0.57 MB = 1.1 GB out (a SotW endpoint change moves 0.3 GB: every EDS ACK repeats ~3,000 names).
# A delta change moves ~1.6 MB, 60x under this line: there the replay's time is 2,000 simulated
# Envoys waking on the two shared cores, not bytes, and the absolute limit is the verdict.
BYTES_BOUND_MB = 100.0
BYTES_BOUND_SHARE = 0.5


def heavy(run: Run, change: str) -> bool:
    """Whether a change of `change`'s kind moves at least `BYTES_BOUND_MB` in `run` (responses out
    and ACKs in, for every proxy). False when the bytes were not recorded: the limit then stands."""
    wire = run.wire.get(change)
    return wire is not None and run.clients * sum(wire) >= BYTES_BOUND_MB * 1e6


@dataclass(frozen=True)
class ReplayTarget:
    """A change's figure against the baseline's in the same run, pilot's over the replay's: its
    p99 pooled over the rounds from the end of pilot's configured debounce, and pilot's CPU per
    route change (the issue's "pilot must not be the bottleneck" where 1.1 GB must be written
    whoever writes it). Checked only where the bytes decide (`heavy`, and the replay takes at least
    `BYTES_BOUND_SHARE` of the absolute limit); otherwise `met` is None and `applies` says why.

    Why past the debounce: pilot waits `debounce_ms` (Istio's PILOT_DEBOUNCE_AFTER, 100 ms) after
    a config change before it builds, on purpose and as configured, while the replay writes at
    once. Counted in, that wait alone is 0.1 s of the 1.2x's 0.12 s allowance at a replay p99 of
    0.6 s: a server exactly as fast as the replay at writing would miss the rule whenever the
    replay's p99 is under ~0.55 s. The wait is not pilot being the bottleneck; the absolute p99
    limit still counts it, and the row shows the ratio with it too."""

    target: Target  # a mission-scale figure a change's bytes drive (`Target.change`)
    waits: bool = False  # a latency: pilot's configured debounce for the change comes off its figure

    def _of(self, run: Run) -> float:
        found = self.target.value(run)
        return math.nan if found is None else found

    def check(self, run: Run, base: Run) -> dict[str, Any]:
        replay = self._of(base)
        wait = run.debounce_s.get(self.target.change, 0.0) if self.waits else 0.0
        found = ratio(self._of(run) - wait, replay)
        value = None if math.isnan(found) else found
        bound = heavy(run, self.target.change) and replay >= BYTES_BOUND_SHARE * self.target.limit
        met = None if value is None or not bound else bool(value <= REPLAY_FACTOR and run.converged
                                                           and base.converged)
        name = f"{self.target.name}{' past the debounce' if self.waits else ''} / the replay's"
        with_wait = ratio(self._of(run), replay)
        shown = bool(wait) and not math.isnan(with_wait)
        note = f"{with_wait:.2f}x with the debounce ({wait * 1000:.0f} ms)" if shown else ""
        return {"protocol": run.protocol, "clients": run.clients, "services": run.services, "scope": MISSION,
                "target": name, "value": value, "op": "<=", "limit": REPLAY_FACTOR, "unit": "x", "met": met,
                "replay": replay, "floor": None, "applies": bound, "bytes": "", "with_debounce": note}


# One per change-driven mission figure: route and endpoint p99 (past the debounce: the latencies, the
# targets that show the machine's floor), CPU per route change.
REPLAY_TARGETS = tuple(ReplayTarget(t, waits=t.floor != "") for t in TARGETS if t.scope == MISSION and t.change)


def target_rows(pairs: Sequence[tuple[Run, Run | None]], cores: int) -> list[dict[str, Any]]:
    """Every target's row for every pilot run it applies to (each with the baseline run of the same
    protocol and N, if any); at mission scale, with the baseline, also the rows of `REPLAY_TARGETS`."""
    rows = []
    for run, base in pairs:
        rows += [t.check(run, base, cores) for t in TARGETS if t.applies(run)]
        if base is not None and _mission(run):
            rows += [t.check(run, base) for t in REPLAY_TARGETS]
    return rows
