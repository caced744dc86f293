"""One benchmark run: a server process, client workers, and the phases measured against it.

The coordinator is synchronous: it starts processes, sends commands to the workers and polls
their status every 50 ms, with a deadline on every wait. Phases: connect (all clients ACK
their full initial config), then route and endpoint changes, each repeated. For pilot the
trigger is a file write; for the baseline server it is a `push` command. All processes are
owned by the caller's ProcessGroup, which kills them whatever happens.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

from benchmarks import baseline, meshgen, worker
from benchmarks.client import ClientResult, Expectation
from benchmarks.goworker import GoWorkerHandle
from benchmarks.procs import ProcessGroup, ResourceMeter, cpu_of, machine_steal
from benchmarks.report import MB, PER_WORKLOAD, Latency, Phase, Run
from benchmarks.worker import NodeSpec, WorkerHandle
from pilot.settings import PilotSettings

POLL = 0.05


@dataclass(frozen=True)
class Options:
    clients: int
    protocol: str  # sotw | delta
    workdir: Path
    services: int = 50
    namespaces: int = 1  # the services spread over this many namespaces (meshgen.generate)
    classes: int = 10  # fixed class count, unless per_workload
    per_workload: bool = False  # every proxy poses as one of the mesh's workloads
    repeats: int = 3
    # Changes of each kind per round (`benchmarks.paired`): route, endpoint, route, ... on the same
    # fleet. More than one narrows the CPU-per-change mean (averaged over rounds x changes) at the
    # cost of one more change each, not of a reconnect.
    changes: int = 1
    workers: int = 0  # 0: chosen from the client count
    settle: float = 0.5  # pause between changes, seconds
    idle_seconds: float = 3.0  # idle window after connect, for idle CPU and steady RSS
    quiet_seconds: float = 2.0  # pause after connect before that window opens
    pilot_env: dict[str, str] = field(default_factory=dict)
    profile: Path | None = None
    pin: bool = False  # server on the first core, clients on the others (as Envoys would be elsewhere)
    sample_dir: Path | None = None  # py-spy the server during each change, one raw file per change
    client: str = "python"  # python (benchmarks.worker) | go (benchmarks.goworker: benchmarks/simenvoy)
    # Simulated Envoys per TCP connection: 1, as Envoy (each proxy's ADS stream has its own
    # connection); sessions up to 34 ran 250 per connection (`--streams-per-connection`).
    streams_per_connection: int = 1

    @property
    def worker_count(self) -> int:
        """1 worker up to 300 clients, 2 up to 2,000 (one per core on a 2-core box), then 4; the
        Go clients need one process for any number (Go spreads the streams over the cores)."""
        if self.workers:
            return self.workers
        if self.client == "go":
            return 1
        return 1 if self.clients <= 300 else 2 if self.clients <= 2000 else 4

    @property
    def class_count(self) -> int:
        """Config classes the clients actually fall into (round-robin, so at most one per client)."""
        available = 2 * self.services if self.per_workload else self.classes
        return min(available, self.clients)

    @property
    def class_mode(self) -> str:
        return PER_WORKLOAD if self.per_workload else "fixed"

    @property
    def connect_timeout(self) -> float:
        """Generous: pilot builds every class's snapshot while clients connect (~45 s for 2,000)."""
        return 60 + self.clients * 0.06 + self.class_count * 0.03

    @property
    def change_timeout(self) -> float:
        """A route change rebuilds every class (~50 s at 2,000 classes today); a timeout still reports."""
        return 30 + self.clients * 0.01 + self.class_count * 0.05


@dataclass
class Recording:
    """Responses captured from pilot by one client, replayed by the baseline server."""

    initial: dict[str, list[bytes]]
    changes: dict[str, bytes]
    expectations: dict[str, Expectation]
    nodes: list[NodeSpec]  # pilot's clients, so the baseline's send the same requests


def nodes(count: int, classes: int) -> list[NodeSpec]:
    """`count` proxies spread round-robin over `classes` (namespace, labels) combinations."""
    out = []
    for i in range(count):
        k = i % classes
        ns = f"team-{k // 2}"
        labels = (("app", "loadgen"), ("tier", "ab"[k % 2]))
        out.append(NodeSpec(f"sidecar~10.99.{i // 250}.{i % 250}~loadgen-{i}.{ns}~{ns}.svc.cluster.local", ns, labels))
    return out


