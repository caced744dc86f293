"""DestinationRule and Sidecar features through real Envoy and real HTTP: consistent hashing on a
cookie, a query parameter and the source address; portLevelSettings and subset policies
overriding the rule level as Istio documents; TLS origination (SIMPLE) to a TLS-only backend;
``maxRequestsPerConnection``; and Sidecar ``ingress[].defaultEndpoint``.

One local mesh per module: a client sidecar, two echo backends (``a`` and ``b``) behind their
own sidecars, a TLS-only backend without a sidecar, and a workload (``shifted``) whose Sidecar
moves its app away from ``127.0.0.1:<workload port>``. Each feature has its own service host and
DestinationRule, so tests share no Envoy state; backend delays are reset after each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import ssl
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from multidict import CIMultiDict

from meshctl.devcerts import DevCa
from meshctl.echoapp import make_app, start_echo_app
from meshctl.envoy import EnvoyProcess
from meshctl.localmesh import LocalMesh, free_port, http_session
from pilot.settings import PilotSettings
from tests.e2e.conftest import random_block

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

PORT, ALT_PORT, TLS_PORT = 8080, 8081, 8443
BACKENDS = ("a", "b")
TLS_HOSTS = ("secure", "wrongca", "plain", "mismatch")  # <name>.example.com, all on the TLS backend
CERT_HOSTS = ("secure", "wrongca", "plain")  # the backend's certificate does not name "mismatch"
TLS_RULES = {"secure": "ca.pem", "wrongca": "other-ca.pem", "mismatch": "ca.pem"}  # host -> caCertificates

# DestinationRule spec bodies (below `host:`), one service per entry; None: no DestinationRule.
RULES: dict[str, str | None] = {
    "cookie": "trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: session, path: /, ttl: 60s}}}}",
    "cookie-nottl": "trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: session}}}}",
    "cookie-session": "trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: session, ttl: 0s}}}}",
    "query": "trafficPolicy: {loadBalancer: {consistentHash: {httpQueryParameterName: user}}}",
    "source": "trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}",
    # Port 8081's entry sets only a load balancer: it replaces the rule level whole, so 8081 gets
    # Istio's default (unlimited) connection pool, not the rule's tight one.
    "ports": """\
trafficPolicy:
  loadBalancer: {simple: RANDOM}
  connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
  portLevelSettings:
  - port: {number: 8081}
    loadBalancer: {simple: ROUND_ROBIN}""",
    # v1 sets its own pool; v2 sets nothing and inherits the rule level's.
    "subsets": """\
trafficPolicy:
  connectionPool: {tcp: {maxConnections: 10}, http: {http1MaxPendingRequests: 10}}
subsets:
- name: v1
  labels: {name: a}
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
- name: v2
  labels: {name: b}""",
    "oneshot": "trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: 1}}}",
    "reuse": None,
}
HEADER = """\
---
apiVersion: networking.istio.io/v1
kind: {kind}
metadata: {{name: {name}, namespace: default}}
"""
SERVICE = """\
spec:
  hosts: [{name}.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{ports}]
  workloadSelector: {{labels: {{app: {app}}}}}
"""
TLS_SERVICE = """\
spec:
  hosts: [{name}.example.com]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  endpoints: [{{address: {address}, ports: {{http: {target}}}}}]
"""
SUBSET_ROUTES = """\
spec:
  hosts: [subsets]
  http:
  - match: [{headers: {x-subset: {exact: v1}}}]
    route: [{destination: {host: subsets, subset: v1}}]
  - route: [{destination: {host: subsets, subset: v2}}]
