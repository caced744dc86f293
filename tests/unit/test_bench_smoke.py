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


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_session_fanout_fleet_ends_synced_after_each_change(tmp_path: Path, delta: bool) -> None:
    from benchmarks import meshgen
    from benchmarks.session_fanout import Fleet, snapshot_of
    from pilot.xds.status import SyncState

    config = meshgen.generate(tmp_path, services=3)
    fleet = Fleet(3, delta, snapshot_of(config.directory))
    config.endpoint_change(1)
    config.write_service(1)
    assert fleet.push(snapshot_of(config.directory)) == 3  # one EDS response per stream
    states = {ts.state() for st in fleet.registry.streams() for ts in st.types.values()}
    assert states == {SyncState.SYNCED}
