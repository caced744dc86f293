"""Captured traffic end to end: pods as network namespaces, real iptables redirects, real Envoys.

Pilot runs here with a local config directory (a ServiceEntry with a virtual IP that exists
nowhere but in the mesh, WorkloadEntries at the pods' addresses, a canary VirtualService) and
listens on the pod bridge's gateway. Each mesh pod gets the injector's redirect rules
(`injector.redirect`, applied with iptables-restore inside its namespace) and an Envoy running as
UID 1337 whose node says ``INTERCEPTION_MODE: REDIRECT``; the apps are plain HTTP servers and a
plain `curl` that knows nothing of the mesh. Shown: the app's connection to the VIP is captured and
routed by the VirtualService (header match, then a live edit), it arrives through the server
pod's inbound capture (15006), a connection to a non-mesh address passes through to it, and one
to a mesh pod's undeclared port reaches its app through inbound passthrough (from 127.0.0.6).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2

from injector.redirect import PROXY_UID, parse_options, restore_text
from meshctl.localmesh import free_port
from pilot.app import Pilot
from pilot.bootstrap import BootstrapSpec, render, sidecar_bootstrap
from pilot.model.proxy import META_BIND_ADDRESS, META_INSTANCE_IPS, META_INTERCEPTION_MODE
from pilot.settings import PilotSettings
from tests.k8s.pods import Pod, PodNetwork

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

VIP = "10.96.77.10"  # routed nowhere: only the sidecar's capture makes it reachable
HOST = "reviews.default.svc.cluster.local"
PORT = 9080
OUTSIDE_PORT = 7070
# (pod, port) of each app; v1 also serves a port no service declares (inbound passthrough).
APPS = (("v1", PORT), ("v2", PORT), ("v1", OUTSIDE_PORT), ("outside", OUTSIDE_PORT), ("outside", PORT))

MESH = f"""\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [{HOST}]
  addresses: [{VIP}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {PORT}, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: reviews}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
"""


def workloads(pods: dict[str, Pod]) -> str:
    return "".join(f"""---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: reviews-{v}, namespace: default}}
spec: {{address: {pods[v].ip}, labels: {{app: reviews, version: {v}}}}}
""" for v in ("v1", "v2"))


def route(default_subset: str) -> str:
    return f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {{end-user: {{exact: jason}}}}
    route:
    - destination: {{host: reviews, subset: v2}}
  - route:
    - destination: {{host: reviews, subset: {default_subset}}}
"""


