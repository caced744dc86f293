"""Mesh security under load: a fleet renewing at once, agent memory per workload, RBAC generation.

    python -m benchmarks.security_load --agents 1000 --memory-agents 1,50,200 --policies 1000 --json out.json

Three measurements, each with a baseline taken in the same run (see benchmarks/README.md):

1. **Renewal storm**: Citadel's CSR server runs as its own spawned process on 127.0.0.1 (gRPC
   over TLS, exactly `Citadel` as `meshctl up` builds it); `--agents` real `WorkloadAgent`
   objects (each with its own token file, identity `bench/sa-<i>`, TLS channel and SDS secret
   store) live in `--agent-workers` spawned processes. The benchmark drives the agent's own
   renewal step, `WorkloadAgent.obtain()` (fresh key in a worker thread, CSR, CreateCertificate,
   response check, publish to the SDS store), on every agent at once; the SDS server and the
   renewal timer are not started (no Envoy). Twice: first on new channels (TCP + TLS handshake
   per agent, as after gRPC's idle timeout, which a 12 h renewal period always exceeds), then
   again on the open channels. Measured: each agent's time from "go" until its certificate was
   published (p50/p99) and until the last one (*all*), failures by reason, the CA process's CPU
   seconds (psutil, user + system, every thread) and the agent workers' CPU seconds. Baselines:
   the same number of signings in one process without gRPC, `CertificateAuthority.sign_csr`
   alone (csr_sign's core path) and `CSRService.create_certificate` (token check + sign + PEM).
2. **Agent memory per workload**: for each K in `--memory-agents` a fresh spawned process starts
   K agents (SDS server on its own Unix socket, renewal loop, first certificate from the CA)
   and this process connects one SDS stream per agent as Envoy does (`default` and `ROOTCA`
   subscribed, answered and ACKed). RSS is the median of 5 readings; per workload =
   (RSS(K) - RSS(1)) / (K - 1). Baseline: the same process with no agent (K = 0).
3. **RBAC generation**: `--policies` AuthorizationPolicies (a deterministic mix of ALLOW, DENY
   and AUDIT; principals, namespaces, request principals, ipBlocks, not-forms, hosts, ports,
   methods, path templates, and `when` on headers, source.ip, JWT claims, destination.port), all
   applying to one sidecar class (namespace `shop`, `app=api`, mesh certificates), with the
   workload's ServiceEntry (HTTP and TCP port) and `--services` other services. Timed: parse
   (validation), `build_mesh` and `generate` from scratch; the workload's RBAC filters alone;
   then `--edits` single-policy edits through pilot's memoized rebuild (the same `Conversions`
   memos pilot keeps). Baselines: the mesh without policies, and a rebuild with nothing changed.

Costs: the default run takes about 35 s on 2 cores (1,000 agents, 4 memory processes, 1,000
policies). Figures are printed, never asserted; the load average is printed at the start and the
end because the machine may be shared. Every spawned process is stopped on exit, errors included.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import click
import psutil
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.table import Table

from benchmarks.csr_sign import percentile
from benchmarks.procs import ProcessGroup, ResourceMeter
from citadel.agent.agent import WorkloadAgent, failure_reason
from citadel.agent.credential import new_request
from citadel.agent.settings import AgentSettings
from citadel.app import Citadel
from citadel.authn import Credentials
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, certs_pem
from citadel.settings import CitadelSettings

TRUST_DOMAIN = "cluster.local"
AGENT_NAMESPACE = "bench"
GUARD = 300.0  # seconds any one step may take before the run gives up (and says so)
RSS_READINGS = 5

T = TypeVar("T")


def loadavg() -> tuple[float, float, float]:
    """The 1/5/15-minute load averages (the machine may be shared)."""
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


@dataclass
class Row:
    """One printed row: its table, its name, and its figures (None = not measured)."""

    table: str
    name: str
    figures: dict[str, float | int | str | None]


@dataclass
class Report:
    """Everything one run measured; `--json` writes `asdict(report)`."""

    settings: dict[str, Any]
    cpu_count: int | None
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float] | None = None
    rows: list[Row] = field(default_factory=list)
    derived: dict[str, float | None] = field(default_factory=dict)
    sections_load: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def row(self, table: str, name: str) -> Row:
        """The row called `name` in `table` (KeyError if missing)."""
        for r in self.rows:
            if r.table == table and r.name == name:
                return r
        raise KeyError(f"{table}/{name}")

    def write_json(self, path: Path) -> None:
        """Write the report as JSON."""
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


# --- 1. the renewal storm ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentSpec:
    """What a worker needs to build one agent (picklable)."""

    service_account: str
    token_file: str
    sds_socket: str


@dataclass(frozen=True)
class FleetSettings:
    """What every agent of the run shares (picklable)."""

    ca_address: str
    ca_root_file: str
    key_algorithm: str
    ca_timeout_s: float


def _agent(spec: AgentSpec, fleet: FleetSettings) -> WorkloadAgent:
    settings = AgentSettings(
        trust_domain=TRUST_DOMAIN, namespace=AGENT_NAMESPACE, service_account=spec.service_account,
        ca_address=fleet.ca_address, ca_root_file=Path(fleet.ca_root_file), token_file=Path(spec.token_file),
        sds_socket=Path(spec.sds_socket), key_algorithm=KeyAlgorithm(fleet.key_algorithm),
        ca_timeout=timedelta(seconds=fleet.ca_timeout_s))
    return WorkloadAgent(settings, CollectorRegistry())  # a registry each, as each sidecar has


async def _obtain_all(agents: list[WorkloadAgent]) -> dict[str, Any]:
    """Every agent's renewal step at once; seconds from "go" to each success, failures by reason."""
    go = time.monotonic()
    done: list[float] = []
    failures: dict[str, int] = {}

    async def one(agent: WorkloadAgent) -> None:
        try:
            await agent.obtain()
        except Exception as exc:
            reason = failure_reason(exc)
            failures[reason] = failures.get(reason, 0) + 1
            return
        done.append(time.monotonic() - go)

    await asyncio.gather(*(one(a) for a in agents))
    return {"done": done, "failures": failures, "elapsed": time.monotonic() - go}


