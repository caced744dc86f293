"""Smoke tests of the ADS load benchmark against a real pilot process.

Assert only that every phase completed with every client converged and that the figures
exist, never timings.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from benchmarks.ads_load import run_benchmark
from benchmarks.procs import CpuSplit, minor_faults, thread_cpu
from benchmarks.report import print_report


@pytest.mark.timeout(60)
def test_benchmark_converges_with_five_clients(tmp_path: Path) -> None:
    """The Python simulated Envoys (`benchmarks.worker`); the other tests run the default, Go's."""
    quiet = Console(file=io.StringIO(), width=160)
    report = run_benchmark([5], ["sotw", "delta"], tmp_path, repeats=1, services=5, console=quiet,
                           idle_seconds=0.5, quiet_seconds=0.1, client="python")
    print_report(report, quiet)
    report.write_json(tmp_path / "result.json")

    assert [(r.server, r.protocol) for r in report.runs] == [
        ("pilot", "sotw"), ("baseline", "sotw"), ("pilot", "delta"), ("baseline", "delta")]
    for run in report.runs:
        assert run.converged, (run.server, run.protocol, run.error, [p.error for p in run.phases])
        assert [p.name for p in run.phases] == ["connect", "route", "endpoint"]
        assert all(p.converged == 5 for p in run.phases)
        assert run.connections == 5  # a channel, so a TCP connection, per simulated Envoy
        # The kernel's part of the server's CPU is measured apart, and is a part of it.
        assert all(0 <= p.server_system_s <= p.server_cpu_s + 0.02 for p in run.phases)
    # Connecting allocates (streams, snapshots): the server touched new pages.
    assert all(r.phases[0].server_minor_faults > 0 for r in report.runs)
    # ... and its CPU is split by thread: the event loop and gRPC's threads worked in each connect.
    for run in report.runs:
        threads = run.phases[0].server_threads
        assert threads.get("main", 0) > 0 and sum(threads.values()) <= run.phases[0].server_cpu_s + 0.05, threads
    assert (tmp_path / "result.json").stat().st_size > 0
    assert "main" in json.loads((tmp_path / "result.json").read_text())["runs"][0]["phases"][0]["server_threads"]


@pytest.mark.timeout(60)
def test_benchmark_per_workload_classes(tmp_path: Path) -> None:
    """8 proxies posing as the 8 workloads of a 4-service mesh: 8 classes, all new figures present."""
    quiet = Console(file=io.StringIO(), width=200)
    report = run_benchmark([8], ["sotw"], tmp_path, repeats=1, services=4, classes="per-workload",
                           idle_seconds=0.5, quiet_seconds=0.1, console=quiet)
    print_report(report, quiet)
    report.write_json(tmp_path / "result.json")

    pilot, base = report.runs
    assert (pilot.server, base.server) == ("pilot", "baseline")
    for run in report.runs:
        assert run.converged, (run.server, run.error, [p.error for p in run.phases])
        assert all(p.converged == 8 for p in run.phases)
    assert (pilot.classes, pilot.class_mode) == (8, "per-workload")
    saved = json.loads((tmp_path / "result.json").read_text())
    summary = saved["runs"][0]["summary"]
    for key in ("connected_all_s", "cpu_per_route_change_s", "cpu_per_endpoint_change_s", "kb_per_stream",
                "kb_per_class", "idle_vcpu"):
        assert isinstance(summary[key], float), key
    assert "cpu_per_new_class_ms" in summary  # None if pilot does not export pilot_class_publish_cpu_seconds
    for key in ("empty_rss_mb", "steady_rss_mb", "peak_rss_mb", "after_rss_mb"):  # after: settled after the changes
        assert saved["runs"][0][key] > 0, key
    assert isinstance(summary["streams_reopened"], int)
    assert {"connect_p99", "route_p99", "endpoint_p99", "route_p99_past_debounce"} <= saved["ratios"][0].keys()
    per_round = saved["ratios"][0]["per_round_p99"]  # one round each: pilot's round 1 over the baseline's
    assert {k: len(v) for k, v in per_round.items()} == {"connect": 1, "route": 1, "endpoint": 1}
    (pilot_route,), (base_route,) = pilot.phase("route"), base.phase("route")
    assert per_round["route"][0] == pytest.approx(pilot_route.latency.p99 / base_route.latency.p99)
    clients = saved["ratios"][0]["per_round_client_cpu"]  # the simulated Envoys' CPU in the same rounds
    if base_route.client_cpu_s > 0:  # a few clients may use less CPU than the clock's tick: no ratio (None)
        assert clients["route"] == [pytest.approx(pilot_route.client_cpu_s / base_route.client_cpu_s)]
    else:
        assert clients["route"] == [None]
    # The host's steal in each phase, pilot's and the baseline's: what /proc/stat counted meanwhile.
    steal = saved["ratios"][0]["per_round_steal_s"]
    assert steal["route"] == [[pilot_route.machine_steal_s, base_route.machine_steal_s]]
    assert all(p.machine_steal_s >= 0 for run in report.runs for p in run.phases)
    # The slowest change of each kind, with its steal and the baseline's change made right after it.
    assert saved["ratios"][0]["slowest"]["route"] == {
        "index": 1, "of": 1, "p99_s": pilot_route.latency.p99, "steal_s": pilot_route.machine_steal_s,
        "replay_p99_s": base_route.latency.p99, "replay_steal_s": base_route.machine_steal_s}
    # The machine around the run: load before and after, the host's steal during it, in the note too.
    machine = saved["machine"]
    assert machine["load_before"] >= 0 and machine["load_after"] >= 0 and machine["steal_s"] >= 0
    assert f"Load average {machine['load_before']:.2f} before" in machine["note"]
    assert report.targets() == []  # mission-scale targets need >= 1,000 services


