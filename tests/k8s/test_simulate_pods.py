"""`meshctl x simulate` and `meshctl proxy-status` on a cluster, checked against real Envoys in injected pods.

The mesh of `test_mesh_in_pods.py` (`tests/k8s/meshpods.py`): a real API server, `meshctl up
--kubeconfig` as istiod, reviews v1/v2 and a sleep client injected by the webhook and run in
network namespaces with the redirect rules, sidecars over mutual TLS. One VirtualService on
`reviews` exercises the captured model (a header match, prefix routes, weights 0/100, a direct
response, a fault abort, a redirect and no catch-all, so other paths are 404 at the client's
sidecar); every route sets a response header `x-route` naming itself. An AuthorizationPolicy on
reviews-v2 denies `/admin/secret*`, which only v2's inbound sidecar can decide. A server outside
the mesh (a network namespace on the same bridge, unknown to the API server) answers on 9080 and
8000: the client's captured requests to it pass through.

For each request: `meshctl x simulate <sleep pod>.<ns> URL -H ... --to <clusterIP> -o json` (a
subprocess, as a user runs it) predicts the client sidecar's path, and for a request routed to a
reviews subset `meshctl x simulate <that pod> http://<pod ip>:9080... --inbound --from-principal
<sleep's SPIFFE id>` predicts the second hop; then the same request is sent for real by `curl` in
the client pod as its app user (so iptables captures it), and status, `x-route`, the cluster the
client Envoy counted (its admin's `upstream_rq_total`/`upstream_cx_total`), the answering app's
version, `Location` and the direct-response body must equal the prediction, and the prediction
must equal what the scenario intends (so the two cannot agree by both being wrong in one way).

proxy-status: every pod's sidecar SYNCED under `<pod>.<ns>`; the diff for one pod against its
Envoy admin, reached as a kubelet's port-forward reaches it (a forwarder inside the pod's network
namespace to its loopback 15000, over a Unix socket to a port on the host's loopback); without
`--admin` the command tries `kubectl port-forward`, which this cluster cannot serve (no kubelet
server), and must say so and exit 3.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshctl.localmesh import free_port
from tests.k8s.cluster import KubeCluster, kubectl_path
from tests.k8s.meshpods import (
    APP,
    APP_UID,
    PORT,
    Mesh,
    RunningPod,
    http_status,
    manifests,
    run_pods,
    started_mesh,
    until,
)
from tests.k8s.pods import REPO, Pod

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

OUTSIDE_TCP_PORT = 8000  # a port no mesh service has: the client's 15001 passes the connection through


def routes(ns: str) -> list[dict[str, Any]]:
    """DestinationRule subsets, the VirtualService under test, and the deny on reviews-v2."""
    def route(name: str, rule: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, **rule, "headers": {"response": {"set": {"x-route": name}}}}

    def to(subset: str, weight: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"destination": {"host": "reviews", "subset": subset}}
        return out if weight is None else {**out, "weight": weight}

    http = [
        route("canary-header", {"match": [{"headers": {"x-canary": {"exact": "yes"}}}], "route": [to("v2")]}),
        route("admin", {"match": [{"uri": {"prefix": "/admin"}}], "route": [to("v2")]}),
        route("v1-prefix", {"match": [{"uri": {"prefix": "/v1"}}], "route": [to("v1")]}),
        route("all-v2", {"match": [{"uri": {"prefix": "/split"}}], "route": [to("v1", 0), to("v2", 100)]}),
        route("teapot", {"match": [{"uri": {"exact": "/tea"}}],
                         "directResponse": {"status": 418, "body": {"string": "short and stout"}}}),
        route("chaos", {"match": [{"uri": {"prefix": "/chaos"}}], "route": [to("v1")],
                        "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 100}}}}),
        route("moved", {"match": [{"uri": {"prefix": "/old"}}], "redirect": {"uri": "/new", "redirectCode": 301}}),
    ]
    meta = {"name": "reviews", "namespace": ns}
    return [
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": meta,
         "spec": {"host": "reviews", "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": meta,
         "spec": {"hosts": ["reviews"], "http": http}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "deny-secret", "namespace": ns},
         "spec": {"selector": {"matchLabels": {"app": "reviews", "version": "v2"}}, "action": "DENY",
                  "rules": [{"to": [{"operation": {"paths": ["/admin/secret*"]}}]}]}},
    ]


@dataclass(frozen=True)
class Seen:
    """What a request met: status, the route header, the client's cluster, the app, Location, body."""

    status: int
    route: str | None = None
    cluster: str | None = None
    version: str | None = None
    location: str | None = None
    body: str | None = None


