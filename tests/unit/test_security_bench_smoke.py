"""Smoke test of the security load benchmark with tiny numbers: a real CA process over gRPC/TLS,
real workload agents in spawned processes serving SDS, a real pilot build of AuthorizationPolicies.

Asserts that every row exists and that its values are sane (counts, no failures, orderings that
hold by construction), never timings.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from benchmarks.security_load import policy_doc, print_report, run_benchmark
from pilot.api import parse_object
from pilot.api.authorization import AuthorizationPolicy

STORMS = ["gRPC/TLS, new connections", "gRPC/TLS, open connections"]
BASELINES = ["baseline: sign_csr in-process", "baseline: CSRService in-process"]
RBAC_ROWS = ["baseline: no policies", "10 policies, from scratch", "RBAC filters alone (HTTP + network)",
             "one policy edited (pilot's memoized rebuild)", "baseline: rebuild, nothing changed"]


@pytest.mark.timeout(180)
def test_benchmark_reports_every_row_with_tiny_numbers(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, width=200)
    report = run_benchmark(agents=5, memory_agents=(1, 3), policies=10, services=2, edits=2, repeats=1,
                           console=console)
    print_report(report, console)
    report.write_json(tmp_path / "result.json")

    by_table = {t: [r.name for r in report.rows if r.table == t] for t in ("renewal", "memory", "rbac")}
    assert by_table == {"renewal": BASELINES + STORMS,
                        "memory": ["baseline: no agent", "1 agent(s)", "3 agent(s)"],
                        "rbac": RBAC_ROWS}
    for name in BASELINES + STORMS:
        f = report.row("renewal", name).figures
        assert (f["agents"], f["renewed"], f["failures"]) == (5, 5, 0), (name, f)
        assert isinstance(f["p50_ms"], float) and isinstance(f["p99_ms"], float) and isinstance(f["all_s"], float)
        assert 0 < f["p50_ms"] <= f["p99_ms"] <= f["all_s"] * 1000 + 1, (name, f)  # ms vs s rounding
        assert isinstance(f["ca_cpu_s"], float) and f["ca_cpu_s"] >= 0, (name, f)
    for name in STORMS:  # measured on other processes with psutil
        f = report.row("renewal", name).figures
        assert isinstance(f["agents_cpu_s"], float) and f["agents_cpu_s"] >= 0
        assert isinstance(f["ca_peak_rss_mb"], float) and f["ca_peak_rss_mb"] > 10
        assert f["ca_connections"] == 5  # one TLS connection per agent, as separate sidecars have

    rss: dict[int, float] = {}
    for row in (r for r in report.rows if r.table == "memory"):
        k, f = int(row.figures["agents"] or 0), row.figures
        assert (f["certified"], f["sds_streams"]) == (k, k), f  # every agent certified and streaming SDS
        assert isinstance(f["rss_mb"], float) and f["rss_mb"] > 10
        rss[k] = f["rss_mb"]
    assert rss[1] > rss[0]  # (an agent's gRPC server costs megabytes)
    assert isinstance(report.derived["kb_per_agent"], float)
    assert isinstance(report.derived["first_agent_kb"], float)

    scratch = report.row("rbac", "10 policies, from scratch").figures
    edited = report.row("rbac", "one policy edited (pilot's memoized rebuild)").figures
    assert report.row("rbac", "baseline: no policies").figures["rbac_in_listeners"] == 0
    assert isinstance(scratch["rbac_rules"], int) and scratch["rbac_rules"] >= 10  # >= one rule per policy
    assert isinstance(scratch["rbac_in_listeners"], int) and scratch["rbac_in_listeners"] >= scratch["rbac_rules"]
    assert edited["rbac_rules"] == scratch["rbac_rules"]  # an edit changes a path, not the rule count
    for name in RBAC_ROWS:
        f = report.row("rbac", name).figures
        assert isinstance(f["total_ms"], float) and f["total_ms"] > 0, (name, f)

    assert len(report.load_start) == 3 and report.load_end is not None and len(report.load_end) == 3
    saved = json.loads((tmp_path / "result.json").read_text())
    assert len(saved["rows"]) == len(report.rows) and saved["load_end"] == list(report.load_end)
    text = out.getvalue()
    assert "load average at start" in text and "memory per workload" in text
    for name in STORMS + RBAC_ROWS:
        assert name in text


def _policy(doc: dict[str, Any]) -> AuthorizationPolicy:
    obj = parse_object(doc)  # validates as pilot's config store does (raises InvalidObjectError)
    assert isinstance(obj, AuthorizationPolicy)
    return obj


def test_policy_mix_is_valid_and_realistic() -> None:
    """The generated policies pass pilot's Istio validation and cover the mix the README claims."""
    objects = [_policy(policy_doc(i)) for i in range(60)]
    assert Counter(o.spec.action.value for o in objects) == {"ALLOW": 42, "DENY": 12, "AUDIT": 6}
    assert {o.metadata.namespace for o in objects} == {"istio-system", "shop"}
    rules = [r for o in objects for r in o.spec.rules]
    sources = [f.source for r in rules for f in r.from_ if f.source is not None]
    operations = [t.operation for r in rules for t in r.to if t.operation is not None]
    keys = {c.key for r in rules for c in r.when}
    assert all(any(getattr(s, a) for s in sources) for a in (
        "principals", "not_principals", "namespaces", "not_ip_blocks", "request_principals", "ip_blocks"))
    assert all(any(getattr(o, a) for o in operations) for a in (
        "methods", "paths", "ports", "hosts", "not_paths", "not_methods"))
    assert keys == {"request.headers[x-tenant]", "source.ip", "request.auth.claims[groups]", "destination.port"}
    edited = _policy(policy_doc(7, rev=3))
    assert edited.spec != objects[7].spec and edited.metadata.name == objects[7].metadata.name
