"""Kubernetes benchmark: pilot watching a real API server, and N simulated sidecars of its Pods.

    python -m benchmarks.kube_load --services 1000 --pods 5000 --proxies 1000 --json out.json

Starts etcd, kube-apiserver and kube-controller-manager (`tests.k8s.cluster`, the suite's own
control plane, on free loopback ports), installs the CRDs of `manifests/`, and then, printing the
load average before and after each phase:

1. **empty**: `meshctl up --kubeconfig` on the empty cluster: start time, CPU and RSS;
2. **load**: with that pilot watching, creates the Pods (bound to one Node, status Ready and
   podIP patched as a kubelet would), a DestinationRule and VirtualService per service, then the
   Services in the API server through kubernetes_asyncio, `--concurrency` requests at a time;
   kube-controller-manager makes the EndpointSlices; pilot's CPU and RSS until it is quiet;
3. **initial sync**: a second pilot started on the full cluster: time from spawn to its first
   push (pilot waits for its watches' first lists before it), CPU and RSS, against the empty
   pilot's start measured in phase 1;
4. **proxies**: `--proxies` simulated Envoys (`ads_load`'s: the Go ones by default, `--client
   python` for the grpcio ones) posing as the Pods' sidecars (captured traffic) connect; steady
   RSS and idle CPU; route changes (a merge patch of a VirtualService through the API) and
   endpoint changes (a Pod's Ready condition flipped in the API server; kube-controller-manager
   updates the EndpointSlice) timed to each proxy's ACK;
5. **baseline**: the same proxies and changes against `ads_load`'s replay server (the bytes
   pilot sent, no logic), for the fan-out ratio.

Every process started is stopped at the end, on errors too; the cluster's files are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
from envoy.service.discovery.v3 import discovery_pb2
from rich.console import Console

from benchmarks import kube_worker
from benchmarks import kubeobjects as ko
from benchmarks.ads_load import machine_info
from benchmarks.client import Expectation, first_string
from benchmarks.kube_tables import load_average, print_kube_report
from benchmarks.kubedriver import KubeDriver
from benchmarks.procs import REPO, ProcessGroup, ResourceMeter
from benchmarks.report import (
    MB,
    Report,
    Run,
    _nan_to_none,
)
from benchmarks.runner import (
    Options,
    Recording,
    Session,
    _by_type,
    _changes,
    _connect,
    _idle,
    _line,
    median_rss,
    run_baseline,
)
from benchmarks.worker import NodeSpec
from pilot.xds.typeurls import CLUSTER, ROUTE
from tests.k8s.cluster import KubeCluster, cached_tools

CRDS = REPO / "manifests" / "crds.yaml"
_READY = re.compile(r"pilot: xDS on ([\d.]+:\d+).*?, debug on http://([\d.]+:\d+)")
NOT_SYNCED = "not synced after"
PILOT_ENV = {"MESHCTL_PILOT_KUBE_SYNC_TIMEOUT_MS": "900000"}  # the first push really waits for every Service
SLICE_TIMEOUT_S = 900.0
QUIET_VCPU = 0.05  # pilot counts as caught up once it uses less than this over a second


@dataclass(frozen=True)
class KubeOptions:
    """Cluster size, proxies and the `ads_load` knobs reused (repeats, workers, idle window)."""

    services: int = 1000
    pods: int = 5000
    proxies: int = 1000
    protocol: str = "sotw"
    repeats: int = 3
    workers: int = 0
    concurrency: int = 32
    idle_seconds: float = 3.0
    quiet_seconds: float = 2.0
    baseline: bool = True
    workdir: Path = Path()
    client: str = "go"  # the simulated Envoys: "go" (benchmarks/simenvoy) or "python" (kube_worker)

    def runner_options(self) -> Options:
        """The `ads_load` options its session machinery reads (one class per posed workload)."""
        return Options(clients=self.proxies, protocol=self.protocol, workdir=self.workdir, services=self.services,
                       per_workload=True, repeats=self.repeats, workers=self.workers,
                       idle_seconds=self.idle_seconds, quiet_seconds=self.quiet_seconds, client=self.client)


@dataclass
class LoadReading:
    """The 1/5/15-minute load average before and after one phase (the machine may be shared)."""

    phase: str
    before: tuple[float, float, float]
    after: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class PilotFigures:
    """What pilot cost while watching the cluster (seconds, CPU seconds, MB); NaN: not measured."""

    empty_start_s: float = float("nan")  # spawn -> serving, empty cluster
    empty_start_cpu_s: float = float("nan")
    empty_rss_mb: float = float("nan")
    load_cpu_s: float = float("nan")  # while the objects were created, until pilot was quiet
    load_caught_up_s: float = float("nan")  # from the last create until quiet
    load_peak_rss_mb: float = float("nan")
    loaded_rss_mb: float = float("nan")  # the watching pilot, after it caught up
    sync_s: float = float("nan")  # spawn -> first push, full cluster
    sync_cpu_s: float = float("nan")
    synced_rss_mb: float = float("nan")  # the fresh pilot after its first push, no proxy yet
    services_in_first_push: int = 0  # the recording proxy's first CDS: outbound clusters of bench services
    route_names: list[str] = field(default_factory=list)  # its RouteConfigurations (captured: named by port)
    sync_timed_out: bool = False  # pilot logged that its watches had not listed in time


@dataclass
class KubeReport:
    """One run: the kube figures here, the pilot and baseline `Run`s in `report` (as `ads_load`)."""

    options: KubeOptions
    load: list[LoadReading] = field(default_factory=list)
    create_s: dict[str, float] = field(default_factory=dict)
    slices_s: float = float("nan")  # from the last Service created until every slice was Ready
    pilot: PilotFigures = field(default_factory=PilotFigures)
    report: Report = field(default_factory=lambda: Report(machine_info(), {}))
    error: str = ""

    @property
    def converged(self) -> bool:
        return not self.error and bool(self.report.runs) and all(r.converged for r in self.report.runs)

    def to_json(self) -> dict[str, Any]:
        out = self.report.to_json()
        out.pop("targets")  # ads_load's targets are set for its file-fed mesh, not for this one
        out["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.options).items()}
        out["kube"] = _nan_to_none({
            "load_average": [asdict(r) for r in self.load], "create_s": self.create_s, "slices_s": self.slices_s,
            "pilot": asdict(self.pilot), "error": self.error,
            "change_trigger": "API merge patch (VirtualService) / strategic-merge patch (Pod status) "
                              "through kubernetes_asyncio; t0 = just before the request is sent",
        })
        return out


class CapturedSession(Session):
    """`runner.Session` whose clients pose as Pods' sidecars (`kube_worker.captured_node`): the Go
    simulated Envoys or the Python ones (`kube_worker` processes)."""

    node = staticmethod(kube_worker.captured_node)
    worker_main = staticmethod(kube_worker.main)


@contextlib.contextmanager
def load_phase(report: KubeReport, name: str, log: Callable[[str], None]) -> Iterator[None]:
    """Record and print the 1/5/15-minute load average before and after a phase (shared machine)."""
    reading = LoadReading(name, os.getloadavg())
    report.load.append(reading)
    log(f"[bold]{name}[/] (load average {load_average(reading.before)})")
    try:
        yield
    finally:
        reading.after = os.getloadavg()
        log(f"  load average after {name}: {load_average(reading.after)}")


@dataclass
class KubePilot:
    """A serving `meshctl up --kubeconfig`: addresses, and its start (wall seconds, CPU seconds)."""

    proc: subprocess.Popen[bytes]
    ads: str
    debug: str
    start_s: float
    start_cpu_s: float
    log: Path


def start_kube_pilot(group: ProcessGroup, kubeconfig: Path, log: Path, timeout: float) -> KubePilot:
    """`meshctl up --kubeconfig` (plaintext xDS) on free ports; returns once it serves (first push made)."""
    args = [sys.executable, "-m", "meshctl.cli", "up", "--kubeconfig", str(kubeconfig), "--ads", "127.0.0.1:0",
            "--debug", "127.0.0.1:0", "--plaintext-only", "--log-level", "info"]
    started = time.monotonic()
    proc = group.popen(args, log, {**os.environ, "PYTHONPATH": str(REPO), **PILOT_ENV})
    deadline = started + timeout
    while time.monotonic() < deadline:
        found = _READY.search(log.read_text(errors="replace"))
        if found:
            elapsed = time.monotonic() - started
            return KubePilot(proc, found.group(1), found.group(2), elapsed, ResourceMeter(proc.pid).cpu(), log)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    group.stop(proc)
    raise RuntimeError(f"pilot did not serve within {timeout:.0f} s (exit code {proc.poll()}); log tail:\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


def install_crds(cluster: KubeCluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS))


def proxy_pods(opts: KubeOptions) -> list[ko.PodRef]:
    """The Pods the proxies pose as: the first `proxies` bulk Pods (one per service, then the next)."""
    return [ko.bulk_pod(i, opts.services) for i in range(opts.proxies)]


def node_specs(pods: list[ko.PodRef]) -> list[NodeSpec]:
    return [NodeSpec(p.node_id, ko.NAMESPACE, tuple(sorted(p.labels.items())), workload=p.name) for p in pods]


def wait_quiet(meter: ResourceMeter, timeout: float) -> float:
    """Wait until the process uses less than `QUIET_VCPU` over a second; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        before = meter.cpu()
        time.sleep(1.0)
        if meter.cpu() - before < QUIET_VCPU:
            break
    return time.monotonic() - started