@pytest.mark.timeout(90)
def test_pilot_and_baseline_take_turns_change_by_change(tmp_path: Path) -> None:
    """Two rounds: pilot's fleet connects, then the baseline's, then each change is made on pilot
    and right after on the baseline (which replays what pilot just sent); connect latencies pool
    over the rounds and "all connected" is the slowest round's."""
    out = io.StringIO()
    report = run_benchmark([4], ["sotw"], tmp_path, repeats=2, services=4, console=Console(file=out, width=200),
                           idle_seconds=0.5, quiet_seconds=0.1)
    log = out.getvalue()

    steps = [tuple(line.split()[:2]) for line in log.splitlines()
             if line.strip().startswith(("round ", "pilot ", "baseline "))][1:]  # the first: pilot's pid line
    first = [("round", "1:"), ("pilot", "connect"), ("pilot", "idle"), ("pilot", "CPU"),
             ("baseline", "connect"), ("baseline", "idle"), ("pilot", "route"), ("baseline", "route"),
             ("pilot", "endpoint"), ("baseline", "endpoint"), ("pilot", "after"), ("baseline", "after")]
    second = [("round", "2:"), ("pilot", "connect"), ("baseline", "connect"), ("pilot", "route"),
              ("baseline", "route"), ("pilot", "endpoint"), ("baseline", "endpoint")]
    assert steps == first + second, log
    for run in report.runs:
        assert run.converged, (run.server, run.error, [p.error for p in run.phases])
        assert [p.name for p in run.phases] == ["connect", "route", "endpoint"] * 2
        assert len(run.samples["connect"]) == 8 and len(run.samples["route"]) == 8
        assert run.connected_all_s == max(p.latency.max for p in run.phase("connect"))
        assert run.connect.p99 == max(run.samples["connect"])


@pytest.mark.timeout(90)
def test_changes_per_round_alternate_kinds_and_pool_into_each_figure(tmp_path: Path) -> None:
    """`changes=2`: each round takes route, endpoint, route, endpoint on the same fleet, pilot's
    edits each a new one (the baseline replays pilot's last of each kind, which its clients must
    recognise), and CPU per change and the latencies pool every change of the kind."""
    report = run_benchmark([4], ["sotw"], tmp_path, repeats=1, changes=2, services=6,
                           console=Console(file=io.StringIO(), width=200), idle_seconds=0.5, quiet_seconds=0.1)
    assert report.settings["changes"] == 2
    for run in report.runs:
        assert run.converged, (run.server, run.error, [p.error for p in run.phases])
        assert [p.name for p in run.phases] == ["connect", "route", "endpoint", "route", "endpoint"]
        assert len(run.samples["route"]) == 8 and len(run.samples["endpoint"]) == 8
        routes = run.phase("route")
        assert run.cpu_per_change("route") == pytest.approx(sum(p.server_cpu_s for p in routes) / 2)


