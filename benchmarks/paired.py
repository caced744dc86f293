"""Pilot and the replay baseline measured change by change in turn, so the machine's drift falls on both.

Why: this 2-core machine's speed drifts by tens of percent over minutes (in four runs of one evening
the baseline's own SotW connect took 10.0 to 15.3 s), and under a host's steal a slow spell lasts
tens of seconds. Measuring all of pilot's phases and then the baseline's a minute later put that
drift into the pilot / baseline ratios, and each run's worst ratio came from whichever server drew
the slow minute. From session 17 to 42 both servers took turns by rounds (pilot's connect and
changes, then the baseline's, about 40 s each), and a slow spell could still fall on one server's
whole turn (session 43's C3: pilot's three route changes of one round at 1.5-2.0x the replay's p99
while the simulated Envoys, the same code on the same bytes, needed 1.15-1.6x their CPU). So since
session 43 both fleets stay connected through a round and the servers take turns change by change:

    round k: pilot's fleet connects, then the baseline's (pilot's fleet idle, connected);
             pilot route, baseline route, pilot endpoint, baseline endpoint (x `--changes`);
             both fleets disconnect.

A change on one server meets the other one idle with 2,000 quiet streams (pilot idles at ~0.02
vCPU, the baseline at ~0), and the pair of changes compared is seconds apart, not a minute.

What a run reports (`benchmarks.report.Run`): connect and change latencies pooled over the rounds
(p50, p99), "all connected" as the slowest round's, CPU per change averaged over every change of
the kind. Pilot's first round records the bytes the baseline replays: its initial config once
pilot's fleet has connected (the baseline starts with it), and each change as pilot made it (the
baseline learns it right before its own turn; later rounds replay the last of each kind). Idle
CPU, steady RSS and CPU per new class are read in each server's first round, after its connect;
the RSS after the changes once the first round's changes are done; every later round pauses as
long after each connect as the first round's idle window begins with (the server hands memory
back about a second after its last write). A reconnect in a later round is a fleet reconnecting
after config changes: pilot regenerates the classes it let go when the previous fleet left.
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


def _logger(side: _Side, log: Log) -> Log:
    """`log` with each line naming the side's server: the two take turns within a round."""
    return lambda text: log(f"  {side.run.server:8} {text.strip()}")


def _arrive(side: _Side, opts: Options, round_: int, log: Log, record: bool = False) -> None:
    """Connect the side's fleet; in the first round read its idle figures (and pilot's CPU per new
    class), in later ones pause as that idle window begins. Raises if the connect did not complete."""
    session, run, say = side.session, side.run, _logger(side, log)
    phase = _connect(session, side.target, opts.protocol == "delta", side.specs, record,
                     run.samples.setdefault("connect", []))
    run.phases.append(phase)
    say(_line(phase))
    if not phase.complete:
        raise RuntimeError(f"connect did not complete in round {round_ + 1}: {phase.error}")
    if round_ == 0:
        _idle(session, run, say)
        if side.debug:
            run.class_publish_cpu_s, run.class_publishes = class_publish_cpu(side.debug)
            say(f"CPU per new class: {_class_cpu(run)}")
    else:  # the same quiet pause the first round's idle window begins with: changes meet a settled server
        time.sleep(opts.quiet_seconds)


def _change(side: _Side, opts: Options, kind: str, index: int, round_: int, log: Log) -> Expectation:
    """One change of `kind` on the side's server, measured until every client has it. Raises if it
    did not complete."""
    session, run = side.session, side.run
    time.sleep(opts.settle)
    expectation, trigger = side.change(kind, index)
    session.call_all("arm", expectation)
    phase, t0 = session.measure(kind, "matched", opts.change_timeout, trigger)
    run.phases.append(phase)
    run.samples.setdefault(kind, []).extend(_latencies(session, t0))
    _logger(side, log)(_line(phase))
    if not phase.complete:
        raise RuntimeError(f"{kind} change did not complete in round {round_ + 1}: {phase.error}")
    return expectation


def _after_changes(side: _Side, log: Log) -> None:
    """The server's RSS once settled after the first round's changes, the fleet still connected:
    what it keeps after a spike. Steady state again, so held to the steady RSS limit; a server
    that keeps what a change's ACKs brought in (session 33: 148 KB per SotW proxy) shows here.
    The same quiet pause as before the steady RSS first: pilot hands free heap back 1 s after its
    last write (`pilot.quiet`), and RSS can hold still for the settle check's 0.75 s before that."""
    session, run = side.session, side.run
    settled = quiet_then_settled(session)
    run.after_rss_mb = median_rss(session.meter) / MB
    _logger(side, log)(f"after    RSS {run.after_rss_mb:.0f} MB, settled {settled:.2f} s after the changes "
                       f"(steady {run.steady_rss_mb:.0f} MB)")