def wait_slices(driver: KubeDriver, opts: KubeOptions, log: Callable[[str], None]) -> float:
    """Until kube-controller-manager's EndpointSlices hold every bulk Pod as ready; seconds waited."""
    expected: dict[str, int] = {}
    for i in range(opts.pods):
        name = ko.service_name(ko.bulk_pod(i, opts.services).service)
        expected[name] = expected.get(name, 0) + 1
    for i in range(opts.services):
        expected.setdefault(ko.service_name(i), 0)
    started, last = time.monotonic(), -1
    while True:
        done = driver.ready_slices(expected)
        if done != last:
            log(f"  EndpointSlices ready for {done}/{opts.services} services")
            last = done
        if done == opts.services:
            return time.monotonic() - started
        if time.monotonic() - started > SLICE_TIMEOUT_S:
            raise TimeoutError(f"EndpointSlices: {done}/{opts.services} services ready after {SLICE_TIMEOUT_S:.0f} s")
        time.sleep(1.0)


def phase_empty_and_load(group: ProcessGroup, cluster: KubeCluster, driver: KubeDriver, report: KubeReport,
                         log: Callable[[str], None]) -> None:
    """Phases 1 and 2: pilot on the empty cluster, then the cluster filled while it watches."""
    opts, figures = report.options, report.pilot
    with load_phase(report, "empty: pilot on the empty cluster", log):
        pilot = start_kube_pilot(group, cluster.kubeconfig, opts.workdir / "pilot-watching.log", 120)
    try:
        with ResourceMeter(pilot.proc.pid) as meter:
            figures.empty_start_s, figures.empty_start_cpu_s = pilot.start_s, pilot.start_cpu_s
            figures.empty_rss_mb = median_rss(meter) / MB
            log(f"  serving after {pilot.start_s:.2f} s, {pilot.start_cpu_s:.2f} CPU s; "
                f"RSS {figures.empty_rss_mb:.0f} MB")
            with load_phase(report, "load: objects created while pilot watches", log):
                meter.mark()
                spares = [ko.spare_pod(i, opts.services, opts.pods) for i in range(opts.repeats)]
                report.create_s = driver.create_cluster(opts.services, [ko.bulk_pod(i, opts.services)
                                                                        for i in range(opts.pods)], spares, log)
                report.slices_s = wait_slices(driver, opts, log)
                log(f"  EndpointSlices complete {report.slices_s:.1f} s after the last Service was created")
                figures.load_caught_up_s = wait_quiet(meter, 300)
                figures.load_cpu_s, peak = meter.phase()
                figures.load_peak_rss_mb = peak / MB
                figures.loaded_rss_mb = median_rss(meter) / MB
                log(f"  pilot: {figures.load_cpu_s:.1f} CPU s while the cluster filled, quiet "
                    f"{figures.load_caught_up_s:.1f} s after the slices; RSS {figures.loaded_rss_mb:.0f} MB "
                    f"(peak {figures.load_peak_rss_mb:.0f})")
    finally:
        group.stop(pilot.proc)


