"""Smoke test of the ADS load benchmark: 5 clients against a real pilot process, both protocols.

Asserts only that every phase completed with every client converged, never timings.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from benchmarks.ads_load import run_benchmark
from benchmarks.report import print_report


@pytest.mark.timeout(60)
def test_benchmark_converges_with_five_clients(tmp_path: Path) -> None:
    quiet = Console(file=io.StringIO(), width=160)
    report = run_benchmark([5], ["sotw", "delta"], tmp_path, repeats=1, services=5, console=quiet)
    print_report(report, quiet)
    report.write_json(tmp_path / "result.json")

    assert [(r.server, r.protocol) for r in report.runs] == [
        ("pilot", "sotw"), ("baseline", "sotw"), ("pilot", "delta"), ("baseline", "delta")]
    for run in report.runs:
        assert run.converged, (run.server, run.protocol, run.error, [p.error for p in run.phases])
        assert [p.name for p in run.phases] == ["connect", "route", "endpoint"]
        assert all(p.converged == 5 for p in run.phases)
    assert (tmp_path / "result.json").stat().st_size > 0
