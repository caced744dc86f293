"""`meshctl x simulate` against real Envoy: for each request, the prediction and what the sidecars did.

One local mesh (see ``route_features_mesh``): ``frontend`` calls ``web`` (subsets v1/v2, echo apps
that report their version) through its outbound listener. The ``web`` VirtualService exercises a
header match, exact, prefix and regex paths (a lowercase-only regex catch-all, so other paths get
404), weights 100/0 and 0/100, a redirect, a direct response and a fault abort; every route sets a
response header ``x-route`` naming itself, and an AuthorizationPolicy on web v1 denies ``/admin``.

For each request the test runs ``meshctl x simulate`` on ``frontend`` and, when the request leaves
for a workload, again on that workload's sidecar (the second hop, where RBAC acts), then sends the
same request for real and compares: status, route name (``x-route``), the cluster whose
``upstream_rq_total`` the frontend Envoy counted, and the version of the app that answered.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from click.testing import CliRunner

from meshctl.cli import cli
from meshctl.localmesh import http_session
from tests.e2e.route_features_mesh import HOST, Routes, running_mesh

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

ROUTES = """\
- name: hdr
  match: [{headers: {x-canary: {exact: "yes"}}}]
  route: [{destination: {host: web, subset: v2}}]
- name: exact
  match: [{uri: {exact: /exact}}]
  route: [{destination: {host: web, subset: v2}}]
- name: items
  match: [{uri: {regex: '/items/[0-9]+'}}]
  route: [{destination: {host: web, subset: v2}}]
- name: all-v2
  match: [{uri: {prefix: /v2}}]
  route: [{destination: {host: web, subset: v1}, weight: 0}, {destination: {host: web, subset: v2}, weight: 100}]
- name: all-v1
  match: [{uri: {prefix: /v1}}]
  route: [{destination: {host: web, subset: v1}, weight: 100}, {destination: {host: web, subset: v2}, weight: 0}]
- name: moved
  match: [{uri: {prefix: /old}}]
  redirect: {uri: /new, redirectCode: 308}
- name: teapot
  match: [{uri: {exact: /tea}}]
  directResponse: {status: 418, body: {string: short and stout}}
- name: chaos
  match: [{uri: {prefix: /chaos}}]
  fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
  route: [{destination: {host: web, subset: v1}}]
- name: lower
  match: [{uri: {regex: '/[a-z0-9/]*'}}]
  route: [{destination: {host: web, subset: v1}}]
"""
DENY_ADMIN = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  selector: {matchLabels: {app: web, version: v1}}
  action: DENY
  rules: [{to: [{operation: {paths: ['/admin*']}}]}]
"""
# (method, path, headers): requests sent through frontend's outbound listener with Host web:8080.
REQUESTS: list[tuple[str, str, dict[str, str]]] = [
    ("GET", "/", {}),
    ("GET", "/", {"x-canary": "yes"}),
    ("GET", "/", {"x-canary": "no"}),
    ("GET", "/exact", {}),
    ("POST", "/exact", {}),
    ("GET", "/exact/more", {}),
    ("GET", "/EXACT", {}),  # exact is case-sensitive, and the lowercase catch-all misses: 404
    ("GET", "/items/42", {}),
    ("GET", "/items/42x", {}),  # regex is a full match: falls to the catch-all
    ("GET", "/v2/page", {}),
    ("GET", "/v1/page", {}),
    ("GET", "/old/x?q=1", {}),
    ("GET", "/tea", {}),
    ("GET", "/chaos", {}),
    ("GET", "/admin/panel", {}),  # routed to v1, whose sidecar denies it
    ("GET", "/admin/panel", {"x-canary": "yes"}),  # routed to v2: no policy there
    ("GET", "/Items/1", {}),  # 404 again: no route
]


@dataclass(frozen=True)
class Seen:
    status: int
    route: str | None  # x-route, or None when Envoy answered before a route header applied
    cluster: str | None  # the frontend Envoy's cluster that counted the request
    version: str | None  # the echo app that answered
    location: str | None


def _with_headers() -> str:
    """ROUTES with `headers.response.set.x-route: <name>` on every route."""
    out = []
    for block in ROUTES.split("- name: ")[1:]:
        name = block.split("\n", 1)[0]
        out.append(f"- name: {block}  headers: {{response: {{set: {{x-route: {name}}}}}}}\n")
    return "".join(out).replace("\n\n", "\n")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def routes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Routes]:
    async with running_mesh(tmp_path_factory.mktemp("simulate")) as state:
        revision = state.mesh.pilot.store.revision
        (state.config_dir / "deny.yaml").write_text(DENY_ADMIN)
        await state.mesh.wait_applied(revision)
        await state.route(_with_headers())
        yield state


async def meshctl(routes: Routes, proxy: str, url: str, headers: dict[str, str], method: str) -> tuple[int, Any]:
    """`meshctl x simulate PROXY URL -o json` run in-process (its own event loop, in a thread)."""
    args = ["x", "simulate", proxy, url, "-X", method, "-o", "json", "--debug", str(routes.mesh.pilot.debug_address)]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    result = await asyncio.to_thread(CliRunner().invoke, cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.output)