def resource_names(responses: list[tuple[str, bytes]], type_url: str, delta: bool) -> list[str]:
    """Sorted names of the `type_url` resources in recorded (type_url, raw response) pairs."""
    names: set[str] = set()
    for kind, raw in responses:
        if kind != type_url:
            continue
        if delta:
            names.update(r.name for r in discovery_pb2.DeltaDiscoveryResponse.FromString(raw).resources)
        else:
            names.update(first_string(r.value) for r in discovery_pb2.DiscoveryResponse.FromString(raw).resources)
    return sorted(names)


def services_in_cds(initial: list[tuple[str, bytes]], delta: bool) -> int:
    """Bench services with an outbound cluster in the recorded initial CDS responses."""
    suffix, prefix = f".{ko.NAMESPACE}.svc.cluster.local", f"outbound|{ko.SERVICE_PORT}||svc-"
    names = resource_names(initial, CLUSTER, delta)
    return sum(1 for n in names if n.startswith(prefix) and n.endswith(suffix))


def _change(driver: KubeDriver, opts: KubeOptions) -> Callable[[str, int], tuple[Expectation, Callable[[], float]]]:
    """The measured changes for `runner._changes`: expectation, and the trigger returning t0."""
    def change(kind: str, i: int) -> tuple[Expectation, Callable[[], float]]:
        if kind == "route":
            index, weights = ko.route_service(i, opts.services), ko.route_weights(i)
            expectation = Expectation("route", host=ko.host(index), subsets=ko.SUBSETS, weights=weights,
                                      port=ko.SERVICE_PORT)
            return expectation, lambda: driver.patch_route(index, weights)
        spare = ko.spare_pod(i, opts.services, opts.pods)
        return Expectation.endpoint(spare.ip), lambda: driver.set_ready(spare, True)
    return change