def test_class_publish_metric_read_from_prometheus_text() -> None:
    from benchmarks.procs import parse_class_publish

    text = ("# TYPE pilot_class_publish_cpu_seconds summary\n"
            "pilot_class_publish_cpu_seconds_count 8.0\n"
            "pilot_class_publish_cpu_seconds_sum 0.004\n"
            "pilot_class_publish_cpu_seconds_created 1.7e+09\n")
    assert parse_class_publish(text) == (0.004, 8)
    assert parse_class_publish(text.replace("_count 8.0", '_count{shard="a"} 8.0')) == (0.004, 8)
    assert parse_class_publish("pilot_push_seconds_sum 1.0\n") == (None, None)


def test_mission_targets_only_for_per_workload_runs_of_1000_services() -> None:
    from benchmarks.report import Latency, Phase, Report, Run

    def run(services: int, mode: str, publishes: int | None) -> Run:
        r = Run("pilot", "sotw", 2000, services, 2000, mode, peak_rss_mb=400, empty_rss_mb=100, steady_rss_mb=250,
                idle_cpu_s=0.03, idle_seconds=3, class_publish_cpu_s=None if publishes is None else 1.0,
                class_publishes=publishes, after_rss_mb=260)
        r.phases = [Phase("connect", 2000, 2000, Latency.of([1.0, 12.0]), 5.0, 250, 1.0),
                    Phase("route", 2000, 2000, Latency.of([0.5]), 0.4, 250, 1.0),
                    Phase("endpoint", 2000, 2000, Latency.of([0.1]), 0.1, 250, 1.0)]
        r.samples = {"route": [0.5, 0.9], "endpoint": [0.1, 0.2]}
        return r

    report = Report({}, {}, [run(1000, "per-workload", 2000), run(1000, "fixed", 2000), run(999, "per-workload", 1)])
    rows = report.targets()
    assert len(rows) == 9 and all(r["services"] == 1000 and r["scope"] == "mission scale" for r in rows)
    assert {r["target"]: r["met"] for r in rows}["CPU per new class"] is True  # 0.5 ms
    assert all(r["met"] for r in rows)
    kept = run(1000, "per-workload", 2000)
    kept.after_rss_mb = 576  # what each SotW proxy's last EDS ACK kept cost at 2,000 proxies (session 33)
    assert {r["target"]: r["met"] for r in Report({}, {}, [kept]).targets()}["RSS after the changes"] is False
    absent = Report({}, {}, [run(1000, "per-workload", None)]).targets()
    assert {r["target"]: r["met"] for r in absent}["CPU per new class"] is None


