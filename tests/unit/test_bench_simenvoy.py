"""The Go simulated Envoys (`benchmarks/simenvoy`, driven by `benchmarks.goworker`).

Their own unit tests run with `go test` (what a client asks for, shares and ACKs); here the
benchmark drives them against a real pilot process and the replay baseline, both protocols.
Asserts convergence and the figures' presence, never timings.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from rich.console import Console

from benchmarks import goworker
from benchmarks.ads_load import run_benchmark


@pytest.mark.timeout(300)
def test_go_unit_tests_pass() -> None:
    go = shutil.which("go")
    assert go is not None, "Go is needed for the Go simulated Envoys"
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly"}
    done = subprocess.run([go, "test", "-count=1", "."], cwd=goworker.SOURCE, env=env, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(300)
def test_benchmark_converges_with_the_go_clients(tmp_path: Path) -> None:
    """8 Go clients posing as the 8 workloads of a 4-service mesh, SotW then delta: every phase
    converges for pilot and for the replay of what the Go recording client captured."""
    goworker.binary()  # built outside the benchmark's timeouts (about a minute cold)
    out = io.StringIO()
    report = run_benchmark([8], ["sotw", "delta"], tmp_path, repeats=1, services=4, classes="per-workload",
                           idle_seconds=0.5, quiet_seconds=0.1, console=Console(file=out, width=200), client="go")

    assert report.settings["client"] == "go"
    assert "1 go client workers" in out.getvalue()
    assert [(r.server, r.protocol) for r in report.runs] == [
        ("pilot", "sotw"), ("baseline", "sotw"), ("pilot", "delta"), ("baseline", "delta")]
    for run in report.runs:
        assert run.converged, (run.server, run.protocol, run.error, [p.error for p in run.phases])
        assert [p.name for p in run.phases] == ["connect", "route", "endpoint"]
        assert all(p.converged == 8 and p.reconnects == 0 for p in run.phases)
        assert len(run.samples["route"]) == 8 and len(run.samples["endpoint"]) == 8
        # One TCP connection per simulated Envoy by default, as each Envoy opens its own.
        assert run.connections == 8, (run.server, run.protocol, run.connections)


@pytest.mark.timeout(300)
def test_streams_share_connections_when_asked(tmp_path: Path) -> None:
    """`streams_per_connection` puts that many simulated Envoys on one TCP connection (the setup of
    sessions up to 34): 9 clients, 4 per connection, are 3 connections at pilot and at the replay."""
    goworker.binary()
    report = run_benchmark([9], ["sotw"], tmp_path, repeats=1, services=3, idle_seconds=0.5, quiet_seconds=0.1,
                           console=Console(file=io.StringIO(), width=200), client="go", streams_per_connection=4)

    assert report.settings["streams_per_connection"] == 4
    assert [(r.server, r.converged, r.connections) for r in report.runs] == [("pilot", True, 3), ("baseline", True, 3)]


def test_a_changed_source_gets_its_own_cache_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache key is the module's content: an edit is never served the binary of the old source."""
    source = tmp_path / "simenvoy"
    shutil.copytree(goworker.SOURCE, source)
    monkeypatch.setattr(goworker, "SOURCE", source)
    before = goworker.source_digest()
    with (source / "main.go").open("a") as f:
        f.write("\n// an edit\n")
    assert goworker.source_digest() != before
