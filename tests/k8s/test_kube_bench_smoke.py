"""Smoke test of the Kubernetes benchmark (`benchmarks.kube_load`) at a tiny size.

It starts its own control plane (a second one beside the session's, so the benchmark's
namespace, Node and pilots never meet other tests' objects), creates 3 Services and 8 Pods,
and runs 4 simulated sidecars through one route and one endpoint change, then the replay
baseline. Asserts convergence, the captured-traffic listener model and that every figure is
present; never timings.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from benchmarks import kube_load
from benchmarks.kube_load import KubeOptions, run_kube_benchmark
from benchmarks.kube_tables import print_kube_report


def test_more_proxies_than_pods_is_refused() -> None:
    result = CliRunner().invoke(kube_load.main, ["--services", "2", "--pods", "3", "--proxies", "4"])
    assert result.exit_code == 2
    assert "--proxies" in result.output and "each proxy poses as its own Pod" in result.output


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.parametrize("client", ["go", "python"])
def test_kube_load_converges_and_reports_every_figure(tmp_path: Path, client: str) -> None:
    """Both kinds of simulated Envoys pose as Pods' sidecars (captured traffic): the Go ones (the
    default) and the Python ones (`kube_worker`)."""
    out = io.StringIO()
    console = Console(file=out, width=220)
    opts = KubeOptions(services=3, pods=8, proxies=4, repeats=1, idle_seconds=0.5, quiet_seconds=0.2,
                       workdir=tmp_path, client=client)
    report = run_kube_benchmark(opts, console)
    print_kube_report(report, console)

    assert report.error == "", report.error
    assert [r.server for r in report.report.runs] == ["pilot", "baseline"]
    for run in report.report.runs:
        assert run.converged, (run.server, run.error, [p.error for p in run.phases])
        assert [p.name for p in run.phases] == ["connect", "route", "endpoint"]
        assert all(p.converged == 4 for p in run.phases)
    pilot = report.report.runs[0]
    assert (pilot.classes, pilot.class_mode) == (4, "pod")  # 3 services' v1 pods, then svc-0000's v2 pod

    figures = report.pilot
    assert figures.services_in_first_push == 3
    assert "80" in figures.route_names, figures.route_names  # captured traffic: routes named by port
    assert not figures.sync_timed_out
    for name in ("empty_start_s", "empty_start_cpu_s", "empty_rss_mb", "load_cpu_s", "loaded_rss_mb",
                 "load_peak_rss_mb", "sync_s", "sync_cpu_s", "synced_rss_mb"):
        value = getattr(figures, name)
        assert not math.isnan(value) and value >= 0, name
    assert set(report.create_s) == {"pods", "pod statuses", "destination rules", "virtual services", "services",
                                    "total"}
    assert not math.isnan(report.slices_s)
    assert [r.phase.split(":")[0] for r in report.load] == [
        "cluster", "empty", "load", "initial sync", "proxies", "baseline"]
    assert all(len(r.after) == 3 and r.after != (0.0, 0.0, 0.0) for r in report.load)

    saved = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert saved["kube"]["pilot"]["services_in_first_push"] == 3
    assert saved["ratios"] and saved["ratios"][0]["route_p99"] is not None
    for key in ("cpu_per_route_change_s", "cpu_per_endpoint_change_s", "idle_vcpu"):
        assert isinstance(saved["runs"][0]["summary"][key], float), key
    printed = out.getvalue()
    for title in ("load average", "cluster objects created", "pilot watching the API server",
                  "API change -> each proxy's ACK", "pilot / baseline"):
        assert title in printed, title