def workload_nodes(count: int, workloads: Sequence[meshgen.Workload]) -> list[NodeSpec]:
    """`count` proxies posing round-robin as the mesh's workloads: one config class per workload.

    Namespace and labels are exactly those of the workload's WorkloadEntries, so pilot gives
    each proxy that workload's inbound listener and cluster, as it would a real sidecar.
    """
    out = []
    for i in range(count):
        w = workloads[i % len(workloads)]
        ns = w.namespace
        name = f"{w.service}-{w.subset}"
        node_id = f"sidecar~{w.address}~{name}-{i // len(workloads)}.{ns}~{ns}.svc.cluster.local"
        out.append(NodeSpec(node_id, ns, w.labels, workload=name))
    return out


def node_specs(opts: Options, mesh: meshgen.MeshConfig) -> list[NodeSpec]:
    if opts.per_workload:
        return workload_nodes(opts.clients, mesh.workloads())
    return nodes(opts.clients, opts.classes)


def pin(pid: int, server: bool) -> None:
    """Give the server the first core and everything else the rest (no-op on one core).

    Unpinned, the simulated Envoys steal the control plane's CPU, which real Envoys on other
    machines never do; both readings are worth having.
    """
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return
    chosen = cores[:1] if server else cores[1:]
    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        proc.cpu_affinity(chosen)


class Session:
    """Client workers connected to one server, with that server's resource meter.

    `node` is the Node each Go client sends and `worker_main` the Python workers' entry point:
    a plain sidecar's here, a Pod's in `kube_load.CapturedSession`."""

    node: Callable[[NodeSpec], Any] = staticmethod(worker.Worker.node)
    worker_main: Callable[[Connection], None] = staticmethod(worker.main)

    def __init__(self, group: ProcessGroup, opts: Options, meter: ResourceMeter, server: str = "pilot") -> None:
        self.opts = opts
        self.meter = meter
        self.server = server
        self.changes = 0
        self.handles: list[WorkerHandle | GoWorkerHandle] = []
        for _ in range(opts.worker_count):
            if opts.client == "go":
                handle: WorkerHandle | GoWorkerHandle = GoWorkerHandle.start(
                    group, opts.workdir / "simenvoy.log", node=self.node)
            else:
                conn, proc = group.spawn(self.worker_main)
                handle = WorkerHandle(conn, proc)
            self.handles.append(handle)
            if opts.pin:
                pin(handle.process.pid, server=False)

    def call_all(self, name: str, *args: Any, timeout: float = 30.0) -> list[Any]:
        return [h.call(name, *args, timeout=timeout) for h in self.handles]

    def client_cpu(self) -> float:
        return cpu_of([h.process for h in self.handles])

    def wait(self, key: str, timeout: float) -> tuple[int, str]:
        """Poll until every client has `key` (ready|matched); (count, error if it timed out)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.call_all("status")
            done = sum(s[key] for s in status)
            if done == self.opts.clients:
                return done, ""
            if time.monotonic() > deadline:
                first_error = next((s["first_error"] for s in status if s["first_error"]), "")
                return done, (f"timed out after {timeout:.0f}s: {done}/{self.opts.clients} clients"
                              + (f"; last stream error: {first_error}" if first_error else ""))
            time.sleep(POLL)

    def reconnects(self) -> int:
        return sum(s["reconnects"] for s in self.call_all("status"))

    def results(self) -> list[ClientResult]:
        return [r for rs in self.call_all("results", timeout=60) for r in rs]

    @contextlib.contextmanager
    def _sampled(self, phase: str) -> Iterator[None]:
        """py-spy the server while a phase runs (`sample_dir`: connect and each change), to read where its CPU goes."""
        if self.opts.sample_dir is None:
            yield
            return
        self.changes += 1
        out = self.opts.sample_dir / f"{self.server}-{self.opts.protocol}-{self.changes:02d}-{phase}.txt"
        found = py_spy()
        if found is None:
            raise FileNotFoundError("--sample-dir needs py-spy: pip install py-spy (it is in meshctl[test])")
        spy = subprocess.Popen([found, "record", "--pid", str(self.meter.proc.pid), "--rate", "250",
                                "--format", "raw", "--nonblocking", "--output", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # let it attach before the change starts
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(10)

    def measure(self, name: str, key: str, timeout: float, trigger: Callable[[], float]) -> tuple[Phase, float]:
        """Mark, trigger (returns the trigger time), wait for every client, build the Phase."""
        self.meter.mark()
        client_cpu = self.client_cpu()
        reconnects = self.reconnects()
        steal = machine_steal()
        with self._sampled(name):
            t0 = trigger()
            done, error = self.wait(key, timeout)
        steal = machine_steal() - steal
        split, peak = self.meter.phase_split()
        stamps = [getattr(r, f"{key}_at") for r in self.results()]
        latency = Latency.of([t - t0 for t in stamps if t is not None])
        phase = Phase(name, self.opts.clients, done, latency, split.cpu, peak / MB, self.client_cpu() - client_cpu,
                      self.reconnects() - reconnects, error, split.system, split.minor_faults,
                      {name: round(seconds, 4) for name, seconds in split.threads if seconds > 0},
                      round(steal, 2))
        return phase, t0


def _connect(session: Session, target: str, delta: bool, specs: list[NodeSpec], record: bool,
             samples: list[float] | None = None) -> Phase:
    """Connect the fleet and wait until every client ACKed its initial config; each client's
    latency is added to `samples` when given (pooled over rounds, `benchmarks.paired`)."""
    opts = session.opts
    shares = [specs[i::len(session.handles)] for i in range(len(session.handles))]

    def trigger() -> float:
        t0 = time.monotonic()
        for i, (handle, share) in enumerate(zip(session.handles, shares, strict=True)):
            handle.call("connect", target, delta, share, record and i == 0, opts.streams_per_connection)
        return t0

    phase, t0 = session.measure("connect", "ready", opts.connect_timeout, trigger)
    if samples is not None:
        samples.extend(r.ready_at - t0 for r in session.results() if r.ready_at is not None)
    return phase


def run_baseline(group: ProcessGroup, opts: Options, rec: Recording, log: Callable[[str], None]) -> Run:
    run = Run("baseline", opts.protocol, opts.clients, opts.services, 1, "replay")
    conn, proc = group.spawn(baseline.main, rec.initial, rec.changes)
    if opts.pin:
        pin(proc.pid, server=True)
    try:
        if not conn.poll(30):
            raise TimeoutError("baseline server did not report its port in 30s")
        server = WorkerHandle(conn, proc)
        target = f"127.0.0.1:{conn.recv()}"
        with ResourceMeter(proc.pid) as meter:
            session = Session(group, opts, meter, server="baseline")
            run.empty_rss_mb = median_rss(meter) / MB
            run.phases.append(_connect(session, target, opts.protocol == "delta", rec.nodes, record=False))
            log(_line(run.phases[-1]))
            if run.phases[-1].complete:
                _idle(session, run, log)

                def push(kind: str, i: int) -> tuple[Expectation, Callable[[], float]]:
                    return rec.expectations[kind], lambda: _push(server, kind)

                _changes(session, run, log, push)
            session.call_all("close")
            run.peak_rss_mb = meter.peak_rss / MB
        server.call("close", timeout=10)
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        group.stop(proc, grace=2)
    return run


def pilot_debounce(env: dict[str, str]) -> dict[str, float]:
    """Seconds pilot waits on purpose before pushing each kind of change the benchmark makes, as
    configured (`env` overrides the defaults): a route edit takes the debounce, a WorkloadEntry
    edit the endpoint debounce (`pilot.settings.PilotSettings`)."""
    fields = PilotSettings.model_fields

    def ms(name: str) -> float:
        value = env.get(f"MESHCTL_PILOT_{name.upper()}", fields[name].default)
        return int(value) / 1000

    return {"route": ms("debounce_ms"), "endpoint": ms("endpoint_debounce_ms")}


def py_spy() -> str | None:
    """py-spy's executable: on PATH, or beside this Python (a venv run without activating it)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def median_rss(meter: ResourceMeter, samples: int = 5, interval: float = 0.2) -> float:
    """Median of a few RSS readings, so one allocation burst or GC does not decide it."""
    readings = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        readings.append(meter.rss())
    return float(statistics.median(readings))