"""
HTTP_PORTS = f"{{number: {PORT}, name: http, protocol: HTTP}}, {{number: {ALT_PORT}, name: http-alt, protocol: HTTP}}"


@dataclass(frozen=True)
class Answer:
    status: int
    version: str  # which app answered; "" when none did
    headers: CIMultiDict[str]

    @property
    def overloaded(self) -> bool:
        """Shed by a circuit breaker (Envoy's local 503), not answered by an app."""
        return self.status == 503 and self.headers.get("x-envoy-overloaded") == "true"


@dataclass
class Mesh:
    mesh: LocalMesh
    config_dir: Path
    block: str
    client: str  # the client sidecar's address
    apps: dict[str, str]  # app name -> URL, for /_control
    shifted_ports: dict[str, int]  # workload port name -> the port the Sidecar forwards it to
    sni_seen: list[str]  # server names the TLS backend was asked for

    @property
    def sidecar(self) -> EnvoyProcess:
        return self.mesh.sidecars["default/client"]

    async def control(self, app: str, **body: Any) -> dict[str, Any]:
        async with http_session() as session, session.post(self.apps[app] + "/_control", json=body) as resp:
            assert resp.status == 200, await resp.text()
            result: dict[str, Any] = await resp.json()
            return result

    async def cluster_stat(self, cluster: str, stat: str) -> int:
        name = f"cluster.{cluster}.{stat}"
        stats = await self.sidecar.stats(f"^{re.escape(name)}$")
        return int(stats.get(name, 0))


def doc(kind: str, name: str, spec: str) -> str:
    return HEADER.format(kind=kind, name=name) + spec


def workload(name: str, address: str, labels: str, ports: str = "{}") -> str:
    return doc("WorkloadEntry", name, f"spec: {{address: {address}, labels: {labels}, ports: {ports}}}\n")


def rule(name: str, host: str, body: str) -> str:
    return doc("DestinationRule", name, f"spec:\n  host: {host}\n" + textwrap.indent(body, "  ") + "\n")


def sidecar_yaml(endpoints: dict[int, str]) -> str:
    """The Sidecar of ``shifted``: each workload port forwarded to the given defaultEndpoint."""
    ingress = "".join(
        f"  - port: {{number: {port}, protocol: HTTP, name: http-{port}}}\n    defaultEndpoint: '{target}'\n"
        for port, target in endpoints.items()
    )
    spec = "spec:\n  workloadSelector: {labels: {app: shifted}}\n" + (f"  ingress:\n{ingress}" if ingress else "")
    return doc("Sidecar", "shifted", spec)


def mesh_yaml(block: str, ports: dict[str, int], certs: Path) -> str:
    out = workload("client", f"{block}.10", "{app: client}")
    for i, b in enumerate(BACKENDS):
        port = ports[b]  # both service ports reach the same app
        out += workload(
            f"backend-{b}", f"{block}.{11 + i}", f"{{app: backend, name: {b}}}", f"{{http: {port}, http-alt: {port}}}"
        )
    out += workload(
        "shifted", f"{block}.13", "{app: shifted}", f"{{http: {ports['shifted']}, http-alt: {ports['shifted-alt']}}}"
    )
    for name, body in RULES.items():
        out += doc("ServiceEntry", name, SERVICE.format(name=name, ports=HTTP_PORTS, app="backend"))
        out += rule(name, name, body) if body else ""
    out += doc("ServiceEntry", "shifted", SERVICE.format(name="shifted", ports=HTTP_PORTS, app="shifted"))
    out += doc("VirtualService", "subsets", SUBSET_ROUTES)
    for name in TLS_HOSTS:
        spec = TLS_SERVICE.format(name=name, port=TLS_PORT, address=f"{block}.20", target=ports["tls"])
        out += doc("ServiceEntry", name, spec)
    for name, ca in TLS_RULES.items():
        tls = f"trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: {certs / ca}}}}}"
        out += rule(name, f"{name}.example.com", tls)
    return out


async def start_tls_backend(
    stack: contextlib.AsyncExitStack, address: str, port: int, certs: Path, sni_seen: list[str]
) -> None:
    """An echo app that speaks only TLS, its certificate from ``ca.pem`` naming ``CERT_HOSTS``."""
    ca = DevCa.create("e2e upstream CA")
    ca.write_ca(certs / "ca.pem")
    DevCa.create("e2e unrelated CA").write_ca(certs / "other-ca.pem")
    issued = ca.issue(certs, "backend", [f"{h}.example.com" for h in CERT_HOSTS])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(issued.cert, issued.key)

    def record_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sni_seen.append(name or "")

    context.sni_callback = record_sni
    runner = web.AppRunner(make_app("tls-backend", "tls"))
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, address, port, ssl_context=context).start()