async def _agent_worker_main(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    agents: list[WorkloadAgent] = []
    try:
        while True:
            command, *args = await loop.run_in_executor(None, conn.recv)
            if command == "agents":
                specs, fleet, start = args
                agents = [_agent(s, fleet) for s in specs]
                if start:
                    await asyncio.gather(*(a.start() for a in agents))
                    async with asyncio.timeout(GUARD):
                        await asyncio.gather(*(a.ready.wait() for a in agents))
                gc.collect()
                conn.send(("ready", [a.credential is not None for a in agents].count(True)))
            elif command == "obtain":
                conn.send(("obtained", await _obtain_all(agents)))
            elif command == "stop":
                break
    finally:
        for agent in agents:
            with contextlib.suppress(Exception):
                await agent.stop()  # safe when not started: closes the CA channel
        conn.send(("stopped",))


def agent_worker(conn: Connection) -> None:
    """Entry of a spawned agent process: obeys ("agents", specs, fleet, start), ("obtain",), ("stop",)."""
    asyncio.run(_agent_worker_main(conn))


def ca_server(conn: Connection, settings_json: str) -> None:
    """Entry of the spawned CA process: serve `Citadel` until told to stop; sends its port first."""
    settings = CitadelSettings.model_validate_json(settings_json)

    async def serve() -> None:
        async with Citadel(settings, CollectorRegistry()) as citadel:
            conn.send(("port", citadel.port))
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    asyncio.run(serve())


def _expect(conn: Connection, word: str, what: str, timeout: float = GUARD) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"{what}: no answer within {timeout:.0f} s")
    reply = conn.recv()
    if reply[0] != word:
        raise RuntimeError(f"{what}: unexpected answer {reply[0]!r}")
    return reply[1] if len(reply) > 1 else None


def _storm_figures(done: list[float], expected: int, failures: dict[str, int], ca_cpu: float | None,
                   agents_cpu: float | None, ca_peak_rss: int | None = None) -> dict[str, float | int | str | None]:
    ms = [d * 1e3 for d in done]
    return {
        "agents": expected,
        "renewed": len(done),
        "failures": sum(failures.values()),
        "failure_reasons": ",".join(f"{k}={v}" for k, v in sorted(failures.items())) or None,
        "p50_ms": round(statistics.median(ms), 1) if ms else None,
        "p99_ms": round(percentile(ms, 0.99), 1) if ms else None,
        "all_s": round(max(done), 3) if done and len(done) == expected else None,
        "ca_cpu_s": round(ca_cpu, 3) if ca_cpu is not None else None,
        "ca_cpu_ms_per_cert": round(ca_cpu * 1e3 / len(done), 3) if ca_cpu is not None and done else None,
        "agents_cpu_s": round(agents_cpu, 3) if agents_cpu is not None else None,
        "ca_peak_rss_mb": round(ca_peak_rss / 2**20, 1) if ca_peak_rss else None,
    }