def test_mission_targets_show_the_replay_the_machine_floor_and_the_replay_factor() -> None:
    """Next to each mission-scale figure, the baseline's figure in the same run; next to a change's
    p99, the least the machine allows (the baseline's and the clients' CPU for the change over
    the cores); and a row per change for the 1.2x rule (pilot's pooled p99 over the replay's)."""
    from benchmarks.report import Latency, Phase, Report, Run

    def run(server: str, route_cpu: float, route: list[float], endpoint: list[float]) -> Run:
        r = Run(server, "sotw", 2000, 1000, 2000 if server == "pilot" else 1,
                "per-workload" if server == "pilot" else "replay", peak_rss_mb=400, empty_rss_mb=100,
                steady_rss_mb=250, idle_cpu_s=0.03, idle_seconds=3)
        # SotW at mission scale: 1.14 GB out per route change, 296 MB of EDS ACKs in per endpoint change.
        r.wire = {"route": [568_000, 118], "endpoint": [620, 148_000]}
        r.phases = [Phase("connect", 2000, 2000, Latency.of([1.0, 12.0]), 5.0, 250, 9.0),
                    Phase("route", 2000, 2000, Latency.of(route), route_cpu, 250, 1.4),
                    Phase("route", 2000, 2000, Latency.of(route), route_cpu + 0.2, 250, 1.2),
                    Phase("endpoint", 2000, 2000, Latency.of(endpoint), 0.3, 250, 0.5)]
        r.samples = {"route": route, "endpoint": endpoint}
        return r

    pilot = run("pilot", 0.8, [0.5, 1.3], [0.2, 0.5])
    base = run("baseline", 0.6, [0.5, 1.0], [0.2, 0.4])
    rows = {r["target"]: r for r in Report({"cpus": 2}, {}, [pilot, base]).targets()}
    route = rows["route change p99"]
    assert route["value"] == pytest.approx(1.3) and route["replay"] == pytest.approx(1.0)
    assert route["floor"] == pytest.approx((0.6 + 1.4 + 0.8 + 1.2) / 2 / 2)  # the baseline's two rounds
    assert rows["endpoint change p99"]["floor"] == pytest.approx((0.3 + 0.5) / 2)
    assert rows["pilot CPU per route change"]["replay"] == pytest.approx(0.7)
    assert rows["peak RSS"]["floor"] is None
    # The replay misses the route p99 limit (1.0 s is not < 1 s), the endpoint one (0.4 s) and the
    # CPU one (0.7 s) too: those figures are bytes-bound, and their ratio rows are the verdict.
    for bound in ("route change p99", "endpoint change p99", "pilot CPU per route change"):
        assert rows[bound]["met"] is None and rows[bound]["applies"] == "bytes"
    assert rows["peak RSS"]["met"] is True and rows["peak RSS"]["applies"] is True  # memory: never exempt
    cpu = rows["pilot CPU per route change / the replay's"]
    assert cpu["value"] == pytest.approx(0.9 / 0.7) and cpu["met"] is False and cpu["applies"] is True
    route_ratio = "route change p99 past the debounce / the replay's"
    endpoint_ratio = "endpoint change p99 past the debounce / the replay's"
    assert rows[route_ratio]["value"] == pytest.approx(1.3)  # no debounce recorded: nothing comes off
    assert rows[route_ratio]["met"] is False  # over 1.2x
    assert rows[endpoint_ratio]["value"] == pytest.approx(1.25)
    base.samples["endpoint"] = [0.2, 0.45]
    rows = {r["target"]: r for r in Report({"cpus": 2}, {}, [pilot, base]).targets()}
    assert rows[endpoint_ratio]["met"] is True  # 1.11x
    # Pilot's configured debounce comes off its p99 (not the CPU's ratio), and the row says what
    # the ratio is with it: 1.3 s - 0.2 s over 1.0 s is met, 1.3x with the wait is not.
    pilot.debounce_s = {"route": 0.2, "endpoint": 0.01}
    rows = {r["target"]: r for r in Report({"cpus": 2}, {}, [pilot, base]).targets()}
    assert rows[route_ratio]["value"] == pytest.approx(1.1) and rows[route_ratio]["met"] is True
    assert rows[route_ratio]["with_debounce"] == "1.30x with the debounce (200 ms)"
    assert rows["pilot CPU per route change / the replay's"]["value"] == pytest.approx(0.9 / 0.7)
    pilot.debounce_s = {}
    alone = {r["target"] for r in Report({"cpus": 2}, {}, [pilot]).targets()}
    assert "route change p99" in alone and route_ratio not in alone
    # A change of few bytes (delta: ~1.6 MB at 2,000 proxies) is never bytes-bound, even where the
    # replay misses the limit too: the absolute limit is the verdict and the ratio has none.
    for r in (pilot, base):
        r.wire = {"route": [804, 67], "endpoint": [760, 80]}
    rows = {r["target"]: r for r in Report({"cpus": 2}, {}, [pilot, base]).targets()}
    assert rows["route change p99"]["met"] is False and rows["route change p99"]["applies"] is True
    assert rows[route_ratio]["met"] is None and rows[route_ratio]["applies"] is False
    for r in (pilot, base):
        r.wire = {"route": [568_000, 118], "endpoint": [620, 148_000]}
    # The replay inside the CPU limit, but 1.2x of it not: a server the 1.2x rule passes could miss
    # the limit, so the bytes decide (0.45 s: 0.54 s allowed). With the replay at 0.4 s (0.48 s
    # allowed) both rules agree and the limit is the verdict again.
    cpu_row = "pilot CPU per route change"
    pilot.phases[1].server_cpu_s, pilot.phases[2].server_cpu_s = 0.4, 0.6  # 0.5 s: misses < 0.5 s
    for rounds, bytes_bound in (((0.4, 0.5), True), ((0.35, 0.45), False)):
        base.phases[1].server_cpu_s, base.phases[2].server_cpu_s = rounds
        rows = {r["target"]: r for r in Report({"cpus": 2}, {}, [pilot, base]).targets()}
        assert rows[cpu_row]["replay"] == pytest.approx(sum(rounds) / 2) and rows[cpu_row]["replay"] < 0.5
        if bytes_bound:
            assert rows[cpu_row]["met"] is None and rows[cpu_row]["applies"] == "bytes"
            assert rows[f"{cpu_row} / the replay's"]["met"] is True  # 1.11x
        else:
            assert rows[cpu_row]["met"] is False and rows[cpu_row]["applies"] is True
            assert rows[f"{cpu_row} / the replay's"]["met"] is False  # 1.25x
    # Where the replay is far inside the limit the bytes do not decide: the ratio has no verdict.
    base.samples["route"] = [0.05, 0.3]
    rows = {r["target"]: r for r in Report({"cpus": 2}, {}, [pilot, base]).targets()}
    ratio = rows[route_ratio]
    assert ratio["value"] == pytest.approx(1.3 / 0.3) and ratio["met"] is None and ratio["applies"] is False
    assert rows["route change p99"]["met"] is False  # the absolute limit applies again (1.3 s)
    assert rows["route change p99"]["applies"] is True