async def start_shifted_apps(
    stack: contextlib.AsyncExitStack, mesh: LocalMesh, address: str, moved: dict[str, int]
) -> dict[str, str]:
    """The real apps where the Sidecar points, and decoys where the default would have gone."""
    urls = {}
    for name, host, port in (("instance", address, moved["http"]), ("loopback", "127.0.0.1", moved["http-alt"])):
        runner, urls[name] = await start_echo_app("shifted", name, host=host, port=port)
        stack.push_async_callback(runner.cleanup)
    for port_name in ("http", "http-alt"):
        urls[f"decoy-{port_name}"] = await mesh.start_app("default", "shifted", "decoy", port_name=port_name)
    return urls


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def pm(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    config_dir = tmp_path_factory.mktemp("policy-features")
    certs = tmp_path_factory.mktemp("policy-features-certs")
    block = random_block()
    ports = {name: free_port() for name in (*BACKENDS, "shifted", "shifted-alt", "tls")}
    moved = {"http": free_port(), "http-alt": free_port()}
    sni_seen: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        await start_tls_backend(stack, f"{block}.20", ports["tls"], certs, sni_seen)
        (config_dir / "mesh.yaml").write_text(mesh_yaml(block, ports, certs))
        ingress = {ports["shifted"]: f"0.0.0.0:{moved['http']}", ports["shifted-alt"]: f"127.0.0.1:{moved['http-alt']}"}
        (config_dir / "sidecar.yaml").write_text(sidecar_yaml(ingress))
        settings = PilotSettings(ads_port=free_port(), debug_port=0, config_dir=config_dir, debounce_ms=50)
        mesh = await stack.enter_async_context(LocalMesh(settings))
        apps = {b: await mesh.start_app("default", f"backend-{b}", b) for b in BACKENDS}
        apps |= await start_shifted_apps(stack, mesh, f"{block}.13", moved)
        names = ["client", "shifted", *(f"backend-{b}" for b in BACKENDS)]
        await asyncio.gather(*(mesh.start_sidecar("default", n) for n in names))
        await mesh.wait_synced()
        yield Mesh(mesh, config_dir, block, f"{block}.10", apps, moved, sni_seen)


@pytest_asyncio.fixture(loop_scope="module", autouse=True)
async def calm_backends(pm: Mesh) -> AsyncIterator[None]:
    yield
    for b in BACKENDS:
        await pm.control(b, delay_ms=0, reset_counters=True)


async def get(session: aiohttp.ClientSession, pm: Mesh, host: str, path: str = "/", **headers: str) -> Answer:
    """One request through the client sidecar's outbound listener."""
    async with session.get(f"http://{pm.client}:15001{path}", headers={"Host": host, **headers}) as resp:
        body = await resp.json() if resp.content_type == "application/json" else {}
        return Answer(resp.status, body.get("version", ""), CIMultiDict(resp.headers))


async def versions(
    session: aiohttp.ClientSession, pm: Mesh, host: str, n: int, path: str = "/", **headers: str
) -> set[str]:
    """Which backends answered ``n`` sequential requests (each must succeed)."""
    answers = [await get(session, pm, host, path, **headers) for _ in range(n)]
    assert {a.status for a in answers} == {200}, [a.status for a in answers]
    return {a.version for a in answers}


async def burst(pm: Mesh, host: str, n: int, **headers: str) -> list[Answer]:
    """``n`` concurrent requests, each on its own connection to the client sidecar."""
    async with http_session() as session:
        return list(await asyncio.gather(*(get(session, pm, host, **headers) for _ in range(n))))


async def test_cookie_hash_sets_a_cookie_and_requests_carrying_it_stick(pm: Mesh) -> None:
    async with http_session() as session:
        first = await get(session, pm, f"cookie:{PORT}")
        assert first.status == 200 and first.version in BACKENDS
        set_cookies = first.headers.getall("Set-Cookie", [])
        assert len(set_cookies) == 1, set_cookies
        morsel = SimpleCookie(set_cookies[0])["session"]
        assert morsel["max-age"] == "60" and morsel["path"] == "/", set_cookies
        # Sent back as a browser would: the generated value hashes to the endpoint that answered.
        pair = set_cookies[0].split(";")[0]
        answers = [await get(session, pm, f"cookie:{PORT}", Cookie=pair) for _ in range(20)]
        assert {(a.status, a.version) for a in answers} == {(200, first.version)}
        assert not any("Set-Cookie" in a.headers for a in answers)  # only generated when missing
        chosen = {
            user: await versions(session, pm, f"cookie:{PORT}", 4, Cookie=f"session={user}")
            for user in (f"user-{i}" for i in range(24))
        }
    assert all(len(v) == 1 for v in chosen.values()), chosen
    assert set().union(*chosen.values()) == set(BACKENDS), chosen  # values spread over both


async def test_cookie_without_ttl_generates_none_and_zero_ttl_a_session_cookie(pm: Mesh) -> None:
    async with http_session() as session:
        no_ttl = await get(session, pm, f"cookie-nottl:{PORT}")
        assert no_ttl.status == 200 and "Set-Cookie" not in no_ttl.headers
        assert len(await versions(session, pm, f"cookie-nottl:{PORT}", 10, Cookie="session=bob")) == 1
        session_cookie = await get(session, pm, f"cookie-session:{PORT}")
    assert session_cookie.status == 200
    morsel = SimpleCookie(session_cookie.headers["Set-Cookie"])["session"]
    assert morsel.value and not morsel["max-age"] and not morsel["expires"], session_cookie.headers["Set-Cookie"]


async def test_query_parameter_hash_pins_each_value_to_one_endpoint(pm: Mesh) -> None:
    async with http_session() as session:
        alice = await versions(session, pm, f"query:{PORT}", 20, path="/items?user=alice&page=1")
        assert len(alice) == 1, alice
        # Only the named parameter counts: other parameters do not move alice.
        assert await versions(session, pm, f"query:{PORT}", 10, path="/other?page=7&user=alice") == alice
        chosen = {u: await versions(session, pm, f"query:{PORT}", 4, path=f"/?user={u}") for u in range(24)}
    assert all(len(v) == 1 for v in chosen.values()), chosen
    assert set().union(*chosen.values()) == set(BACKENDS), chosen


async def from_address(pm: Mesh, source: str, host: str, n: int) -> set[str]:
    """Backends answering ``n`` requests from ``source``, each on a new connection (new source port)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=10), trust_env=False
    ) as session:
        return await versions(session, pm, host, n)


async def test_source_ip_hash_pins_each_client_address_to_one_endpoint(pm: Mesh) -> None:
    sources = [f"{pm.block}.{100 + i}" for i in range(24)]
    chosen = {s: await from_address(pm, s, f"source:{PORT}", 4) for s in sources}
    assert all(len(v) == 1 for v in chosen.values()), chosen
    assert set().union(*chosen.values()) == set(BACKENDS), chosen
    # Without the hash the same client spreads: LEAST_REQUEST over the same two backends.
    assert await from_address(pm, sources[0], f"reuse:{PORT}", 30) == set(BACKENDS)


async def test_port_level_settings_replace_the_rule_level_policy_on_their_port(pm: Mesh) -> None:
    async with http_session() as session:
        on_alt = [(await get(session, pm, f"ports:{ALT_PORT}")).version for _ in range(20)]
        on_main = [(await get(session, pm, f"ports:{PORT}")).version for _ in range(40)]
    # 8081: the port-level ROUND_ROBIN alternates; 8080: the rule-level RANDOM repeats itself.
    assert set(on_alt) == set(BACKENDS) and all(x != y for x, y in itertools.pairwise(on_alt)), on_alt
    assert set(on_main) == set(BACKENDS) and any(x == y for x, y in itertools.pairwise(on_main)), on_main
    for b in BACKENDS:
        await pm.control(b, delay_ms=600)
    main, alt = await asyncio.gather(burst(pm, f"ports:{PORT}", 10), burst(pm, f"ports:{ALT_PORT}", 10))
    # 8080 keeps the rule's pool (one connection per endpoint at most, one queued request)...
    ok = [a for a in main if a.status == 200]
    assert 1 <= len(ok) <= 3 and len(ok) + sum(a.overloaded for a in main) == 10, [a.status for a in main]
    # ...while 8081's entry did not inherit it: Istio's defaults, nothing shed.
    assert [a.status for a in alt] == [200] * 10
    alt_cluster = f"outbound|{ALT_PORT}||ports.default.svc.cluster.local"
    assert await pm.cluster_stat(alt_cluster, "upstream_rq_pending_overflow") == 0


async def test_subset_policy_applies_to_its_subset_and_the_other_inherits_the_rule(pm: Mesh) -> None:
    for b in BACKENDS:
        await pm.control(b, delay_ms=600)
    v1, v2 = await asyncio.gather(
        burst(pm, f"subsets:{PORT}", 6, **{"x-subset": "v1"}), burst(pm, f"subsets:{PORT}", 6)
    )
    # v1's own pool (one connection, one queued request) sheds most of six concurrent requests.
    v1_ok = [a for a in v1 if a.status == 200]
    assert 1 <= len(v1_ok) <= 2 and {a.version for a in v1_ok} == {"a"}, [a.status for a in v1]
    assert all(a.overloaded for a in v1 if a.status != 200)
    # v2 inherits the rule's pool (10 + 10): six fit...
    assert {(a.status, a.version) for a in v2} == {(200, "b")}, [a.status for a in v2]
    # ...thirty do not, so v2 is limited by the rule level, not by Istio's unlimited default.
    many = await burst(pm, f"subsets:{PORT}", 30)
    ok = sum(a.status == 200 for a in many)
    assert 10 <= ok <= 20 and ok + sum(a.overloaded for a in many) == 30, Counter(a.status for a in many)


async def test_simple_tls_origination_verifies_the_backend_against_the_ca_file(pm: Mesh) -> None:
    async with http_session() as session:
        good = [await get(session, pm, f"secure.example.com:{TLS_PORT}") for _ in range(3)]
        wrong_ca = await get(session, pm, f"wrongca.example.com:{TLS_PORT}")
        wrong_name = await get(session, pm, f"mismatch.example.com:{TLS_PORT}")
        plaintext = await get(session, pm, f"plain.example.com:{TLS_PORT}")
    # The plain-HTTP client gets the TLS-only backend's answer; the sidecar sent SNI from the Host.
    assert [(a.status, a.version) for a in good] == [(200, "tls")] * 3
    assert "secure.example.com" in pm.sni_seen, pm.sni_seen
    assert await pm.cluster_stat(f"outbound|{TLS_PORT}||secure.example.com", "ssl.handshake") >= 1
    # A CA that did not sign the backend's certificate: the handshake fails, the client gets 503.
    assert wrong_ca.status == 503 and wrong_ca.version == ""
    assert await pm.cluster_stat(f"outbound|{TLS_PORT}||wrongca.example.com", "ssl.fail_verify_error") >= 1
    # No sni/subjectAltNames: the certificate must name the requested host, and it does not.
    assert wrong_name.status == 503 and wrong_name.version == ""
    assert await pm.cluster_stat(f"outbound|{TLS_PORT}||mismatch.example.com", "ssl.fail_verify_san") >= 1
    # Without the DestinationRule the sidecar speaks plaintext, which the backend refuses.
    assert plaintext.status == 503 and plaintext.version == ""


async def test_max_requests_per_connection_one_opens_a_connection_per_request(pm: Mesh) -> None:
    oneshot = f"outbound|{PORT}||oneshot.default.svc.cluster.local"
    reuse = f"outbound|{PORT}||reuse.default.svc.cluster.local"
    before = {c: await pm.cluster_stat(c, "upstream_cx_total") for c in (oneshot, reuse)}
    async with http_session() as session:
        for host in ("oneshot", "reuse"):
            await versions(session, pm, f"{host}:{PORT}", 10)
    opened = {c: await pm.cluster_stat(c, "upstream_cx_total") - before[c] for c in (oneshot, reuse)}
    assert opened[oneshot] == 10, opened
    assert await pm.cluster_stat(oneshot, "upstream_cx_max_requests") >= 9
    # Istio's default (unlimited) keeps connections alive: at most one per backend.
    assert opened[reuse] <= 2, opened


async def test_sidecar_ingress_default_endpoint_decides_where_inbound_traffic_goes(pm: Mesh) -> None:
    async with http_session() as session:
        # 0.0.0.0:P is the workload's own address; 127.0.0.1:P a loopback port other than the workload port.
        assert await versions(session, pm, f"shifted:{PORT}", 5) == {"instance"}
        assert await versions(session, pm, f"shifted:{ALT_PORT}", 5) == {"loopback"}
        for port_name in ("http", "http-alt"):
            assert (await pm.control(f"decoy-{port_name}"))["requests"]["total"] == 0
        # Without ingress listeners the sidecar forwards to the default, 127.0.0.1:<workload port>.
        revision = pm.mesh.pilot.store.revision
        (pm.config_dir / "sidecar.yaml").write_text(sidecar_yaml({}))
        await pm.mesh.wait_applied(revision)
        assert await versions(session, pm, f"shifted:{PORT}", 5) == {"decoy"}
        assert await versions(session, pm, f"shifted:{ALT_PORT}", 5) == {"decoy"}