APP = """\
import http.server, json, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"tag": sys.argv[1], "peer": self.client_address[0]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), Handler).serve_forever()
"""


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """Files the proxy UID must read (pytest's tmp_path is root-only); removed at the end."""
    path = Path(tempfile.mkdtemp(prefix="meshctl-captured-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def captured_bootstrap(pod: Pod, name: str, labels: dict[str, str], pilot: tuple[str, int]) -> str:
    """A sidecar bootstrap as the injected one would be: the pod's address, REDIRECT capture."""
    spec = BootstrapSpec(namespace="default", workload=name, address="127.0.0.1", labels=labels,
                         pilot_host=pilot[0], pilot_port=pilot[1])
    bootstrap = sidecar_bootstrap(spec)
    bootstrap.node.id = f"sidecar~{pod.ip}~{name}.default~default.svc.cluster.local"
    meta = struct_pb2.Struct()
    meta.CopyFrom(bootstrap.node.metadata)
    del meta.fields[META_BIND_ADDRESS]
    meta.update({META_INTERCEPTION_MODE: "REDIRECT", META_INSTANCE_IPS: pod.ip})
    bootstrap.node.metadata.CopyFrom(meta)
    return render(bootstrap, "json")


async def run(pod: Pod, *argv: str, stdin: str | None = None) -> str:
    """Run a command in the pod (off the event loop: pilot keeps serving) and return its stdout."""
    done = await asyncio.to_thread(pod.run, list(argv), stdin=stdin)
    return done.stdout


async def curl(pod: Pod, url: str, *args: str) -> dict[str, Any]:
    """The app's plain request (as root, so the pod's redirect rules capture it)."""
    out = await run(pod, "curl", "-sS", "--max-time", "10", *args, url)
    found: dict[str, Any] = json.loads(out)
    return found


async def admin(pod: Pod, path: str) -> str:
    return await run(pod, "curl", "-sS", "--max-time", "5", f"http://127.0.0.1:15000{path}")


async def until(what: str, check: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if await check():
                return
        except (AssertionError, ValueError) as exc:  # not up yet
            last = exc
        await asyncio.sleep(0.3)
    pytest.fail(f"timed out waiting for {what} (last error: {last})")


def stat(stats: str, name: str) -> int:
    for line in stats.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


async def test_captured_traffic_is_routed_arrives_through_inbound_capture_and_passes_through(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("pod sandboxes need root (ip netns, veth, bridge, iptables)")
    envoy = str(Path(sys.executable).parent / "envoy")
    with PodNetwork.running() as net, shared_dir() as files, contextlib.ExitStack() as logs:
        pods = {name: net.create(name) for name in ("client", "v1", "v2", "outside")}
        (tmp_path / "mesh.yaml").write_text(MESH + workloads(pods))
        (tmp_path / "route.yaml").write_text(route("v1"))
        (files / "app.py").write_text(APP)
        settings = PilotSettings(ads_host=net.gateway, ads_port=free_port(), debug_port=0, config_dir=tmp_path,
                                 debounce_ms=50)
        async with Pilot(settings) as pilot:
            for tag, port in APPS:
                pods[tag].popen([sys.executable, str(files / "app.py"), tag, str(port)])
            sidecars = {"client": {"app": "productpage"}, "v1": {"app": "reviews", "version": "v1"},
                        "v2": {"app": "reviews", "version": "v2"}}
            for name, labels in sidecars.items():
                pod = pods[name]
                await run(pod, "iptables-restore", "--noflush", stdin=restore_text(parse_options({})))
                path = files / f"{name}.json"
                path.write_text(captured_bootstrap(pod, name, labels, (net.gateway, pilot.ads_port)))
                log = logs.enter_context((tmp_path / f"{name}-envoy.log").open("w"))
                pod.popen([envoy, "-c", str(path), "--disable-hot-restart", "--concurrency", "1",
                           "--log-level", "warning"], user=PROXY_UID, stdout=log, stderr=log)

            async def configured(name: str, needle: str) -> bool:
                return needle in await admin(pods[name], "/config_dump")

            # Its virtual host arrives over VHDS (a delta Envoy 1.40), named for the configuration.
            await until("the client's route configuration 9080",
                        lambda: configured("client", f'"name": "{PORT}/{HOST}:{PORT}"'))
            for name in ("v1", "v2"):
                await until(f"{name}'s inbound chain", lambda n=name: configured(n, f"inbound|{PORT}||"))
            await until("the apps", lambda: _apps_up(pods))

            # The shapes Envoy took: Istio's listener model, not the Host-header one.
            dump = json.loads(await admin(pods["client"], "/config_dump?resource=dynamic_listeners"))
            listeners = {d["active_state"]["listener"]["name"]: d["active_state"]["listener"]
                         for d in dump["configs"] if "active_state" in d}
            assert listeners["virtualOutbound"]["use_original_dst"] is True
            assert listeners[f"0.0.0.0_{PORT}"]["bind_to_port"] is False
            assert "virtualInbound" in listeners and "0.0.0.0_15001" not in listeners

            # The app's plain request to the VIP is captured and routed by the VirtualService.
            jason = await curl(pods["client"], f"http://{VIP}:{PORT}/", "-H", "end-user: jason")
            assert jason["tag"] == "v2"
            assert jason["peer"] == "127.0.0.1"  # delivered by v2's sidecar: inbound capture worked
            for _ in range(4):
                assert (await curl(pods["client"], f"http://{VIP}:{PORT}/"))["tag"] == "v1"
            by_name = await curl(pods["client"], f"http://{HOST}:{PORT}/", "--resolve", f"{HOST}:{PORT}:{VIP}")
            assert by_name["tag"] == "v1"  # Host: the service name (as DNS would give the VIP)
            absolute = await curl(pods["client"], f"http://{VIP}:{PORT}/", "-H", f"Host: {HOST}.:{PORT}")
            assert absolute["tag"] == "v1"  # the absolute name, trailing dot (Istio 1.27 on), is the service's too
            inbound = await admin(pods["v2"], "/stats?filter=inbound")
            assert stat(inbound, f"http.inbound_{PORT}.downstream_rq_completed") >= 1, inbound

            # A live VirtualService edit reaches the per-port route configuration.
            (tmp_path / "route.yaml").write_text(route("v2"))

            async def moved() -> bool:
                return bool((await curl(pods["client"], f"http://{VIP}:{PORT}/"))["tag"] == "v2")

            await until("the edited route", moved)

            # Traffic to a non-mesh address passes through to where the app sent it: TCP on a port
            # no service has, and HTTP on the service port (allow_any in route configuration 9080).
            outside = pods["outside"].ip
            assert (await curl(pods["client"], f"http://{outside}:{OUTSIDE_PORT}/"))["tag"] == "outside"
            plain_http = await curl(pods["client"], f"http://{outside}:{PORT}/")
            assert plain_http == {"tag": "outside", "peer": pods["client"].ip}
            stats = await admin(pods["client"], "/stats?filter=PassthroughCluster")
            assert stat(stats, "cluster.PassthroughCluster.upstream_cx_total") >= 2, stats  # both went via Envoy

            # A mesh pod's port that no service declares: v1's inbound capture passes it through to
            # the app from 127.0.0.6, which its redirect rules let through.
            undeclared = await curl(pods["client"], f"http://{pods['v1'].ip}:{OUTSIDE_PORT}/")
            assert undeclared == {"tag": "v1", "peer": "127.0.0.6"}


async def _apps_up(pods: dict[str, Pod]) -> bool:
    """Each app answers locally (loopback is never captured)."""
    for name, port in APPS:
        got = await curl(pods[name], f"http://127.0.0.1:{port}/")
        if got["tag"] != name:
            return False
    return True
