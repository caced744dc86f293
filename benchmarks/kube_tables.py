"""The Kubernetes benchmark's tables (`benchmarks.kube_load`): the cluster's objects, pilot's
phases, latencies and the load average, then `benchmarks.report`'s tables for the same runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from benchmarks.report import _footprint_table, _ms, _num, _ratio_table, _ratios, _results_table

if TYPE_CHECKING:
    from benchmarks.kube_load import KubeReport


def load_average(values: tuple[float, float, float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def cluster_table(report: KubeReport) -> Table:
    opts = report.options
    table = Table(title=f"cluster objects created in the API server ({opts.concurrency} parallel requests, "
                        "kubernetes_asyncio)")
    for col in ("step", "objects", "seconds", "per second"):
        table.add_column(col, justify="left" if col == "step" else "right")
    counts = {"pods": opts.pods + opts.repeats, "pod statuses": opts.pods + opts.repeats,
              "destination rules": opts.services, "virtual services": opts.services, "services": opts.services}
    for step, seconds in report.create_s.items():
        count = counts.get(step, sum(counts.values()))
        table.add_row(step, str(count), _num(seconds, 1), _num(count / seconds if seconds else None))
    table.add_row("EndpointSlices (kube-controller-manager), after the last Service", str(opts.services),
                  _num(report.slices_s, 1), _num(opts.services / report.slices_s if report.slices_s else None))
    return table


def pilot_table(report: KubeReport) -> Table:
    f, runs = report.pilot, [r for r in report.report.runs if r.server == "pilot"]
    run = runs[0] if runs else None
    table = Table(title="pilot watching the API server (s = wall seconds, CPU = pilot's user+system seconds)")
    for col in ("phase", "s", "CPU s", "RSS MB", "note"):
        table.add_column(col, justify="left" if col in ("phase", "note") else "right")
    extra = f.sync_cpu_s - f.empty_start_cpu_s
    table.add_row("start, empty cluster", _num(f.empty_start_s, 2), _num(f.empty_start_cpu_s, 2),
                  _num(f.empty_rss_mb, 0), "spawn -> serving (imports, watches listed, first push)")
    table.add_row("cluster filling (watching)", _num(f.load_caught_up_s, 1), _num(f.load_cpu_s, 2),
                  f"{_num(f.loaded_rss_mb, 0)} (peak {_num(f.load_peak_rss_mb, 0)})",
                  "s: quiet this long after the last EndpointSlice")
    table.add_row("initial sync, full cluster", _num(f.sync_s, 2), _num(f.sync_cpu_s, 2), _num(f.synced_rss_mb, 0),
                  f"{_num(extra, 2)} CPU s more than the empty start; first CDS holds "
                  f"{f.services_in_first_push}/{report.options.services} services"
                  + (" [red]sync timed out[/]" if f.sync_timed_out else ""))
    if run is not None:
        table.add_row(f"{run.clients} proxies connected, idle", _num(run.idle_seconds, 1), _num(run.idle_cpu_s, 3),
                      f"{_num(run.steady_rss_mb, 0)} (peak {_num(run.peak_rss_mb, 0)})",
                      f"idle {_num(run.idle_vcpu, 3)} vCPU; {run.classes} classes; route configurations "
                      f"{', '.join(f.route_names[:4]) or '-'}{' ...' if len(f.route_names) > 4 else ''}")
        for kind in ("route", "endpoint"):
            table.add_row(f"per {kind} change", "", _num(run.cpu_per_change(kind), 3), "",
                          f"averaged over {len(run.phase(kind))}")
    return table


def latency_table(report: KubeReport) -> Table:
    table = Table(title="API change -> each proxy's ACK of the resource carrying it (ms; first = earliest ACK, "
                        "all = the last proxy's)")
    for col in ("server", "change", "trigger", "converged", "p50", "p99", "first", "all"):
        table.add_column(col, justify="left" if col in ("server", "change", "trigger") else "right")
    triggers = {"route": "VirtualService merge patch", "endpoint": "Pod Ready flip -> EndpointSlice",
                "connect": "stream opened"}
    for run in report.report.runs:
        for kind in ("connect", "route", "endpoint"):
            phases = run.phase(kind)
            if not phases:
                continue
            lat = run.connect if kind == "connect" else run.pooled(kind)
            done = sum(int(p.converged) for p in phases)
            table.add_row(run.server, kind, triggers[kind] if run.server == "pilot" else "replayed push",
                          f"{done}/{sum(p.clients for p in phases)}", _ms(lat.p50), _ms(lat.p99), _ms(lat.min),
                          _ms(lat.max))
    return table


def load_table(report: KubeReport) -> Table:
    table = Table(title="load average (1/5/15 min) before and after each phase: the machine is shared")
    for col in ("phase", "before", "after"):
        table.add_column(col)
    for reading in report.load:
        table.add_row(reading.phase, load_average(reading.before), load_average(reading.after))
    return table


def print_kube_report(report: KubeReport, console: Console | None = None) -> None:
    console = console or Console(width=max(200, Console().width))
    for table in (load_table(report), cluster_table(report), pilot_table(report), latency_table(report)):
        console.print(table)
    # ads_load's tables for the same runs; not its targets, which are set for its file-fed mesh.
    if report.report.runs:
        console.print(_results_table(report.report))
        console.print(_footprint_table(report.report))
    pairs = [(p, _ratios(p, b)) for p, b in report.report.pairs() if b is not None]
    if pairs:
        console.print(_ratio_table(pairs))
    console.print(f"[dim]{report.report.machine['note']}[/]")
    if report.error:
        console.print(f"[red]error: {report.error}[/]")