def phase_sync_and_proxies(group: ProcessGroup, cluster: KubeCluster, driver: KubeDriver, report: KubeReport,
                           log: Callable[[str], None]) -> Recording | None:
    """Phases 3 and 4: a fresh pilot's initial sync, then the proxies and the changes."""
    opts, figures = report.options, report.pilot
    pods = proxy_pods(opts)
    run = Run("pilot", opts.protocol, opts.proxies, opts.services, len({(p.service, p.version) for p in pods}),
              "pod")
    report.report.runs.append(run)
    with load_phase(report, "initial sync: a fresh pilot on the full cluster", log):
        pilot = start_kube_pilot(group, cluster.kubeconfig, opts.workdir / "pilot.log", 900)
        figures.sync_s, figures.sync_cpu_s = pilot.start_s, pilot.start_cpu_s
        figures.sync_timed_out = NOT_SYNCED in pilot.log.read_text(errors="replace")
        log(f"  first push after {pilot.start_s:.2f} s, {pilot.start_cpu_s:.2f} CPU s"
            + (" [red](sync timed out)[/]" if figures.sync_timed_out else ""))
    recording = None
    try:
        with ResourceMeter(pilot.proc.pid) as meter:
            figures.synced_rss_mb = run.empty_rss_mb = median_rss(meter) / MB
            with load_phase(report, f"proxies: {opts.proxies} simulated sidecars", log):
                session = CapturedSession(group, opts.runner_options(), meter)
                specs = node_specs(pods)
                run.phases.append(_connect(session, pilot.ads, opts.protocol == "delta", specs, record=True))
                log(_line(run.phases[-1]))
                if run.phases[-1].complete:
                    initial, _ = session.handles[0].call("recorded")
                    figures.services_in_first_push = services_in_cds(initial, opts.protocol == "delta")
                    figures.route_names = resource_names(initial, ROUTE, opts.protocol == "delta")
                    _idle(session, run, log)
                    expectations = _changes(session, run, log, _change(driver, opts))
                    initial, changes = session.handles[0].call("recorded")
                    recording = Recording(_by_type(initial), changes, expectations, specs)
                session.call_all("close")
                run.peak_rss_mb = meter.peak_rss / MB
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        group.stop(pilot.proc)
    return recording