def test_ratios_past_the_debounce_take_pilots_configured_wait_off_its_own_latencies() -> None:
    """Pilot waits its debounce on purpose before acting on a change; the baseline replays at once.
    The ratio past the debounce takes exactly that wait off pilot's p99 (and nothing off the
    baseline's), and the debounce comes from pilot's settings, overridden by `--pilot-env`."""
    from benchmarks.report import Run, _ratios
    from benchmarks.runner import pilot_debounce

    assert pilot_debounce({}) == {"route": 0.1, "endpoint": 0.01}
    assert pilot_debounce({"MESHCTL_PILOT_DEBOUNCE_MS": "250"}) == {"route": 0.25, "endpoint": 0.01}
    pilot = Run("pilot", "sotw", 100, debounce_s=pilot_debounce({}))
    base = Run("baseline", "sotw", 100)
    for run, route, endpoint in ((pilot, 1.3, 0.51), (base, 1.0, 0.5)):
        run.samples = {"route": [route] * 100, "endpoint": [endpoint] * 100}
    ratios = _ratios(pilot, base)
    assert ratios["route_p99"] == pytest.approx(1.3) and ratios["route_p99_past_debounce"] == pytest.approx(1.2)
    assert ratios["endpoint_p99"] == pytest.approx(1.02) and ratios["endpoint_p99_past_debounce"] == pytest.approx(1.0)
    assert ratios["per_round_p99"] == {"connect": [], "route": [], "endpoint": []}  # no phases recorded here
    assert ratios["per_round_client_cpu"] == {"route": [], "endpoint": []}
    assert ratios["per_round_steal_s"] == {"route": [], "endpoint": []}
    assert ratios["slowest"] == {"route": None, "endpoint": None}


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_session_fanout_fleet_ends_synced_after_each_change(tmp_path: Path, delta: bool) -> None:
    from benchmarks import meshgen
    from benchmarks.session_fanout import Fleet, snapshot_of
    from pilot.xds.snapshot import Serializer
    from pilot.xds.status import SyncState

    config = meshgen.generate(tmp_path, services=3)
    serializer = Serializer()
    fleet = Fleet(3, delta, snapshot_of(config.directory, serializer))
    config.endpoint_change(1)
    config.write_service(1)
    answered, acked, sent = fleet.push(snapshot_of(config.directory, serializer))
    assert sent == 3 and answered > 0 and acked > 0  # one EDS response per stream, each ACKed
    states = {ts.state() for st in fleet.registry.streams() for ts in st.types.values()}
    assert states == {SyncState.SYNCED}


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_stream_fanout_takes_every_stream_through_pilots_handler_and_the_floor(delta: bool) -> None:
    """`benchmarks.stream_fanout`: each stream connects, takes every change through the handler pilot
    registers with gRPC and ACKs it (synced on every type at the end); the floor writes exactly the
    bytes pilot wrote, with fewer Python calls per stream."""
    import asyncio

    from benchmarks.session_fanout import mesh_changes
    from benchmarks.stream_fanout import run_fleet
    from pilot.xds.status import SyncState

    before, changes = mesh_changes(3, 2)
    pilot, registry = asyncio.run(run_fleet(5, delta, before, changes))
    assert pilot.received == 5 * (4 + 2 * 2)  # CDS, EDS, LDS, RDS, then one response per change
    states = [ts.state() for st in registry.departed for ts in st.types.values()]
    assert len(registry.departed) == 5 and set(states) == {SyncState.SYNCED} and len(states) == 5 * 4
    assert sorted(pilot.micros) == ["endpoint", "route"] and all(m > 0 for ms in pilot.micros.values() for m in ms)
    floor, _ = asyncio.run(run_fleet(5, delta, before, changes, {"connect": pilot.sent["endpoint"], **pilot.sent}))
    assert floor.received == pilot.received and floor.sent == pilot.sent
    assert all(0 < floor.calls[k] < pilot.calls[k] for k in ("endpoint", "route")), (floor.calls, pilot.calls)