async def _baselines(citadel: Citadel, csrs: list[tuple[SpiffeId, str, str]]) -> list[Row]:
    """The same signings in this process without gRPC: sign_csr alone, then the CSR service."""
    rows = []
    start, cpu0 = time.monotonic(), time.process_time()
    done = []
    for identity, csr, _ in csrs:
        citadel.ca.sign_csr(csr, 0, identity)
        done.append(time.monotonic() - start)
    rows.append(Row("renewal", "baseline: sign_csr in-process",
                    _storm_figures(done, len(csrs), {}, time.process_time() - cpu0, None)))
    start, cpu0 = time.monotonic(), time.process_time()
    done = []
    for _, csr, token in csrs:
        await citadel.service.create_certificate(csr, 0, Credentials(token, "bench"))
        done.append(time.monotonic() - start)
    rows.append(Row("renewal", "baseline: CSRService in-process",
                    _storm_figures(done, len(csrs), {}, time.process_time() - cpu0, None)))
    return rows


def _split(items: Sequence[AgentSpec], parts: int) -> list[list[AgentSpec]]:
    return [list(items[i::parts]) for i in range(parts)]


def _spawn_agents(group: ProcessGroup, specs: list[AgentSpec], fleet: FleetSettings, start: bool,
                  what: str) -> tuple[Connection, Any, int]:
    conn, proc = group.spawn(agent_worker)
    conn.send(("agents", specs, fleet, start))
    ready = _expect(conn, "ready", what)
    return conn, proc, int(ready)


def _stop_worker(group: ProcessGroup, conn: Connection, proc: Any) -> None:
    with contextlib.suppress(OSError, EOFError, TimeoutError, RuntimeError):
        conn.send(("stop",))
        _expect(conn, "stopped", "agent worker stop", 30)
    group.stop(proc, grace=10)


def run_storm(group: ProcessGroup, ca_pid: int, fleet: FleetSettings,
              specs: list[AgentSpec], workers: int, console: Console) -> list[Row]:
    """Phase 1 (see the module docstring): two storms over gRPC/TLS."""
    rows = []
    running: list[tuple[Connection, Any, ResourceMeter, int]] = []

    def stop_workers() -> None:
        for conn, proc, _, _ in running:
            _stop_worker(group, conn, proc)

    with contextlib.ExitStack() as stack:
        ca = stack.enter_context(ResourceMeter(ca_pid))  # samples the CA's RSS every 50 ms
        stack.callback(stop_workers)
        for part in _split(specs, workers):
            conn, proc, _ = _spawn_agents(group, part, fleet, False, "agent worker start")
            running.append((conn, proc, ResourceMeter(proc.pid), len(part)))
        for name in ("gRPC/TLS, new connections", "gRPC/TLS, open connections"):
            console.print(f"  {len(specs)} agents renewing at once: {name} ...")
            ca.mark()
            for _, _, meter, _ in running:
                meter.mark()
            for conn, _, _, _ in running:
                conn.send(("obtain",))
            results = [_expect(conn, "obtained", f"storm {name}") for conn, _, _, _ in running]
            ca_cpu, ca_peak = ca.phase()
            agents_cpu = sum(meter.phase()[0] for _, _, meter, _ in running)
            connections = _established(ca_pid)
            done = [d for r in results for d in r["done"]]
            failures: dict[str, int] = {}
            for r in results:
                for k, v in r["failures"].items():
                    failures[k] = failures.get(k, 0) + v
            figures = _storm_figures(done, len(specs), failures, ca_cpu, agents_cpu, ca_peak)
            figures["ca_connections"] = connections
            rows.append(Row("renewal", name, figures))
    return rows


def _established(pid: int) -> int | None:
    """TCP connections the CA process has open now: one per agent (gRPC shares none between channels)."""
    try:
        return sum(1 for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED)
    except psutil.Error:
        return None


# --- 2. agent memory -----------------------------------------------------------------------------------