# (path, headers, intended status, intended route, intended version): to the reviews Service by name.
TO_REVIEWS: list[tuple[str, dict[str, str], int, str | None, str | None]] = [
    ("/", {}, 404, None, None),  # no route matches: the client sidecar answers 404
    ("/", {"x-canary": "yes"}, 200, "canary-header", "v2"),
    ("/v1/page", {}, 200, "v1-prefix", "v1"),
    ("/v1/page", {"x-canary": "yes"}, 200, "canary-header", "v2"),  # the first matching route wins
    ("/v1/page", {"x-canary": "no"}, 200, "v1-prefix", "v1"),
    ("/V1/page", {}, 404, None, None),  # prefixes are case-sensitive
    ("/split/a", {}, 200, "all-v2", "v2"),  # weights 0/100
    ("/tea", {}, 418, "teapot", None),
    ("/chaos/x", {}, 503, "chaos", None),
    ("/old/x?q=1", {}, 301, "moved", None),
    ("/nothing", {}, 404, None, None),
    ("/admin/panel", {}, 200, "admin", "v2"),
    ("/admin/secret/key", {}, 403, "admin", None),  # routed to v2, denied by v2's inbound RBAC
]
PASSTHROUGH_VERSION = "outside"


def test_simulate_agrees_with_envoy_in_pods(kube_cluster: KubeCluster) -> None:
    if os.geteuid() != 0:
        pytest.fail("pods as network namespaces need root (ip netns, veth, bridge, iptables, mount)")
    with contextlib.ExitStack() as stack:
        world, _names = started_mesh(kube_cluster, stack)
        applied = world.apply(manifests(world.ns))
        assert applied.returncode == 0, applied.stderr
        run_pods(world)
        outside = _outside_server(world, stack)
        applied = world.apply(routes(world.ns))
        assert applied.returncode == 0, applied.stderr
        pods = Pods(world)
        until("the rules in force at both sidecars", lambda: pods.send("/tea", {}).status == 418
              and pods.send("/admin/secret/x", {}).status == 403, timeout=120, tail=world.tails)

        checked = 0
        for path, headers, status, route, version in TO_REVIEWS:
            predicted = pods.predict(f"http://{world.host}:{PORT}{path}", headers, to=pods.vip)
            assert (predicted.status, predicted.route, predicted.version) == (status, route, version), \
                (path, headers, predicted)
            seen = pods.observe(path, headers)
            assert seen == predicted, (path, headers, seen, predicted)
            checked += 1
        for port in (PORT, OUTSIDE_TCP_PORT):
            url = f"http://{outside.ip}:{port}/somewhere"
            predicted = pods.predict(url, {})
            assert (predicted.status, predicted.cluster, predicted.version) == (
                200, "PassthroughCluster", PASSTHROUGH_VERSION), (url, predicted)
            seen = pods.observe(url, {}, tcp=port != PORT)
            assert seen == predicted, (url, seen, predicted)
            checked += 1
        assert checked >= 12

        _text_and_exit_codes(pods)
        _proxy_status(world, pods, stack)