def run_kube_benchmark(opts: KubeOptions, console: Console | None = None) -> KubeReport:
    """Every phase (module docstring) in one run; errors are reported, never left running."""
    console = console or Console(stderr=True, width=max(160, Console(stderr=True).width))
    report = KubeReport(opts)
    report.report.machine["note"] = (f"{os.cpu_count()} CPU cores shared by the API server, etcd, "
                                     "kube-controller-manager, pilot and the simulated proxies")
    log = console.print
    try:
        # The group exits first: pilots and workers stop before the cluster does.
        with contextlib.ExitStack() as stack, ProcessGroup() as group:
            with load_phase(report, "cluster: etcd, kube-apiserver, kube-controller-manager", log):
                cluster = stack.enter_context(KubeCluster.running(cached_tools()))
            _run_phases(group, cluster, report, log)
    except Exception as exc:
        report.error = f"{type(exc).__name__}: {exc}"
        log(f"[red]{report.error}[/]")
    return report


def _run_phases(group: ProcessGroup, cluster: KubeCluster, report: KubeReport, log: Callable[[str], None]) -> None:
    install_crds(cluster)
    with KubeDriver(cluster.kubeconfig, report.options.concurrency) as driver:
        driver.prepare()
        phase_empty_and_load(group, cluster, driver, report, log)
        recording = phase_sync_and_proxies(group, cluster, driver, report, log)
    if report.options.baseline and recording is not None:
        with load_phase(report, "baseline: replayed bytes, no pilot logic", log):
            report.report.runs.append(run_baseline(group, report.options.runner_options(), recording, log))


@click.command()
@click.option("--services", default=1000, show_default=True, type=click.IntRange(1, 9999), help="Services.")
@click.option("--pods", default=5000, show_default=True, type=click.IntRange(1, ko.MAX_PODS - 100),
              help="Pods (service i gets pods i, i + services, ...; v1 and v2 in turn).")
@click.option("--proxies", default=1000, show_default=True, type=click.IntRange(1),
              help="Simulated sidecars, each posing as one Pod (at most --pods).")
@click.option("--protocol", type=click.Choice(["sotw", "delta"]), default="sotw", show_default=True)
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 80), help="Changes of each kind.")
@click.option("--concurrency", default=32, show_default=True, type=click.IntRange(1),
              help="Parallel API requests while creating the cluster's objects.")
@click.option("--idle-seconds", default=3.0, show_default=True, type=click.FloatRange(min=0.5))
@click.option("--workers", default=0, help="Client worker processes (0: 1 for Go; 1, 2 or 4 by proxy count).")
@click.option("--client", type=click.Choice(["go", "python"]), default="go", show_default=True,
              help="Simulated Envoys: Go (benchmarks/simenvoy, built with the machine's Go on first use) or "
                   "Python (grpcio; 2-3x the CPU per large response).")
@click.option("--no-baseline", is_flag=True, help="Skip the replay baseline.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write results here.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep pilot logs here (default: a temp dir, removed).")
def main(services: int, pods: int, proxies: int, protocol: str, repeats: int, concurrency: int,
         idle_seconds: float, workers: int, client: str, no_baseline: bool, json_path: Path | None,
         workdir: Path | None) -> None:
    """Pilot watching a real API server: kubectl-to-ACK latency, memory and CPU."""
    if proxies > pods:
        raise click.BadParameter(f"{proxies} proxies but {pods} pods: each proxy poses as its own Pod",
                                 param_hint="--proxies")
    with tempfile.TemporaryDirectory(prefix="kube-load-") as tmp:
        base = workdir or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        opts = KubeOptions(services=services, pods=pods, proxies=proxies, protocol=protocol, repeats=repeats,
                           workers=workers, concurrency=concurrency, idle_seconds=idle_seconds,
                           baseline=not no_baseline, workdir=base.resolve(), client=client)
        report = run_kube_benchmark(opts)
    print_kube_report(report)
    if json_path:
        json_path.write_text(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    if not report.converged:
        sys.exit(1)


if __name__ == "__main__":
    main()