async def _sds_streams_and_rss(sockets: list[str], pid: int) -> tuple[int, int]:
    """Connect one SDS stream per socket as Envoy does; then the median RSS of `pid` (bytes), streams answered."""
    from citadel.agent.secrets import ROOT_SECRET, WORKLOAD_SECRET
    from citadel.agent.testing import SDSStream

    streams = [SDSStream(Path(s)) for s in sockets]
    answered = 0
    try:
        async def subscribe(stream: SDSStream) -> bool:
            await stream.subscribe(WORKLOAD_SECRET, ROOT_SECRET)
            got: set[str] = set()
            while got != {WORKLOAD_SECRET, ROOT_SECRET}:
                response = await stream.read()
                got |= {n for n in _names(response)}
                await stream.ack(response, WORKLOAD_SECRET, ROOT_SECRET)
            return True

        answered = sum(await asyncio.gather(*(subscribe(s) for s in streams)))
        await asyncio.sleep(0.5)  # let the agents settle after the ACKs
        proc = psutil.Process(pid)
        readings = []
        for _ in range(RSS_READINGS):
            readings.append(proc.memory_info().rss)
            await asyncio.sleep(0.2)
        return int(statistics.median(readings)), answered
    finally:
        for s in streams:
            with contextlib.suppress(Exception):
                await s.close()


def _names(response: Any) -> list[str]:
    from citadel.agent.testing import names_of

    return names_of(response)


def run_memory(group: ProcessGroup, fleet: FleetSettings, specs: list[AgentSpec], counts: list[int],
               console: Console) -> tuple[list[Row], dict[str, float | None]]:
    """Phase 2: RSS of a fresh process per K agents with SDS served and one Envoy-like stream each."""
    rows = []
    rss: dict[int, int] = {}
    for k in sorted({0, *counts}):
        console.print(f"  memory: {k} agent(s) with SDS streams ...")
        conn, proc, ready = _spawn_agents(group, specs[:k], fleet, True, f"memory worker K={k}")
        try:
            value, answered = asyncio.run(_sds_streams_and_rss([s.sds_socket for s in specs[:k]], proc.pid))
        finally:
            _stop_worker(group, conn, proc)
        rss[k] = value
        name = "baseline: no agent" if k == 0 else f"{k} agent(s)"
        rows.append(Row("memory", name, {"agents": k, "certified": ready, "sds_streams": answered,
                                         "rss_mb": round(value / 2**20, 1)}))
    derived: dict[str, float | None] = {"first_agent_kb": None, "kb_per_agent": None}
    if 1 in rss:
        derived["first_agent_kb"] = round((rss[1] - rss[0]) / 1024, 1)
        biggest = max(rss)
        if biggest > 1:
            derived["kb_per_agent"] = round((rss[biggest] - rss[1]) / (biggest - 1) / 1024, 1)
        for row in rows:
            k = int(row.figures["agents"] or 0)
            row.figures["kb_per_agent_vs_1"] = round((rss[k] - rss[1]) / (k - 1) / 1024, 1) if k > 1 else None
    return rows, derived


# --- 3. RBAC generation -------------------------------------------------------------------------------

WORKLOAD_NS = "shop"
ROOT_NS = "istio-system"


def service_doc(name: str, labels: dict[str, str], ports: list[dict[str, Any]]) -> dict[str, Any]:
    """A MESH_INTERNAL ServiceEntry in `shop` selecting workloads by `labels`."""
    return {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": WORKLOAD_NS},
            "spec": {"hosts": [f"{name}.{WORKLOAD_NS}.svc.cluster.local"], "location": "MESH_INTERNAL",
                     "resolution": "STATIC", "ports": ports, "workloadSelector": {"labels": labels}}}