async def counters(routes: Routes) -> dict[str, int]:
    """The frontend Envoy's upstream_rq_total per cluster."""
    admin = routes.mesh.sidecars["default/frontend"].admin_url
    async with http_session() as session, session.get(f"{admin}/stats", params={"filter": "upstream_rq_total$"}) as r:
        text = await r.text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^cluster\.(.+)\.upstream_rq_total: (\d+)$", text, re.M)}


async def observe(routes: Routes, method: str, path: str, headers: dict[str, str]) -> Seen:
    before = await counters(routes)
    reply = await routes.call(path, method=method, **{k.replace("-", "_"): v for k, v in headers.items()})
    after = await counters(routes)
    used = sorted(c for c, n in after.items() if n > before.get(c, 0))
    assert len(used) <= 1, used
    return Seen(reply.status, reply.headers.get("x-route"), used[0] if used else None,
                reply.body.get("version"), reply.headers.get("location"))


def _subset(cluster: str) -> str:
    return cluster.split("|")[2]


async def predict(routes: Routes, method: str, path: str, headers: dict[str, str]) -> tuple[int, Seen, Any]:
    """What meshctl says: exit code, the expected Seen, and the frontend trace."""
    code, trace = await meshctl(routes, "default/frontend", f"http://{HOST}{path}", headers, method)
    live = [b for b in trace["backends"] if b["percent"] > 0]
    cluster = live[0]["cluster"] if trace["outcome"] == "routed" and len(live) == 1 else None
    route = trace["route"] if trace["outcome"] in ("routed", "redirect", "direct_response", "fault_abort") else None
    if cluster is None:
        return code, Seen(trace["status"], route, None, None, trace["redirect"]), trace
    # Second hop: the same request arriving at the endpoint's sidecar (its inbound listener).
    endpoint = live[0]["endpoints"][0].split()[0]
    hop_code, hop = await meshctl(routes, f"default/web-{_subset(cluster)}", f"http://{endpoint}{path}",
                                  {**headers, "Host": HOST}, method)
    assert hop["entry"] == "direct", hop
    if hop["outcome"] == "denied":
        return hop_code, Seen(403, route, cluster, None, None), trace
    assert hop_code == 0 and hop["status"] is None and hop["backends"][0]["cluster"].startswith("inbound|"), hop
    return code, Seen(200, route, cluster, _subset(cluster), None), trace


async def test_simulate_agrees_with_envoy_on_every_request(routes: Routes) -> None:
    predicted, observed = [], []
    for method, path, headers in REQUESTS:
        code, expected, trace = await predict(routes, method, path, headers)
        seen = await observe(routes, method, path, headers)
        predicted.append((method, path, headers, expected))
        observed.append((method, path, headers, seen))
        assert code == (0 if seen.status not in (403, 404) else 1), (path, trace)
    assert predicted == observed
    # The set exercises what it claims: every route, a 404, a deny, a redirect, a direct response, a fault.
    statuses = {s.status for *_, s in observed}
    assert {200, 308, 403, 404, 418, 503} <= statuses
    assert {s.route for *_, s in observed} >= {"hdr", "exact", "items", "all-v1", "all-v2", "moved", "lower"}
    # The direct response's body, too.
    _, tea = await meshctl(routes, "default/frontend", f"http://{HOST}/tea", {}, "GET")
    url = f"http://{routes.addresses['frontend']}:15001/tea"
    async with http_session() as session, session.get(url, headers={"Host": HOST}) as resp:
        assert (resp.status, await resp.text()) == (tea["status"], tea["body"]) == (418, "short and stout")


async def test_direct_requests_to_the_denying_sidecar(routes: Routes) -> None:
    """The deny acts at web v1's own listener: simulated there, and sent there directly."""
    code, trace = await meshctl(routes, "default/frontend", f"http://{HOST}/", {}, "GET")
    v1 = next(b for b in trace["backends"] if _subset(b["cluster"]) == "v1")
    endpoint = v1["endpoints"][0].split()[0]
    for path, status in (("/admin", 403), ("/ok", 200)):
        code, hop = await meshctl(routes, "default/web-v1", f"http://{endpoint}{path}", {"Host": HOST}, "GET")
        async with http_session() as session, session.get(f"http://{endpoint}{path}", headers={"Host": HOST}) as r:
            real = r.status
        assert (real, code, hop["status"] or 200) == (status, 0 if status == 200 else 1, status), hop
        assert hop["rbac"][0]["action"] == "DENY"


async def test_the_installed_command_prints_text_and_sets_the_exit_code(routes: Routes) -> None:
    """`python -m meshctl.cli x simulate` as a user runs it: text on stdout, exit code 1 for a 404."""
    async def run(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshctl.cli", "x", "simulate", "frontend", *args,
            "--debug", str(routes.mesh.pilot.debug_address), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None, err
        return proc.returncode, out.decode()

    code, text = await run(f"http://{HOST}/v2/x")
    assert code == 0 and "Route:" in text and "100% outbound|8080|v2|web.default.svc.cluster.local" in text, text
    code, text = await run(f"http://{HOST}/NOPE")
    assert code == 1 and "not_found (status 404)" in text, text