def test_publish_fanout_takes_each_change_through_its_fast_path_to_every_class() -> None:
    """`benchmarks.publish_fanout`: one class per workload (2 per service), each change published by
    pilot's own pusher through its fast path (routes, then EDS), waking every class once."""
    import asyncio

    from benchmarks.publish_fanout import run

    result = asyncio.run(run(services=4, rounds=2))
    assert result.classes == 8
    assert result.fast == {"route": "routes", "endpoint": "eds"}
    assert result.woken == {"route": 8, "endpoint": 8}
    assert sorted(result.micros) == sorted(result.build_ms) == ["endpoint", "route"]
    assert all(m > 0 for ms in result.micros.values() for m in ms)
    assert all(calls > 0 for calls in result.calls.values()), result.calls


@pytest.mark.timeout(90)
def test_sample_dir_samples_the_server_during_each_change(tmp_path: Path) -> None:
    """`--sample-dir`: py-spy attaches to pilot and to the baseline while the clients connect and for
    every change, and leaves one raw stack file per phase, named for the server, protocol and phase."""
    quiet = Console(file=io.StringIO(), width=160)
    samples = tmp_path / "samples"
    samples.mkdir()
    report = run_benchmark([3], ["delta"], tmp_path, repeats=1, services=3, console=quiet,
                           idle_seconds=0.5, quiet_seconds=0.1, sample_dir=samples)
    assert all(r.converged for r in report.runs), [(r.server, r.error) for r in report.runs]
    names = sorted(p.name for p in samples.iterdir())
    assert names == ["baseline-delta-01-connect.txt", "baseline-delta-02-route.txt", "baseline-delta-03-endpoint.txt",
                     "pilot-delta-01-connect.txt", "pilot-delta-02-route.txt", "pilot-delta-03-endpoint.txt"], names
    pilot_stacks = "".join((samples / n).read_text() for n in names if n.startswith("pilot"))
    assert "pilot/" in pilot_stacks  # stacks of pilot's own code, "frame;frame;... count" lines


@pytest.mark.timeout(60)
def test_write_floor_delivers_every_byte_four_ways_and_reports_the_cpu() -> None:
    """`benchmarks.write_floor`: every stream's reader gets each round's bytes over gRPC, over
    gRPC's own TLS, over TLS through pilot's TLS front (the 15012 relay) and over plain TCP; the
    report gives the four rows and the CPU ratios."""
    import asyncio

    from benchmarks.write_floor import grpc_floor, report, tcp_floor

    floors = [*(asyncio.run(grpc_floor(7, 3000, 2, tls)) for tls in ("", "grpc", "front")), tcp_floor(7, 3000, 2)]
    assert [(f.transport, f.received) for f in floors] == [
        ("grpc.aio", 7 * 3000 * 2), ("grpc TLS", 7 * 3000 * 2), ("TLS front", 7 * 3000 * 2),
        ("plain TCP", 7 * 3000 * 2)]
    assert all(f.cpu > 0 and f.wall > 0 for f in floors)
    text = report(floors, 2)
    assert text.count(" yes") == 4
    for ratio in ("grpc.aio / plain TCP", "grpc TLS / grpc.aio", "TLS front / grpc.aio", "TLS front / grpc TLS"):
        assert f"{ratio} CPU:" in text


@pytest.mark.timeout(60)
def test_benchmark_spreads_services_and_their_proxies_over_namespaces(tmp_path: Path) -> None:
    """`--namespaces 2`: services alternate between bench-0 and bench-1, each proxy poses as a
    workload in its workload's namespace, and pilot serves them all to convergence."""
    from benchmarks import meshgen
    from benchmarks.runner import workload_nodes

    config = meshgen.generate(tmp_path / "mesh", services=4, namespaces=2)
    assert [s.host for s in config.services] == [
        "svc-000.bench-0.svc.cluster.local", "svc-001.bench-1.svc.cluster.local",
        "svc-002.bench-0.svc.cluster.local", "svc-003.bench-1.svc.cluster.local"]
    documents = yaml.safe_load_all((tmp_path / "mesh" / "svc-001.yaml").read_text())
    assert {d["metadata"]["namespace"] for d in documents} == {"bench-1"}
    assert [(n.namespace, n.workload) for n in workload_nodes(3, config.workloads())] == [
        ("bench-0", "svc-000-v1"), ("bench-0", "svc-000-v2"), ("bench-1", "svc-001-v1")]
    with pytest.raises(ValueError, match="namespaces"):
        meshgen.generate(tmp_path / "bad", services=2, namespaces=3)

    quiet = Console(file=io.StringIO(), width=200)
    report = run_benchmark([8], ["delta"], tmp_path / "run", repeats=1, services=4, namespaces=2,
                           classes="per-workload", idle_seconds=0.5, quiet_seconds=0.1, console=quiet, baseline=False)
    (run,) = report.runs
    assert run.converged and all(p.converged == 8 for p in run.phases), (run.error, [p.error for p in run.phases])
    assert report.settings["namespaces"] == 2