def policy_doc(i: int, rev: int = 0) -> dict[str, Any]:
    """The i-th AuthorizationPolicy of the mix; `rev` changes one path (an edit). Deterministic.

    Every policy applies to the benchmark class: 1 in 20 mesh-wide (root namespace), half of the
    rest namespace-wide, the others select `app=api`. 70% ALLOW, 20% DENY, 10% AUDIT; one to
    three rules, each with one or two sources, one or two operations and up to two conditions.
    """
    action = "DENY" if i % 10 in (3, 7) else "AUDIT" if i % 10 == 5 else "ALLOW"
    namespace = ROOT_NS if i % 20 == 0 else WORKLOAD_NS
    spec: dict[str, Any] = {"action": action}
    if i % 2:
        spec["selector"] = {"matchLabels": {"app": "api"}}
    rules = []
    for r in range(1 + i % 3):
        n = i * 3 + r
        sources: list[dict[str, Any]] = [{"source": {
            "principals": [f"{TRUST_DOMAIN}/ns/ns-{n % 17}/sa/sa-{n % 29}", f"{TRUST_DOMAIN}/ns/ns-{n % 13}/sa/*"],
            "notPrincipals": [f"{TRUST_DOMAIN}/ns/ns-{n % 17}/sa/legacy"]}}]
        if n % 2:
            sources.append({"source": {"namespaces": [f"ns-{n % 11}", f"team-{n % 7}-*"],
                                       "notIpBlocks": [f"10.{n % 250}.0.0/16"]}})
        if n % 5 == 1:
            sources.append({"source": {"requestPrincipals": [f"https://issuer-{n % 4}.example/*"],
                                       "ipBlocks": ["10.0.0.0/8", "192.168.0.0/16"]}})
        operations: list[dict[str, Any]] = [{"operation": {
            "methods": ["GET", "HEAD"] if n % 2 else ["POST", "PUT", "PATCH"],
            "paths": [f"/api/v{rev}/items/{n}/*", "/items/{*}/detail", f"/shop/{{**}}/orders/{n % 50}"],
            "ports": ["8080"]}}]
        if n % 3 == 0:
            operations.append({"operation": {"hosts": [f"api.{WORKLOAD_NS}.svc.cluster.local", "*.example.com"],
                                             "notPaths": ["/admin/*", "/debug/*"], "notMethods": ["DELETE"]}})
        when: list[dict[str, Any]] = []
        if n % 2 == 0:
            when.append({"key": "request.headers[x-tenant]", "values": [f"tenant-{n % 37}", "shared"]})
        if n % 3 == 1:
            when.append({"key": "source.ip", "notValues": [f"172.16.{n % 250}.0/24"]})
        if n % 4 == 2:
            when.append({"key": "request.auth.claims[groups]", "values": ["admins", f"group-{n % 9}"]})
        if n % 5 == 3:
            when.append({"key": "destination.port", "values": ["8080", "5432"]})
        rule: dict[str, Any] = {"from": sources, "to": operations}
        if when:
            rule["when"] = when
        rules.append(rule)
    spec["rules"] = rules
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": f"policy-{i:04d}", "namespace": namespace}, "spec": spec}


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 2)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t0


def _rbac_row(name: str, policies: int, rules: int, in_listeners: int | None, parse: list[float] | None,
              builds: list[Built] | None = None, compile_s: list[float] | None = None) -> Row:
    build = [b.build_s for b in builds] if builds else None
    gen = [b.generate_s for b in builds] if builds else compile_s or []
    totals = [b.build_s + b.generate_s for b in builds] if builds else gen
    return Row("rbac", name, {
        "policies": policies, "rbac_rules": rules, "rbac_in_listeners": in_listeners,
        "parse_ms": _median_ms(parse) if parse else None, "build_ms": _median_ms(build) if build else None,
        "generate_ms": _median_ms(gen) if gen else None, "total_ms": _median_ms(totals) if totals else None})


@dataclass(frozen=True)
class Built:
    """One timed build_mesh + generate."""

    mesh: Any
    resources: Any
    build_s: float
    generate_s: float


