"""ADS load benchmark: N simulated Envoys against a real pilot process, and a raw baseline.

    python -m benchmarks.ads_load --clients 100,1000,5000 --protocol both --json out.json
    python -m benchmarks.ads_load --services 1000 --clients 2000 --classes per-workload --protocol sotw

For every protocol and N: generate a mesh config directory, start `meshctl up` on free
loopback ports, connect N clients (in a fixed number of config classes, or each posing as one
of the mesh's workloads) from worker processes, measure connect time, pilot's idle CPU and
memory once connected, and the latency of route and endpoint changes (file write -> each
client's ACK), with pilot's CPU seconds and RSS; then the same phases against a server that
only replays the bytes pilot sent. Every process started is killed at the end, on error too.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import click
import psutil
from rich.console import Console

from benchmarks.meshgen import MAX_SERVICES
from benchmarks.paired import run_pair
from benchmarks.procs import ProcessGroup, machine_steal
from benchmarks.report import PER_WORKLOAD, Report, print_report
from benchmarks.runner import Options, py_spy


def machine_info(pin: bool = False) -> dict[str, object]:
    cores = os.cpu_count() or 0
    sharing = ("the server (pilot or the baseline) pinned to core 0, client workers on the rest"
               if pin else "shared by pilot (or the baseline server) and the client workers")
    return {
        "cpus": cores,
        "memory_mb": psutil.virtual_memory().total // (1024 * 1024),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "note": f"{cores} CPU cores, {sharing}; latencies include pilot's file watching and debounce.",
    }


def run_benchmark(clients: list[int], protocols: list[str], workdir: Path, repeats: int = 3,
                  services: int = 50, workers: int = 0, baseline: bool = True,
                  pilot_env: dict[str, str] | None = None, profile_dir: Path | None = None,
                  console: Console | None = None, pin: bool = False, classes: int | str = 10,
                  idle_seconds: float = 3.0, quiet_seconds: float = 2.0,
                  sample_dir: Path | None = None, namespaces: int = 1, client: str = "go",
                  streams_per_connection: int = 1, changes: int = 1) -> Report:
    """Run every (protocol, N) case; the result holds pilot and baseline runs in order.

    `classes` is a fixed count of config classes or "per-workload" (each proxy poses as one of
    the mesh's workloads). After connect the server is left alone `quiet_seconds` and until its
    RSS settles (`runner.settled_rss`), then its idle CPU and steady RSS are read over
    `idle_seconds` (tests shorten both). `namespaces`: the
    services (and, per workload, the proxies) spread over that many namespaces. `client`: the
    simulated Envoys, "go" (`benchmarks.goworker`) or "python" (`benchmarks.worker`);
    `streams_per_connection` of them share each TCP connection (1: each its own, as Envoys).
    `changes`: changes of each kind per round (route, endpoint, route, ...).
    """
    console = console or Console(stderr=True, width=max(160, Console(stderr=True).width))
    report = Report(machine_info(pin), {"clients": clients, "protocols": protocols, "repeats": repeats,
                                     "changes": changes, "services": services, "namespaces": namespaces,
                                     "classes": classes,
                                     "idle_seconds": idle_seconds,
                                     "pilot_env": pilot_env or {}, "pinned": pin, "client": client,
                                     "streams_per_connection": streams_per_connection})
    per_workload = classes == PER_WORKLOAD
    load_before, steal_before = os.getloadavg()[0], machine_steal()
    with ProcessGroup() as group:
        for protocol in protocols:
            for n in clients:
                profile = profile_dir / f"pilot-{protocol}-{n}.prof" if profile_dir else None
                opts = Options(clients=n, protocol=protocol, workdir=workdir, services=services, namespaces=namespaces,
                               classes=10 if per_workload else int(classes), per_workload=per_workload,
                               repeats=repeats, changes=changes, workers=workers, idle_seconds=idle_seconds,
                               quiet_seconds=quiet_seconds,
                               pilot_env=pilot_env or {}, profile=profile, pin=pin, sample_dir=sample_dir,
                               client=client, streams_per_connection=streams_per_connection)
                started = time.monotonic()
                console.print(f"[bold]{protocol} N={n}[/] ({opts.worker_count} {client} client workers, "
                              f"{streams_per_connection} stream(s) per TCP connection, "
                              f"{opts.services} services in {opts.namespaces} namespace(s), "
                              f"{opts.class_count} {opts.class_mode} classes)")
                report.runs.extend(run_pair(group, opts, console.print, with_baseline=baseline))
                console.print(f"  [dim]{time.monotonic() - started:.0f}s[/]")
    _machine_during(report.machine, load_before, os.getloadavg()[0], machine_steal() - steal_before)
    return report


def _machine_during(machine: dict[str, object], load_before: float, load_after: float, steal_s: float) -> None:
    """What the machine was doing around the run, in the report's machine record and its note: the
    1-minute load average before and after and the CPU seconds the host took meanwhile (steal, all
    CPUs). Why: every figure here moves with the machine, and a run is read next to its load."""
    machine.update(load_before=round(load_before, 2), load_after=round(load_after, 2), steal_s=round(steal_s, 2))
    machine["note"] = (f"{machine['note']} Load average {load_before:.2f} before, {load_after:.2f} after; "
                       f"the host took {steal_s:.2f} s of CPU (steal) during the run.")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from exc
    if not values or any(v <= 0 for v in values):
        raise click.BadParameter("client counts must be positive")
    return values


def _classes(text: str) -> int | str:
    """`--classes`: a positive number, or "per-workload"."""
    if text == PER_WORKLOAD:
        return text
    try:
        value = int(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} is neither a number nor {PER_WORKLOAD!r}") from exc
    if value <= 0:
        raise click.BadParameter("the class count must be positive")
    return value


@click.command()
@click.option("--clients", default="100,1000", show_default=True, help="Comma-separated client counts.")
@click.option("--protocol", type=click.Choice(["sotw", "delta", "both"]), default="both", show_default=True)
@click.option("--repeats", default=3, show_default=True,
              help="Rounds per run: each connects the fleet and makes one change of each kind; "
                   "pilot and baseline alternate.")
@click.option("--changes", default=1, show_default=True, type=click.IntRange(1, 20),
              help="Changes of each kind per round (route, endpoint, route, ...): CPU per change and the "
                   "latencies pool rounds x changes, a narrower mean for one change more each.")
@click.option("--services", default=50, show_default=True, type=click.IntRange(1, MAX_SERVICES),
              help="Services in the generated mesh.")
@click.option("--namespaces", default=1, show_default=True, type=click.IntRange(min=1),
              help="Namespaces the services spread over (bench-0, bench-1, ...); per-workload proxies "
                   "follow their workload's.")
@click.option("--classes", "classes_text", default="10", show_default=True,
              help="Config classes: a number (proxies round-robin over that many namespace/label sets) or "
                   f"{PER_WORKLOAD!r} (each proxy labelled as one of the mesh's 2 x services workloads).")
@click.option("--idle-seconds", default=3.0, show_default=True, type=click.FloatRange(min=0.5),
              help="Idle window after connect: server CPU over it (idle vCPU) and RSS samples (steady RSS).")
@click.option("--workers", default=0, help="Client worker processes (0: 1, 2 or 4 by client count).")
@click.option("--client", type=click.Choice(["go", "python"]), default="go", show_default=True,
              help="Simulated Envoys: Go (benchmarks/simenvoy, built with the machine's Go on first use) or "
                   "Python (grpcio, one worker process per core; 2-3x the CPU per large response).")
@click.option("--streams-per-connection", default=1, show_default=True, type=click.IntRange(min=1),
              help="Simulated Envoys per TCP connection: 1 as Envoy (each proxy's ADS stream on its own "
                   "connection); sessions up to 34 ran 250.")
@click.option("--no-baseline", is_flag=True, help="Skip the raw fan-out baseline.")
@click.option("--pin", is_flag=True,
              help="Server (pilot or baseline) on the first CPU core, client workers on the others.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write results here.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep configs and pilot logs here (default: a temp dir, removed).")
@click.option("--profile-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Run pilot under cProfile and write one .prof per run here.")
@click.option("--sample-dir", type=click.Path(file_okay=False, path_type=Path),
              help="py-spy the server (pilot, baseline) while clients connect and in each change; stacks here.")
@click.option("--pilot-env", multiple=True,
              help="KEY=VALUE for pilot's environment, e.g. MESHCTL_PILOT_DEBOUNCE_MS=10.")
def main(clients: str, protocol: str, repeats: int, changes: int, services: int, namespaces: int, classes_text: str,
         idle_seconds: float, workers: int, client: str, streams_per_connection: int, no_baseline: bool, pin: bool,
         json_path: Path | None, workdir: Path | None, profile_dir: Path | None, sample_dir: Path | None,
         pilot_env: tuple[str, ...]) -> None:
    """Measure pilot's ADS fan-out: connect time, change latency, CPU and memory."""
    if namespaces > services:
        raise click.BadParameter(f"at most one namespace per service ({services})", param_hint="--namespaces")
    counts = _ints(clients)
    classes = _classes(classes_text)
    protocols = ["sotw", "delta"] if protocol == "both" else [protocol]
    env = dict(item.split("=", 1) for item in pilot_env if "=" in item)
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    if sample_dir:
        if py_spy() is None:
            raise click.UsageError("--sample-dir needs py-spy (pip install py-spy; it is in meshctl[test])")
        sample_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ads-load-") as tmp:
        base = workdir or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        report = run_benchmark(counts, protocols, base, repeats, services, workers, not no_baseline, env,
                               profile_dir.resolve() if profile_dir else None, pin=pin, classes=classes,
                               idle_seconds=idle_seconds, sample_dir=sample_dir.resolve() if sample_dir else None,
                               namespaces=namespaces, client=client, streams_per_connection=streams_per_connection,
                               changes=changes)
    print_report(report, Console(width=max(200, Console().width)))
    if json_path:
        report.write_json(json_path)
    if not all(r.converged for r in report.runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