def test_minor_faults_count_pages_touched_for_the_first_time() -> None:
    before = minor_faults(os.getpid())
    touched = bytearray(64 * 1024 * 1024)  # zeroed memory: the kernel maps each page on first touch
    touched[::4096] = b"\x01" * len(touched[::4096])
    after = minor_faults(os.getpid())
    assert after - before >= 8_000  # 16,384 pages; allocators may map some ahead
    assert minor_faults(2**22 + 7) == 0  # a process that is not there


def test_thread_cpu_splits_a_process_by_thread() -> None:
    """A real process that spins its main thread, then a named worker thread (its name set through
    prctl, as gRPC names its threads): each thread's seconds are its own; a phase's split subtracts."""
    code = (
        "import ctypes, sys, threading, time\n"
        "def spin(seconds):\n"
        "    end = time.thread_time() + seconds\n"
        "    while time.thread_time() < end: pass\n"
        "spun = threading.Event()\n"
        "def worker():\n"
        "    ctypes.CDLL(None).prctl(15, b'busy_worker', 0, 0, 0)\n"  # PR_SET_NAME
        "    spin(0.3)\n"
        "    spun.set()\n"
        "    time.sleep(60)\n"  # alive while measured: a thread that ended is no longer listed
        "spin(0.2)\n"
        "threading.Thread(target=worker, daemon=True).start()\n"
        # once the worker has its 0.3 s (not after a fixed wait: on a loaded machine it got 0.21)
        "spun.wait(30); print('spun', flush=True); sys.stdin.readline()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "spun"
        split = dict(thread_cpu(proc.pid))
        assert split.get("main", 0) >= 0.15, split
        assert split.get("busy_worker", 0) >= 0.25, split
        assert set(split) == {"main", "busy_worker"}, split
    finally:
        proc.kill()
        proc.wait()
    phase = CpuSplit(2.0, 1.0, 30, (("event_engine", 0.5), ("main", 2.5))) - CpuSplit(1.0, 0.5, 10, (("main", 1.0),))
    assert phase == CpuSplit(1.0, 0.5, 20, (("event_engine", 0.5), ("main", 1.5)))
    assert thread_cpu(2**22 + 7) == ()  # a process that is not there


def test_change_wire_counts_what_each_proxy_is_sent_and_acks() -> None:
    """The arithmetic next to a change's figures: the recorded response's size, and an ACK as the
    proxy writes it: SotW repeats every name of the type it holds (from its earlier responses),
    delta carries the nonce alone. The targets table prints it for the change's rows."""
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from google.protobuf import any_pb2

    from benchmarks.report import Latency, Phase, Report, Run
    from benchmarks.wirebytes import ChangeWire, arithmetic, change_wire
    from pilot.xds import typeurls

    def cla(name: str) -> any_pb2.Any:
        packed = any_pb2.Any()
        packed.Pack(endpoint_pb2.ClusterLoadAssignment(cluster_name=name))
        return packed

    names = [f"outbound|9080||svc-{i}.bench.svc.cluster.local" for i in range(300)]
    first = discovery_pb2.DiscoveryResponse(type_url=typeurls.ENDPOINT, version_info="1", nonce="a",
                                            resources=[cla(n) for n in names])
    change = discovery_pb2.DiscoveryResponse(type_url=typeurls.ENDPOINT, version_info="2", nonce="b",
                                             resources=[cla(names[7])]).SerializeToString()
    sotw = change_wire({typeurls.ENDPOINT: [first.SerializeToString()]}, {"endpoint": change}, delta=False)
    expected_ack = discovery_pb2.DiscoveryRequest(type_url=typeurls.ENDPOINT, version_info="2", response_nonce="b",
                                                  resource_names=names)
    assert sotw == {"endpoint": ChangeWire(len(change), expected_ack.ByteSize())}
    assert sotw["endpoint"].ack > sum(len(n) for n in names) > 10 * sotw["endpoint"].response

    delta_change = discovery_pb2.DeltaDiscoveryResponse(type_url=typeurls.ENDPOINT, nonce="n1").SerializeToString()
    delta = change_wire({}, {"endpoint": delta_change}, delta=True)["endpoint"]
    assert delta.response == len(delta_change) and delta.ack < 100
    assert arithmetic(2000, ChangeWire(573_000, 148_000)) == \
        "2,000 x 573 KB = 1.15 GB out, 2,000 ACKs x 148 KB = 296 MB in"

    run = Run("pilot", "sotw", 2000, 1000, 2000, "per-workload", peak_rss_mb=400, steady_rss_mb=250,
              wire={"endpoint": [200, 148_000]})
    run.phases = [Phase("endpoint", 2000, 2000, Latency.of([0.1]), 0.1, 250, 1.0)]
    run.samples = {"endpoint": [0.1]}
    rows = {r["target"]: r for r in Report({}, {}, [run]).targets()}
    assert rows["endpoint change p99"]["bytes"] == "2,000 x 200 B = 400 KB out, 2,000 ACKs x 148 KB = 296 MB in"
    assert rows["route change p99"]["bytes"] == "" and rows["peak RSS"]["bytes"] == ""


def test_steady_rss_waits_until_the_server_stops_handing_memory_back() -> None:
    """`settled_rss`: the steady reading waits for the server's RSS to stop moving (pilot releases
    memory once its streams are quiet, which on a slow machine comes after the fixed pause), and
    gives up after its limit when it never settles."""
    from benchmarks.runner import settled_rss

    def server(readings: list[int]) -> tuple[Callable[[], int], list[float]]:
        slept: list[float] = []
        it = iter(readings)
        last = readings[-1]
        return (lambda: next(it, last)), slept

    rss, slept = server([480, 470, 400, 330, 292, 292, 291, 292])
    waited = settled_rss(rss, sleep=slept.append)
    assert waited == pytest.approx(0.25 * 7) and len(slept) == 7  # four readings within 1%: 292, 292, 291, 292
    rss, slept = server([300, 300, 300, 300])
    assert settled_rss(rss, sleep=slept.append) == pytest.approx(0.75)  # already at rest: three steps
    rss, slept = server(list(range(500, 100, -10)))
    assert settled_rss(rss, limit=2.0, sleep=slept.append) == pytest.approx(2.0)  # never settles: the limit


def test_machine_steal_reads_the_steal_column_of_proc_stat() -> None:
    """The figure per phase is /proc/stat's steal column (the eighth number after "cpu") in
    seconds: read between two reads of that column, it lies between them (another column, idle or
    user time, would not), and it never goes back."""
    import os

    from benchmarks.procs import machine_steal

    def ticks() -> int:
        with open("/proc/stat", encoding="ascii") as stat:
            return int(stat.readline().split()[8])

    tick = os.sysconf("SC_CLK_TCK")
    before = ticks()
    first = machine_steal()
    after = ticks()
    assert before / tick <= first <= after / tick
    assert machine_steal() >= first


def test_slowest_change_names_pilots_highest_p99_its_steal_and_the_replays_pair() -> None:
    """A missed latency row is about pilot's slowest changes: the report names the one with the
    highest p99, the host's steal during it and the baseline's change made right after it."""
    from benchmarks.report import Latency, Phase, Run, _ratios

    pilot, base = Run("pilot", "delta", 2000), Run("baseline", "delta", 2000)
    for p99, steal in ((0.21, 0.0), (0.56, 0.47), (0.29, 0.0)):
        pilot.phases.append(Phase("endpoint", 2000, 2000, Latency.of([p99]), 0.3, 290, 0.2, machine_steal_s=steal))
    for p99, steal in ((0.15, 0.0), (0.22, 0.05), (0.16, 0.0)):
        base.phases.append(Phase("endpoint", 2000, 2000, Latency.of([p99]), 0.2, 190, 0.2, machine_steal_s=steal))
    slowest = _ratios(pilot, base)["slowest"]
    assert slowest["route"] is None  # no route change measured
    assert slowest["endpoint"] == {"index": 2, "of": 3, "p99_s": 0.56, "steal_s": 0.47,
                                   "replay_p99_s": 0.22, "replay_steal_s": 0.05}