class RbacBench:
    """The RBAC measurement's mesh, class and timing steps (pilot imported only when used)."""

    def __init__(self, policies: int, services: int) -> None:
        from pilot.api import parse_object
        from pilot.model.build import build_mesh
        from pilot.model.conversions import Conversions
        from pilot.model.proxy import ProxyClass, ProxyKind
        from pilot.translate import generate

        self.parse_object, self.build_mesh, self.generate, self.memo = parse_object, build_mesh, generate, Conversions
        self.proxy = ProxyClass(ProxyKind.SIDECAR, WORKLOAD_NS, (("app", "api"),), mtls=True)
        http = {"number": 8080, "name": "http", "protocol": "HTTP"}
        docs = [service_doc("api", {"app": "api"}, [http, {"number": 5432, "name": "tcp", "protocol": "TCP"}])]
        docs += [service_doc(f"svc-{s:03d}", {"app": f"svc-{s:03d}"}, [http]) for s in range(services)]
        self.services = [parse_object(d) for d in docs]
        self.policy_docs = [policy_doc(i) for i in range(policies)]

    def parse_policies(self) -> list[Any]:
        """Every policy document parsed and validated, as pilot's config store does."""
        return [self.parse_object(d) for d in self.policy_docs]

    def build_and_generate(self, objects: list[Any], memos: tuple[Any, Any] | None = None) -> Built:
        """Build and generate, timed; fresh memos unless `memos` (pilot's, kept across builds) is given."""
        conversions, carry = memos or (self.memo(), self.memo())
        mesh, build_s = _timed(self.build_mesh, objects, "cluster.local", conversions, carry)
        resources, gen_s = _timed(self.generate, mesh, self.proxy)
        if not resources:
            raise RuntimeError("generate produced no resources for the benchmark class")
        return Built(mesh, resources, build_s, gen_s)

    def security(self, mesh: Any) -> Any:
        """The benchmark class's policies in `mesh`."""
        from pilot.model.authz import workload_security

        return workload_security(mesh.security, mesh.scoping.root_namespace, self.proxy.namespace,
                                 self.proxy.label_map)

    def rbac_filters(self, security: Any) -> list[Any]:
        """The class's HTTP and network RBAC filters, compiled."""
        from pilot.translate.rbac import http_rbac_filters, network_rbac_filters

        return [*http_rbac_filters(security), *network_rbac_filters(security)]

    def rules(self, mesh: Any) -> int:
        """How many Envoy RBAC policies (one per AuthorizationPolicy rule) the class's filters hold."""
        return sum(len(_unpack_rbac(f).rules.policies) for f in self.rbac_filters(self.security(mesh)))

    def rules_in_listeners(self, resources: Any) -> int:
        """Envoy RBAC policies in the generated listeners (every filter chain of every inbound port):
        what `generate` really emitted, the compiled filters times the chains that carry them."""
        from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2

        from pilot.translate.names import HCM_FILTER
        from pilot.translate.rbac import HTTP_RBAC_FILTER, NETWORK_RBAC_FILTER
        from pilot.xds.typeurls import LISTENER

        count = 0
        for listener in resources[LISTENER].values():
            for chain in listener.filter_chains:
                for f in chain.filters:
                    if f.name == NETWORK_RBAC_FILTER:
                        count += len(_unpack_rbac(f).rules.policies)
                    elif f.name == HCM_FILTER:
                        hcm = http_connection_manager_pb2.HttpConnectionManager()
                        f.typed_config.Unpack(hcm)
                        count += sum(len(_unpack_rbac(h).rules.policies) for h in hcm.http_filters
                                     if h.name == HTTP_RBAC_FILTER)
        return count


def run_rbac(policies: int, services: int, edits: int, repeats: int, console: Console) -> list[Row]:
    """Phase 3 (see the module docstring); every time is the median of its repetitions, in ms."""
    bench = RbacBench(policies, services)
    console.print(f"  RBAC: baseline without policies ({services + 1} services) ...")
    base = [bench.build_and_generate(bench.services) for _ in range(repeats)]
    rows = [_rbac_row("baseline: no policies", 0, 0, bench.rules_in_listeners(base[-1].resources), None, base)]

    console.print(f"  RBAC: {policies} policies from scratch ...")
    parsed = [_timed(bench.parse_policies) for _ in range(repeats)]
    objects = bench.services + parsed[-1][0]
    full = [_cold(bench.build_and_generate, objects) for _ in range(repeats)]
    rules, in_listeners = bench.rules(full[-1].mesh), bench.rules_in_listeners(full[-1].resources)
    rows.append(_rbac_row(f"{policies} policies, from scratch", policies, rules, in_listeners,
                          [p[1] for p in parsed], full))
    security = bench.security(full[-1].mesh)
    compiled = [_cold(_timed, bench.rbac_filters, security)[1] for _ in range(repeats)]
    rows.append(_rbac_row("RBAC filters alone (HTTP + network)", policies, rules, None, None, compile_s=compiled))

    console.print(f"  RBAC: {edits} single-policy edits, memoized as pilot rebuilds ...")
    memos = (bench.memo(), bench.memo())
    bench.build_and_generate(objects, memos)
    same = [bench.build_and_generate(objects, memos) for _ in range(repeats)]
    edit_parse, edited_builds = [], []
    current = list(objects)
    for e in range(edits if policies else 0):
        index = (e * 7919) % policies
        edited, seconds = _timed(bench.parse_object, policy_doc(index, rev=e + 1))
        current[len(bench.services) + index] = edited
        edit_parse.append(seconds)
        edited_builds.append(bench.build_and_generate(current, memos))
    last = edited_builds[-1] if edited_builds else same[-1]
    rows.append(_rbac_row("one policy edited (pilot's memoized rebuild)", policies, bench.rules(last.mesh),
                          bench.rules_in_listeners(last.resources), edit_parse, edited_builds))
    rows.append(_rbac_row("baseline: rebuild, nothing changed", policies, rules,
                          bench.rules_in_listeners(same[-1].resources), None, same))
    return rows