class Pods:
    """The client pod, the reviews pods, and the two ways to ask them: meshctl and curl."""

    def __init__(self, world: Mesh) -> None:
        self.world = world
        running = list(world.containers.pods.values())
        self.client = next(p for p in running if p.name.startswith("sleep-"))
        self.reviews = {v: next(p for p in running if p.name.startswith(f"reviews-{v}-")) for v in ("v1", "v2")}
        self.vip = str(world.kubectl_json("get", "service", "reviews")["spec"]["clusterIP"])
        self.principal = f"spiffe://cluster.local/ns/{world.ns}/sa/sleep"

    def proxy(self, pod: RunningPod) -> str:
        return f"{pod.name}.{pod.namespace}"

    def meshctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": f"{kubectl_path().parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        return subprocess.run([sys.executable, "-m", "meshctl.cli", *args], capture_output=True, text=True,
                              timeout=60, cwd=REPO, check=False, env=env)

    def simulate(self, pod: RunningPod, url: str, headers: dict[str, str], *extra: str) -> tuple[int, Any]:
        args = ["x", "simulate", self.proxy(pod), url, "-o", "json", "--debug", self.world.debug, *extra]
        for name, value in headers.items():
            args += ["-H", f"{name}: {value}"]
        done = self.meshctl(*args)
        assert done.returncode in (0, 1), (args, done.stdout, done.stderr)
        return done.returncode, json.loads(done.stdout)

    def predict(self, url: str, headers: dict[str, str], to: str | None = None) -> Seen:
        """The client sidecar's trace, followed by the endpoint's inbound trace when it routes to a subset."""
        extra = ["--from-ip", self.client.sandbox.ip] + (["--to", to] if to else [])
        code, trace = self.simulate(self.client, url, headers, *extra)
        assert code == (0 if trace["matched"] else 1), trace
        outcome = trace["outcome"]
        route = trace["route"] if outcome in ("redirect", "direct_response", "fault_abort", "routed") else None
        if route is not None and route.startswith("allow_any"):
            route = None  # the passthrough virtual host's route sets no x-route
        live = [b for b in trace["backends"] if b["percent"] > 0]
        if outcome not in ("routed", "tcp"):
            body = trace["body"] if outcome == "direct_response" else None
            return Seen(trace["status"], route, None, None, trace["redirect"], body)
        assert len(live) == 1, trace
        cluster = str(live[0]["cluster"])
        if cluster == "PassthroughCluster":
            assert live[0]["dynamic"], trace  # original destination: the address the client connected to
            return Seen(200, route, cluster, PASSTHROUGH_VERSION)
        subset = cluster.split("|")[2]
        target = self.reviews[subset]
        endpoints = [e.split()[0] for e in live[0]["endpoints"]]
        assert endpoints == [f"{target.sandbox.ip}:{PORT}"], trace
        path = url.split(f":{PORT}", 1)[1]
        hop_code, hop = self.simulate(target, f"http://{endpoints[0]}{path}",
                                      {**headers, "Host": f"{self.world.host}:{PORT}"}, "--inbound",
                                      "--from-principal", self.principal, "--from-ip", self.client.sandbox.ip)
        assert hop["listener"] == "virtualInbound", hop
        if hop["outcome"] == "denied":
            assert hop_code == 1 and hop["status"] == 403, hop
            return Seen(403, route, cluster)
        assert hop_code == 0 and hop["outcome"] == "routed", hop
        assert [b["cluster"] for b in hop["backends"]] == [f"inbound|{PORT}||"], hop
        return Seen(200, route, cluster, subset)

    def send(self, url_or_path: str, headers: dict[str, str]) -> Seen:
        """The request for real: curl in the client pod as its app user, so the pod's rules capture it."""
        argv = ["curl", "-sS", "-i", "--max-time", "10"]
        if url_or_path.startswith("/"):
            url = f"http://{self.world.host}:{PORT}{url_or_path}"
            argv += ["--resolve", f"{self.world.host}:{PORT}:{self.vip}"]
        else:
            url = url_or_path
        for name, value in headers.items():
            argv += ["-H", f"{name}: {value}"]
        done = self.client.sandbox.run([*argv, url], user=APP_UID, check=False, timeout=30)
        if done.returncode != 0:
            return Seen(0, body=done.stderr)
        head, _, body = done.stdout.partition("\n\n")  # text mode: curl's CRLFs arrive as newlines
        status_line, *lines = head.split("\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        version = None
        if fields.get("content-type") == "application/json":
            version = json.loads(body).get("version")
        return Seen(int(status_line.split()[1]), fields.get("x-route"), None, version, fields.get("location"),
                    body if fields.get("content-type") == "text/plain" else None)

    def counters(self) -> dict[str, int]:
        """The client Envoy's per-cluster request and connection totals (`rq:` and `cx:` keys)."""
        text = self.client.sandbox.run(["curl", "-sS", "--max-time", "5",
                                        "http://127.0.0.1:15000/stats?filter=upstream_(rq|cx)_total$"]).stdout
        return {f"{m[2]}:{m[1]}": int(m[3])
                for m in re.finditer(r"^cluster\.(.+)\.upstream_(rq|cx)_total: (\d+)$", text, re.M)}

    def observe(self, url_or_path: str, headers: dict[str, str], tcp: bool = False) -> Seen:
        """`send`, and the one cluster whose counter moved in the client Envoy (none when it answered itself)."""
        before = self.counters()
        seen = self.send(url_or_path, headers)
        after = self.counters()
        kind = "cx:" if tcp else "rq:"
        used = sorted(k[3:] for k, n in after.items() if k.startswith(kind) and n > before.get(k, 0))
        assert len(used) <= 1, (url_or_path, used)
        body = seen.body if seen.status == 418 else None  # a direct response's body; others vary (Envoy's texts)
        return Seen(seen.status, seen.route, used[0] if used else None, seen.version, seen.location, body)


def _text_and_exit_codes(pods: Pods) -> None:
    """The text a person reads, and the exit codes scripts test."""
    url = f"http://{pods.world.host}:{PORT}/v1/page"
    done = pods.meshctl("x", "simulate", pods.proxy(pods.client), url, "--to", pods.vip, "--debug", pods.world.debug)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(rf"^Listener: +0\.0\.0\.0_{PORT} \(original-destination\)", done.stdout, re.M), done.stdout
    assert f"outbound|{PORT}|v1|{pods.world.host}: {pods.reviews['v1'].sandbox.ip}:{PORT}" in done.stdout
    done = pods.meshctl("x", "simulate", pods.proxy(pods.client), url.replace("/v1/", "/none/"), "--to", pods.vip,
                        "--debug", pods.world.debug)
    assert done.returncode == 1 and "not_found (status 404)" in done.stdout, done.stdout + done.stderr
    done = pods.meshctl("x", "simulate", "no-such-pod.nowhere", url, "--debug", pods.world.debug)
    assert done.returncode == 2 and "no connected proxy matches 'no-such-pod.nowhere'" in done.stderr, done.stderr


def _proxy_status(world: Mesh, pods: Pods, stack: contextlib.ExitStack) -> None:
    """Every sidecar SYNCED by pod name; one pod's diff through a forward to its admin; kubectl's failure."""
    everyone = [pods.client, *pods.reviews.values()]

    def all_synced() -> bool:
        lines = world.proxy_status().splitlines()
        rows = [next((line for line in lines if f"~{p.name}.{p.namespace}~" in line), "") for p in everyone]
        return all(row.split().count("SYNCED") == 4 for row in rows)

    until("every sidecar SYNCED in proxy-status", all_synced, tail=world.proxy_status)
    for pod in everyone:
        admin = _forward_admin(pod, stack)
        done = pods.meshctl("proxy-status", pods.proxy(pod), "--debug", world.debug, "--admin", admin)
        assert done.returncode == 0, done.stdout + done.stderr
        for kind in ("CDS", "LDS", "RDS", "EDS"):
            assert f"{kind}: in sync" in done.stdout, done.stdout
        if pod is pods.client:
            _proxy_config(pods, pod, admin)
    # The control plane answers `meshctl version` on a cluster too.
    done = pods.meshctl("version", "--debug", world.debug, "-o", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["control_plane"]["version"], done.stdout
    # Without --admin: pilot reports no admin for a pod, so meshctl asks kubectl to port-forward,
    # which needs the pod's kubelet to serve the stream; this cluster's kubelet does not.
    done = pods.meshctl("proxy-status", pods.proxy(pods.client), "--debug", world.debug,
                        "--kubeconfig", str(world.cluster.kubeconfig))
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"kubectl port-forward to pod {world.ns}/{pods.client.name}:15000:" in done.stderr, done.stderr


def _proxy_config(pods: Pods, pod: RunningPod, admin: str) -> None:
    """`meshctl proxy-config` on a pod's real Envoy (through the forward to its admin): the captured
    listener model's listeners, the per-port route configuration, the subset clusters, the endpoints."""
    proxy = pods.proxy(pod)
    listeners = pods.meshctl("proxy-config", "listeners", proxy, "--admin", admin)
    assert listeners.returncode == 0, listeners.stderr
    assert "15001" in listeners.stdout and "15006" in listeners.stdout, listeners.stdout
    routes = pods.meshctl("proxy-config", "routes", proxy, "--admin", admin, "-o", "json")
    assert routes.returncode == 0, routes.stderr
    assert '"name": "9080"' in routes.stdout.replace('":"', '": "'), routes.stdout[:2000]
    clusters = pods.meshctl("proxy-config", "clusters", proxy, "--admin", admin)
    assert clusters.returncode == 0, clusters.stderr
    host = f"reviews.{pod.namespace}.svc.cluster.local"
    assert host in clusters.stdout and "v1" in clusters.stdout and "v2" in clusters.stdout, clusters.stdout
    endpoints = pods.meshctl("proxy-config", "endpoints", proxy, "--admin", admin, "-o", "json")
    assert endpoints.returncode == 0, endpoints.stderr
    for reviews in pods.reviews.values():
        assert reviews.sandbox.ip in endpoints.stdout, (reviews.sandbox.ip, endpoints.stdout[:2000])


# A byte pipe between a listener and a target, each `unix:PATH` or `tcp:HOST:PORT`.
FORWARD = """\
import asyncio, sys
listen, target = sys.argv[1], sys.argv[2]
async def open_target():
    if target.startswith("unix:"):
        return await asyncio.open_unix_connection(target[5:])
    host, port = target[4:].rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))
async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
async def handle(reader, writer):
    try:
        tr, tw = await open_target()
    except OSError:
        writer.close()
        return
    await asyncio.gather(pipe(reader, tw), pipe(tr, writer), return_exceptions=True)
async def main():
    if listen.startswith("unix:"):
        server = await asyncio.start_unix_server(handle, listen[5:])
    else:
        host, port = listen[4:].rsplit(":", 1)
        server = await asyncio.start_server(handle, host, int(port))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""


def _forward_admin(pod: RunningPod, stack: contextlib.ExitStack) -> str:
    """What `kubectl port-forward` does through a kubelet: connect to 127.0.0.1:15000 inside the pod's
    network namespace and carry the bytes to a port on the host's loopback (here over a Unix socket)."""
    sock = Path(tempfile.mkdtemp(prefix="meshctl-fwd-")) / "admin.sock"
    stack.callback(shutil.rmtree, sock.parent, ignore_errors=True)
    pod.sandbox.popen([sys.executable, "-c", FORWARD, f"unix:{sock}", "tcp:127.0.0.1:15000"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    until("the in-pod forwarder", sock.exists)
    admin = f"127.0.0.1:{free_port()}"
    host = subprocess.Popen([sys.executable, "-c", FORWARD, f"tcp:{admin}", f"unix:{sock}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(_stop, host)
    until(f"{pod.name}'s admin through the forward", lambda: http_status(f"http://{admin}/ready") == 200)
    return admin


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _outside_server(world: Mesh, stack: contextlib.ExitStack) -> Pod:
    """A server outside the mesh: a network namespace on the pods' bridge that no Pod object names."""
    sandbox = world.containers.network.create("outside")
    stack.callback(sandbox.stop_processes)
    for port in (PORT, OUTSIDE_TCP_PORT):
        sandbox.popen([sys.executable, "-c", APP, PASSTHROUGH_VERSION, str(port)], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
        until(f"the outside server on {port}", lambda p=port: http_status(  # type: ignore[misc]
            f"http://{sandbox.ip}:{p}/ready") == 200)
    return sandbox