def settled_rss(rss: Callable[[], int], step: float = 0.25, span: int = 4, tolerance: float = 0.01,
                 limit: float = 10.0, sleep: Callable[[float], None] = time.sleep) -> float:
    """Seconds until the server's RSS stopped moving: its last `span` readings, `step` apart,
    within `tolerance` of their largest (at most `limit` seconds).

    Why: pilot hands memory back (garbage collection, free heap pages to the OS) once its streams
    have been quiet for a while (`pilot.quiet`); on a slow spell that came after the fixed quiet
    pause, and the steady RSS read before it (session 31, V3: 323 MB, 292 MB seconds later)
    measured the connect's leftovers, not pilot at rest.
    """
    readings: list[int] = []
    waited = 0.0
    while waited < limit:
        readings = [*readings[-(span - 1):], rss()]
        if len(readings) == span and max(readings) - min(readings) <= tolerance * max(readings):
            break
        sleep(step)
        waited += step
    return waited


def quiet_then_settled(session: Session) -> float:
    """The quiet pause (`quiet_seconds`, the server left alone), then until its RSS has settled
    (`settled_rss`); the seconds both took."""
    time.sleep(session.opts.quiet_seconds)
    return session.opts.quiet_seconds + settled_rss(session.meter.rss)


def _idle(session: Session, run: Run, log: Callable[[str], None]) -> None:
    """After connect: a quiet pause, until pilot's RSS has settled (`settled_rss`), then the idle
    window (server CPU, and RSS sampled across it).

    Nothing is sent to the server meanwhile and the workers are not polled, so what the server
    spends is its own idle cost (timers, watchers, GC); its RSS then holds every stream and class.
    """
    opts = session.opts
    run.settled_after_s = quiet_then_settled(session)
    run.connections = session.meter.inbound_connections()  # read before the idle window, not inside it
    started = session.meter.cpu()
    samples = 5
    run.steady_rss_mb = median_rss(session.meter, samples, opts.idle_seconds / samples) / MB
    time.sleep(opts.idle_seconds / samples)
    run.idle_cpu_s = session.meter.cpu() - started
    run.idle_seconds = opts.idle_seconds
    per_class = "" if math.isnan(run.kb_per_class) else f", {run.kb_per_class:.1f} KB per class"
    log(f"  idle     RSS empty {run.empty_rss_mb:.0f} MB, steady {run.steady_rss_mb:.0f} MB with "
        f"{run.connections:,} TCP connections ({run.kb_per_stream:.1f} KB per stream+class{per_class}; "
        f"settled {run.settled_after_s:.2f} s after connect), idle {run.idle_vcpu:.3f} vCPU")