def _cold(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` with pilot's compiled-rule cache emptied first: a from-scratch figure must not
    reuse rules compiled by an earlier repetition."""
    from pilot.translate.rbac import rule_policy

    rule_policy.cache_clear()
    return fn(*args)


def _unpack_rbac(http_filter: Any) -> Any:
    """The RBAC config inside an HTTP or network filter (both keep `rules`)."""
    from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
    from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2

    packed = http_filter.typed_config
    config: Any = http_rbac_pb2.RBAC() if packed.type_url.endswith("http.rbac.v3.RBAC") else net_rbac_pb2.RBAC()
    packed.Unpack(config)
    return config


# --- the run --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _ca_process(group: ProcessGroup, settings: CitadelSettings) -> Iterator[tuple[int, int]]:
    conn, proc = group.spawn(ca_server, settings.model_dump_json())
    try:
        port = int(_expect(conn, "port", "CA process start", 60))
        yield proc.pid, port
    finally:
        with contextlib.suppress(OSError):
            conn.send("stop")
        group.stop(proc, grace=10)


def run_benchmark(*, agents: int = 1000, agent_workers: int = 1, memory_agents: Sequence[int] = (1, 50, 200),
                  policies: int = 1000, services: int = 20, edits: int = 5, repeats: int = 3,
                  key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256,
                  ca_key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256, ca_timeout: float = 10.0,
                  console: Console | None = None, workdir: Path | None = None) -> Report:
    """Run the three measurements and return the report (see the module docstring)."""
    console = console or Console()
    report = Report(settings={"agents": agents, "agent_workers": agent_workers, "memory_agents": list(memory_agents),
                              "policies": policies, "services": services, "edits": edits, "repeats": repeats,
                              "key_algorithm": key_algorithm.value, "ca_key_algorithm": ca_key_algorithm.value,
                              "ca_timeout_s": ca_timeout},
                    cpu_count=os.cpu_count(), load_start=loadavg())
    console.print(f"load average at start: {' '.join(map(str, report.load_start))} (cores: {report.cpu_count})")
    fleet_size = max(agents, *memory_agents, 1)
    with contextlib.ExitStack() as stack:
        work = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mesh-sec-")))
        group = stack.enter_context(ProcessGroup())
        settings = CitadelSettings(ca_dir=work / "ca", grpc_port=0, key_algorithm=ca_key_algorithm)
        citadel = Citadel(settings, CollectorRegistry())  # creates the root and token key the CA process loads
        (work / "tokens").mkdir(exist_ok=True)
        root_file = work / "root.pem"
        root_file.write_text(certs_pem(citadel.ca.trust_bundle()))
        specs = []
        identities = []
        for i in range(fleet_size):
            sa = f"sa-{i:05d}"
            token = citadel.issue_workload_token(work / "tokens" / sa, AGENT_NAMESPACE, sa, timedelta(hours=2))
            specs.append(AgentSpec(sa, str(work / "tokens" / sa), str(work / "sds" / f"{i}.sock")))
            identities.append((SpiffeId(TRUST_DOMAIN, AGENT_NAMESPACE, sa), token))

        report.sections_load["renewal"] = loadavg()
        console.print(f"baselines: {agents} signings in-process ...")
        csrs = [(ident, new_request(ident, key_algorithm)[1], token) for ident, token in identities[:agents]]
        report.rows += asyncio.run(_baselines(citadel, csrs))
        with _ca_process(group, settings) as (ca_pid, port):
            fleet = FleetSettings(f"127.0.0.1:{port}", str(root_file), key_algorithm.value, ca_timeout)
            report.rows += run_storm(group, ca_pid, fleet, specs[:agents], agent_workers, console)
            report.sections_load["memory"] = loadavg()
            memory_rows, derived = run_memory(group, fleet, specs, list(memory_agents), console)
            report.rows += memory_rows
            report.derived.update(derived)
    report.sections_load["rbac"] = loadavg()
    report.rows += run_rbac(policies, services, edits, repeats, console)
    report.load_end = loadavg()
    return report


COLUMNS = {
    "renewal": [("agents", "agents"), ("renewed", "renewed"), ("failures", "failed"), ("p50_ms", "p50 ms"),
                ("p99_ms", "p99 ms"), ("all_s", "all s"), ("ca_cpu_s", "CA CPU s"),
                ("ca_cpu_ms_per_cert", "CA CPU ms/cert"), ("agents_cpu_s", "agents CPU s"),
                ("ca_connections", "CA conns"), ("ca_peak_rss_mb", "CA peak RSS MB")],
    "memory": [("agents", "K agents"), ("certified", "certified"), ("sds_streams", "SDS streams"),
               ("rss_mb", "RSS MB"), ("kb_per_agent_vs_1", "KB/agent (vs K=1)")],
    "rbac": [("policies", "policies"), ("rbac_rules", "RBAC rules"), ("rbac_in_listeners", "in listeners"),
             ("parse_ms", "parse ms"), ("build_ms", "build_mesh ms"), ("generate_ms", "generate ms"),
             ("total_ms", "build+generate ms")],
}
TITLES = {
    "renewal": "CSR renewal storm (agents' renewal step at once against one CA process)",
    "memory": "agent memory (one process, K agents, one SDS stream each)",
    "rbac": "RBAC generation for one sidecar class",
}


def print_report(report: Report, console: Console) -> None:
    """The three tables, the derived figures and the load averages."""
    for table_name, columns in COLUMNS.items():
        table = Table(title=TITLES[table_name])
        table.add_column("case")
        for _, label in columns:
            table.add_column(label, justify="right")
        for row in (r for r in report.rows if r.table == table_name):
            table.add_row(row.name, *("-" if row.figures.get(k) is None else str(row.figures[k]) for k, _ in columns))
        console.print(table)
    reasons = [f"{r.name}: {r.figures['failure_reasons']}" for r in report.rows if r.figures.get("failure_reasons")]
    if reasons:
        console.print("failures by reason: " + "; ".join(reasons))
    console.print(f"memory per workload: {report.derived.get('kb_per_agent')} KB "
                  f"((RSS(K) - RSS(1)) / (K - 1), largest K); first agent: {report.derived.get('first_agent_kb')} KB "
                  "(RSS(1) - RSS(0))")
    console.print(f"load average at start: {' '.join(map(str, report.load_start))}, end: "
                  f"{' '.join(map(str, report.load_end or ()))} (cores: {report.cpu_count})")


def _counts(value: str) -> list[int]:
    try:
        counts = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: a comma-separated list of agent counts") from None
    if not counts or any(c < 1 for c in counts):
        raise click.BadParameter(f"{value!r}: counts must be at least 1")
    return counts


@click.command()
@click.option("--agents", default=1000, show_default=True, help="agents renewing at once")
@click.option("--agent-workers", default=1, show_default=True, help="processes the agents are spread over")
@click.option("--memory-agents", default="1,50,200", show_default=True, help="K values for the memory figure")
@click.option("--policies", default=1000, show_default=True, help="AuthorizationPolicies for the RBAC figure")
@click.option("--services", default=20, show_default=True, help="other services in the RBAC mesh")
@click.option("--edits", default=5, show_default=True, help="single-policy edits timed")
@click.option("--repeats", default=3, show_default=True, help="repetitions of each RBAC timing (median)")
@click.option("--key-algorithm", type=click.Choice([a.value for a in KeyAlgorithm]), default="ecdsa-p256",
              show_default=True, help="workload key type")
@click.option("--ca-key-algorithm", type=click.Choice([a.value for a in KeyAlgorithm]), default="ecdsa-p256",
              show_default=True, help="CA root key type")
@click.option("--ca-timeout", default=10.0, show_default=True, help="deadline of one CreateCertificate (agent default)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="write the report here")
def main(agents: int, agent_workers: int, memory_agents: str, policies: int, services: int, edits: int,
         repeats: int, key_algorithm: str, ca_key_algorithm: str, ca_timeout: float, json_path: Path | None) -> None:
    """Renewal storm against one CA, agent memory per workload, RBAC generation time."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=180)  # a log file or a pipe: keep each row on one line
    report = run_benchmark(agents=agents, agent_workers=max(1, agent_workers), memory_agents=_counts(memory_agents),
                           policies=policies, services=services, edits=edits, repeats=max(1, repeats),
                           key_algorithm=KeyAlgorithm(key_algorithm), ca_key_algorithm=KeyAlgorithm(ca_key_algorithm),
                           ca_timeout=ca_timeout, console=console)
    print_report(report, console)
    if json_path is not None:
        report.write_json(json_path)
        console.print(f"wrote {json_path}")


if __name__ == "__main__":
    main()
