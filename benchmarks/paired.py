"""Pilot and the replay baseline measured in alternating rounds, so the machine's drift falls on both.

Why: this 2-core machine's speed drifts by tens of percent over minutes (in four runs of one evening
the baseline's own SotW connect took 10.0 to 15.3 s). Measuring all of pilot's phases and then the
baseline's a minute later put that drift into the pilot / baseline ratios, and each run's worst
ratio came from whichever server drew the slow minute. Here both servers stay up and take turns:
round k is pilot's connect, route change and endpoint change (`--changes N`: N of each, alternating),
then the same on the baseline.
After its turn a server's clients disconnect, so one fleet at a time shares the machine with one
busy server; the idle one costs nothing measurable (pilot idles at ~0.02 vCPU).

What a run reports (`benchmarks.report.Run`): connect and change latencies pooled over the rounds
(p50, p99), "all connected" as the slowest round's, CPU per change averaged over the rounds. Pilot's
first round records the bytes the baseline replays (its initial config and its first change of each
kind); idle CPU, steady RSS and CPU per new class are read in each server's first round, and every
later round pauses as long after its connect as the first round's idle window begins with (the
server hands memory back about a second after its last write). A reconnect
in a later round is a fleet reconnecting after config changes: pilot regenerates the classes it let
go when the previous fleet left.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from benchmarks import baseline, meshgen
from benchmarks.client import Expectation
from benchmarks.procs import ProcessGroup, ResourceMeter, class_publish_cpu, start_pilot
from benchmarks.report import KINDS, MB, Run
from benchmarks.runner import (
    Change,
    Options,
    Recording,
    Session,
    _by_type,
    _class_cpu,
    _connect,
    _file_edit,
    _idle,
    _latencies,
    _line,
    _push,
    median_rss,
    node_specs,
    pilot_debounce,
    pin,
    quiet_then_settled,
)
from benchmarks.wirebytes import change_wire
from benchmarks.worker import NodeSpec, WorkerHandle

Log = Callable[[str], None]


@dataclass
class _Side:
    """One server of the pair: its figures, its clients, and how a change is made on it."""

    run: Run
    session: Session
    target: str
    specs: list[NodeSpec]
    change: Change
    debug: str = ""  # pilot's debug address (CPU per new class); empty for the baseline


def _turn(side: _Side, opts: Options, round_: int, log: Log, record: bool = False) -> Recording | None:
    """One round on one server: connect its fleet, (first round: idle figures), `opts.changes`
    changes of each kind (alternating), disconnect. Returns what its recording client captured
    when `record`; raises on a phase that did not complete (the run's error)."""
    session, run = side.session, side.run
    phase = _connect(session, side.target, opts.protocol == "delta", side.specs, record,
                     run.samples.setdefault("connect", []))
    run.phases.append(phase)
    log(_line(phase))
    if not phase.complete:
        raise RuntimeError(f"connect did not complete in round {round_ + 1}: {phase.error}")
    if round_ == 0:
        _idle(session, run, log)
        if side.debug:
            run.class_publish_cpu_s, run.class_publishes = class_publish_cpu(side.debug)
            log(f"  CPU per new class: {_class_cpu(run)}")
    else:  # the same quiet pause the first round's idle window begins with: changes meet a settled server
        time.sleep(opts.quiet_seconds)
    expectations: dict[str, Expectation] = {}
    for kind, index in [(kind, round_ * opts.changes + j) for j in range(opts.changes) for kind in KINDS]:
        time.sleep(opts.settle)
        expectation, trigger = side.change(kind, index)
        session.call_all("arm", expectation)
        phase, t0 = session.measure(kind, "matched", opts.change_timeout, trigger)
        run.phases.append(phase)
        run.samples.setdefault(kind, []).extend(_latencies(session, t0))
        log(_line(phase))
        if not phase.complete:
            raise RuntimeError(f"{kind} change did not complete in round {round_ + 1}: {phase.error}")
        expectations[kind] = expectation
    if round_ == 0:
        _after_changes(session, run, log)
    recording = None
    if record:
        initial, changes = session.handles[0].call("recorded")
        recording = Recording(_by_type(initial), changes, expectations, side.specs)
    session.call_all("disconnect", timeout=60)
    return recording


def _after_changes(session: Session, run: Run, log: Log) -> None:
    """The server's RSS once settled after the first round's changes, the fleet still connected:
    what it keeps after a spike. Steady state again, so held to the steady RSS limit; a server
    that keeps what a change's ACKs brought in (session 33: 148 KB per SotW proxy) shows here.
    The same quiet pause as before the steady RSS first: pilot hands free heap back 1 s after its
    last write (`pilot.quiet`), and RSS can hold still for the settle check's 0.75 s before that."""
    settled = quiet_then_settled(session)
    run.after_rss_mb = median_rss(session.meter) / MB
    log(f"  after    RSS {run.after_rss_mb:.0f} MB, settled {settled:.2f} s after the changes "
        f"(steady {run.steady_rss_mb:.0f} MB)")


def run_pair(group: ProcessGroup, opts: Options, log: Log, with_baseline: bool = True) -> list[Run]:
    """Pilot and (with `with_baseline`) the replay baseline in `opts.repeats` alternating rounds."""
    pilot_run = Run("pilot", opts.protocol, opts.clients, opts.services, opts.class_count, opts.class_mode,
                    debounce_s=pilot_debounce(opts.pilot_env))
    base_run = Run("baseline", opts.protocol, opts.clients, opts.services, 1, "replay")
    case_dir = opts.workdir / f"{opts.protocol}-{opts.clients}"
    mesh = meshgen.generate(case_dir / "config", services=opts.services, namespaces=opts.namespaces)
    specs = node_specs(opts, mesh)
    pilot = start_pilot(group, mesh.directory, case_dir / "pilot.log", profile=opts.profile, env_extra=opts.pilot_env)
    if opts.pin:
        pin(pilot.proc.pid, server=True)
    log(f"pilot pid {pilot.proc.pid}: xDS {pilot.ads}, debug {pilot.debug}; {opts.clients} {opts.protocol} clients "
        f"in {opts.class_count} {opts.class_mode} classes; {opts.repeats} rounds"
        + (f" of {opts.changes} changes of each kind" if opts.changes > 1 else "")
        + (", pilot and baseline alternating" if with_baseline else ""))
    runs = [pilot_run]
    sides: list[_Side] = []
    with contextlib.ExitStack() as stack:
        stack.callback(group.stop, pilot.proc)
        current = pilot_run
        try:
            meter = stack.enter_context(ResourceMeter(pilot.proc.pid))
            sides.append(_Side(pilot_run, Session(group, opts, meter), pilot.ads, specs,
                               lambda kind, i: _file_edit(mesh, kind, i), pilot.debug))
            pilot_run.empty_rss_mb = median_rss(meter) / MB
            log("  round 1, pilot:")
            recording = _turn(sides[0], opts, 0, log, record=True)
            if recording is not None:  # both servers send the recorded bytes
                wire = change_wire(recording.initial, recording.changes, opts.protocol == "delta")
                pilot_run.wire = base_run.wire = {k: [w.response, w.ack] for k, w in wire.items()}
            if with_baseline and recording is not None:
                runs.append(base_run)
                current = base_run
                sides.append(stack.enter_context(_baseline_side(group, opts, recording, base_run)))
                log("  round 1, baseline (replayed bytes, no pilot logic):")
                _turn(sides[1], opts, 0, log)
            for round_ in range(1, opts.repeats):
                for side in sides:
                    current = side.run
                    log(f"  round {round_ + 1}, {side.run.server}:")
                    _turn(side, opts, round_, log)
        except Exception as exc:
            current.error = f"{type(exc).__name__}: {exc}"
            log(f"  [red]{current.server}: {current.error}[/]")
        finally:
            for side in sides:
                with contextlib.suppress(Exception):
                    side.session.call_all("close")
                side.run.peak_rss_mb = side.session.meter.peak_rss / MB
    return runs


@contextlib.contextmanager
def _baseline_side(group: ProcessGroup, opts: Options, rec: Recording, run: Run) -> Iterator[_Side]:
    """The baseline server replaying `rec`, with its own client workers; stopped on exit."""
    conn, proc = group.spawn(baseline.main, rec.initial, rec.changes)
    try:
        if opts.pin:
            pin(proc.pid, server=True)
        if not conn.poll(30):
            raise TimeoutError("baseline server did not report its port in 30s")
        server = WorkerHandle(conn, proc)
        target = f"127.0.0.1:{conn.recv()}"
        with ResourceMeter(proc.pid) as meter:
            run.empty_rss_mb = median_rss(meter) / MB
            side = _Side(run, Session(group, opts, meter, server="baseline"), target, rec.nodes,
                         lambda kind, i: (rec.expectations[kind], lambda: _push(server, kind)))
            yield side
            with contextlib.suppress(Exception):
                server.call("close", timeout=10)
    finally:
        group.stop(proc, grace=2)