Change = Callable[[str, int], tuple[Expectation, Callable[[], float]]]


def _changes(session: Session, run: Run, log: Callable[[str], None], change: Change) -> dict[str, Expectation]:
    """Route then endpoint changes, `repeats` times each; returns the last expectation per kind."""
    last: dict[str, Expectation] = {}
    for kind in ("route", "endpoint"):
        for i in range(session.opts.repeats):
            time.sleep(session.opts.settle)
            expectation, trigger = change(kind, i)
            session.call_all("arm", expectation)
            phase, t0 = session.measure(kind, "matched", session.opts.change_timeout, trigger)
            run.phases.append(phase)
            run.samples.setdefault(kind, []).extend(_latencies(session, t0))
            log(_line(phase))
            last[kind] = expectation
            if not phase.complete:
                return last
    return last


def _latencies(session: Session, t0: float) -> list[float]:
    return [r.matched_at - t0 for r in session.results() if r.matched_at is not None]


def _file_edit(mesh: meshgen.MeshConfig, kind: str, i: int) -> tuple[Expectation, Callable[[], float]]:
    service = i * 7 + (0 if kind == "route" else 3)  # spread edits over services
    if kind == "route":
        expectation = Expectation.route(mesh.route_change(service))
    else:
        expectation = Expectation.endpoint(mesh.endpoint_change(service))
    return expectation, lambda: mesh.write_service(service)


def _push(server: WorkerHandle, kind: str) -> float:
    t0 = time.monotonic()
    server.call("push", kind)
    return t0


def _by_type(initial: list[tuple[str, bytes]]) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {}
    for type_url, raw in initial:
        out.setdefault(type_url, []).append(raw)
    return out


def _line(phase: Phase) -> str:
    lat = phase.latency
    ms = "-" if math.isnan(lat.p99) else f"p50 {lat.p50 * 1000:.0f} ms, p99 {lat.p99 * 1000:.0f} ms"
    status = "" if phase.complete else f" [{phase.error}]"
    retried = f", {phase.reconnects} streams reopened" if phase.reconnects else ""
    return (f"  {phase.name:8s} {phase.converged}/{phase.clients} converged, {ms}, "
            f"server CPU {phase.server_cpu_s:.2f}s ({phase.server_system_s:.2f}s system, "
            f"{phase.server_minor_faults:,} minor faults{_threads(phase)}), RSS {phase.server_peak_rss_mb:.0f} MB"
            f"{_steal(phase)}{retried}{status}")


def _steal(phase: Phase) -> str:
    """", host steal 0.15 s" (the machine's CPUs summed, `procs.machine_steal`), or nothing if none."""
    return f", host steal {phase.machine_steal_s:.2f} s" if phase.machine_steal_s > 0 else ""


def _threads(phase: Phase) -> str:
    """"; by thread: main 0.40, event_engine 0.13, python 0.05" (seconds; threads under 5 ms left
    out), or nothing if unknown or every thread was under that."""
    if not phase.server_threads:
        return ""
    busiest = sorted(((n, s) for n, s in phase.server_threads.items() if s >= 0.005), key=lambda item: -item[1])
    if not busiest:
        return ""
    return "; by thread: " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in busiest)


def _class_cpu(run: Run) -> str:
    ms = run.class_cpu_ms
    if ms is None:
        return "- (pilot does not export pilot_class_publish_cpu_seconds)"
    return f"{ms:.2f} ms ({run.class_publishes} publishes)"