@dataclass
class _Replay:
    """The baseline's side and how to teach it pilot's bytes (first round only)."""

    side: _Side
    server: WorkerHandle
    recording: Recording


@dataclass
class _Pair:
    """Both sides of a run, and which server the step under way is on (an error is that run's)."""

    ours: _Side
    opts: Options
    log: Log
    replay: _Replay | None = None
    current: Run | None = None

    @property
    def sides(self) -> list[_Side]:
        return [self.ours] if self.replay is None else [self.ours, self.replay.side]

    def on(self, side: _Side) -> _Side:
        self.current = side.run
        return side

    def changes(self, round_: int) -> None:
        """The round's changes, pilot's then the baseline's of the same kind, `opts.changes` of each."""
        opts, ours, replay = self.opts, self.ours, self.replay
        for j in range(opts.changes):
            for kind in KINDS:
                index = round_ * opts.changes + j
                expectation = _change(self.on(ours), opts, kind, index, round_, self.log)
                if replay is None:
                    continue
                if round_ == 0:  # the baseline replays the change pilot just made
                    changes = ours.session.handles[0].call("recorded_changes")
                    replay.recording.changes[kind] = changes[kind]
                    replay.recording.expectations[kind] = expectation
                    replay.server.call("learn", kind, changes[kind])
                _change(self.on(replay.side), opts, kind, index, round_, self.log)


def run_pair(group: ProcessGroup, opts: Options, log: Log, with_baseline: bool = True) -> list[Run]:
    """Pilot and (with `with_baseline`) the replay baseline in `opts.repeats` rounds, change by change in turn."""
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
        + (", pilot and baseline taking turns change by change" if with_baseline else ""))
    runs = [pilot_run]
    pair: _Pair | None = None
    with contextlib.ExitStack() as stack:
        stack.callback(group.stop, pilot.proc)
        try:
            meter = stack.enter_context(ResourceMeter(pilot.proc.pid))
            pair = _Pair(_Side(pilot_run, Session(group, opts, meter), pilot.ads, specs,
                               lambda kind, i: _file_edit(mesh, kind, i), pilot.debug), opts, log, current=pilot_run)
            pilot_run.empty_rss_mb = median_rss(meter) / MB
            for round_ in range(opts.repeats):
                log(f"  round {round_ + 1}:")
                _arrive(pair.on(pair.ours), opts, round_, log, record=round_ == 0)
                if round_ == 0 and with_baseline:
                    initial, _ = pair.ours.session.handles[0].call("recorded")
                    runs.append(base_run)
                    pair.current = base_run
                    pair.replay = stack.enter_context(
                        _baseline_side(group, opts, Recording(_by_type(initial), {}, {}, specs), base_run))
                if pair.replay is not None:
                    _arrive(pair.on(pair.replay.side), opts, round_, log)
                pair.changes(round_)
                if round_ == 0:
                    for side in pair.sides:
                        _after_changes(pair.on(side), log)
                    if pair.replay is not None:  # both servers sent the recorded bytes
                        rec = pair.replay.recording
                        wire = change_wire(rec.initial, rec.changes, opts.protocol == "delta")
                        pilot_run.wire = base_run.wire = {k: [w.response, w.ack] for k, w in wire.items()}
                for side in pair.sides:
                    side.session.call_all("disconnect", timeout=60)
        except Exception as exc:
            failed = pair.current if pair is not None and pair.current is not None else pilot_run
            failed.error = f"{type(exc).__name__}: {exc}"
            log(f"  [red]{failed.server}: {failed.error}[/]")
        finally:
            for side in pair.sides if pair is not None else []:
                with contextlib.suppress(Exception):
                    side.session.call_all("close")
                side.run.peak_rss_mb = side.session.meter.peak_rss / MB
    return runs


@contextlib.contextmanager
def _baseline_side(group: ProcessGroup, opts: Options, rec: Recording, run: Run) -> Iterator[_Replay]:
    """The baseline server replaying `rec` (its changes as they are learnt), with its own client
    workers; stopped on exit."""
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
            yield _Replay(side, server, rec)
            with contextlib.suppress(Exception):
                server.call("close", timeout=10)
    finally:
        group.stop(proc, grace=2)
