"""The tests' kubelet, for real: pods as network namespaces on a bridge, the init container's
redirect rules (`meshctl redirect`) applied with iptables inside a pod, and a Pod object in the
real API server that the harness binds, addresses and marks Ready until an EndpointSlice shows it.

Pod A gets the rules; listeners in A stand in for Envoy's outbound (15001) and inbound (15006)
capture ports and answer with the original destination (SO_ORIGINAL_DST), so each connection
shows whether it was captured and that the destination survived the redirect.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.cluster import KubeCluster
from tests.k8s.pods import STATE_DIR, Kubelet, Pod, PodNetwork

COUNTERS = re.compile(r" \[\d+:\d+\]$")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ORIGDST = str(Path(__file__).with_name("origdst.py"))
MESHCTL = str(Path(sys.executable).with_name("meshctl"))
APP_UID, PROXY_UID = 1000, 1337
SERVICE_VIP = "10.96.7.7"  # not routed anywhere: only a redirect can answer it


@dataclass
class Pair:
    """Pod A (sidecar rules, capture listeners, an app port 8080) and pod B (a plain server on 9090)."""

    a: Pod
    b: Pod
    env: dict[str, str] | None = None  # PATH choosing the iptables backend

    def redirect(self, *flags: str) -> str:
        """Run the init container's command in pod A, as root (the container's securityContext)."""
        return self.a.run([MESHCTL, "redirect", *flags], env=self.env).stdout

    def ask(self, pod: Pod, host: str, port: int, user: int, source: str | None = None) -> str:
        """What a process of `user` in `pod` gets when it connects to host:port."""
        return pod.run([sys.executable, ORIGDST, "ask", host, str(port), *([source] if source else [])],
                       user=user).stdout.strip()

    def nat_table(self) -> str:
        """Pod A's nat rules as iptables-save prints them, without comments and packet counters
        (a chain policy's `[packets:bytes]` moves whenever a packet passes, e.g. a neighbour probe)."""
        saved = self.a.run(["iptables-save", "-t", "nat"], env=self.env).stdout
        return "\n".join(COUNTERS.sub("", line) for line in saved.splitlines() if not line.startswith("#"))


def _serve(pod: Pod, user: int, *specs: str) -> None:
    proc = pod.popen([sys.executable, ORIGDST, "serve", *specs], user=user, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "ready", f"listener in {pod.name} did not start: {line!r}"


@pytest.fixture(params=["nf_tables", "legacy"])
def pair(request: pytest.FixtureRequest, pod_network: PodNetwork, tmp_path: Path) -> Iterator[Pair]:
    """Two pods; the command finds `iptables-restore` of the given backend first on its PATH."""
    a, b = pod_network.create("a"), pod_network.create("b")
    _serve(a, PROXY_UID, "outbound:15001", "inbound:15006", "health:15021")
    _serve(a, APP_UID, "app:8080")
    _serve(b, APP_UID, "b:9090", "b:5432")
    env = None
    if request.param == "legacy":
        shim = tmp_path / "legacy-bin"
        shim.mkdir()
        for tool in ("iptables-restore", "iptables-save"):
            legacy = shutil.which(tool.replace("iptables", "iptables-legacy"))
            assert legacy, f"{tool}: the legacy backend is not installed (Debian's iptables package has it)"
            (shim / tool).symlink_to(legacy)
        env = {**os.environ, "PATH": f"{shim}:{os.environ.get('PATH', '')}"}
    yield Pair(a, b, env)


def test_pods_talk_over_the_bridge_without_rules(pair: Pair, pod_network: PodNetwork) -> None:
    assert pair.ask(pair.a, pair.b.ip, 9090, APP_UID) == f"b - {pair.a.ip}"
    assert pair.ask(pair.b, pair.a.ip, 8080, APP_UID) == f"app - {pair.b.ip}"
    # The host (node) reaches pods through the bridge, and pods reach the host at the gateway.
    got = subprocess.run([sys.executable, ORIGDST, "ask", pair.b.ip, "9090"], capture_output=True, text=True,
                         timeout=30, check=True).stdout.strip()
    assert got == f"b - {pod_network.gateway}"


def test_default_rules_capture_app_traffic_both_ways_and_spare_the_proxy(pair: Pair) -> None:
    pair.redirect()
    a, b = pair.a.ip, pair.b.ip
    # (a) the app's outbound connection lands on 15001, original destination intact
    assert pair.ask(pair.a, b, 9090, APP_UID) == f"outbound {b}:9090 {a}"
    assert pair.ask(pair.a, SERVICE_VIP, 80, APP_UID) == f"outbound {SERVICE_VIP}:80 {a}"
    # (b) the proxy's own connections (UID 1337) go out as they are
    assert pair.ask(pair.a, b, 9090, PROXY_UID) == f"b - {a}"
    # (c) inbound connections land on 15006 with the destination they were sent to
    assert pair.ask(pair.b, a, 8080, APP_UID) == f"inbound {a}:8080 {b}"
    # ... except the proxy's own ports (15021 health here)
    assert pair.ask(pair.b, a, 15021, APP_UID) == f"health - {b}"
    # Loopback as Istio: the app calling its own pod IP is left alone; the proxy calling it goes
    # to the inbound listener; the inbound passthrough (from 127.0.0.6) reaches the app.
    assert pair.ask(pair.a, a, 8080, APP_UID) == f"app - {a}"
    assert pair.ask(pair.a, a, 8080, PROXY_UID) == f"inbound {a}:8080 {a}"
    assert pair.ask(pair.a, a, 8080, PROXY_UID, source="127.0.0.6") == "app - 127.0.0.6"
    assert pair.ask(pair.a, "127.0.0.1", 8080, APP_UID) == "app - 127.0.0.1"
    # The rules live in pod A's namespace only.
    assert "ISTIO" not in pair.b.run(["iptables-save", "-t", "nat"]).stdout


def test_annotations_exclude_and_include_as_named(pair: Pair) -> None:
    a, b = pair.a.ip, pair.b.ip
    pair.redirect("--exclude-outbound-ip-ranges", f"{b}/32", "--exclude-inbound-ports", "8080")
    assert pair.ask(pair.a, b, 9090, APP_UID) == f"b - {a}"  # excluded range: direct
    assert pair.ask(pair.a, SERVICE_VIP, 80, APP_UID) == f"outbound {SERVICE_VIP}:80 {a}"
    assert pair.ask(pair.b, a, 8080, APP_UID) == f"app - {b}"  # excluded inbound port: to the app

    pair.redirect("--exclude-outbound-ports", "9090")
    assert pair.ask(pair.a, b, 9090, APP_UID) == f"b - {a}"  # excluded port: direct
    assert pair.ask(pair.a, b, 5432, APP_UID) == f"outbound {b}:5432 {a}"
    assert pair.ask(pair.b, a, 8080, APP_UID) == f"inbound {a}:8080 {b}"  # the earlier exclusion is gone

    pair.redirect("--include-outbound-ip-ranges", "10.96.0.0/12", "--include-inbound-ports", "15021")
    assert pair.ask(pair.a, SERVICE_VIP, 80, APP_UID) == f"outbound {SERVICE_VIP}:80 {a}"
    assert pair.ask(pair.a, b, 9090, APP_UID) == f"b - {a}"  # outside the included range: direct
    assert pair.ask(pair.b, a, 8080, APP_UID) == f"app - {b}"  # not an included inbound port
    assert pair.ask(pair.b, a, 15021, APP_UID) == f"inbound {a}:15021 {b}"  # included, so captured

    pair.redirect("--include-outbound-ip-ranges", "", "--include-outbound-ports", "5432")
    assert pair.ask(pair.a, b, 5432, APP_UID) == f"outbound {b}:5432 {a}"
    assert pair.ask(pair.a, b, 9090, APP_UID) == f"b - {a}"


def test_rerunning_is_idempotent(pair: Pair) -> None:
    pair.redirect("--exclude-inbound-ports", "9999")
    first = pair.nat_table()
    pair.redirect("--exclude-inbound-ports", "9999")
    pair.redirect("--exclude-inbound-ports", "9999")
    assert pair.nat_table() == first
    assert first.count("-j ISTIO_INBOUND") == 1 and first.count("-j ISTIO_OUTPUT") == 1
    assert pair.ask(pair.a, pair.b.ip, 9090, APP_UID) == f"outbound {pair.b.ip}:9090 {pair.a.ip}"
    assert pair.ask(pair.b, pair.a.ip, 8080, APP_UID) == f"inbound {pair.a.ip}:8080 {pair.b.ip}"


def test_bad_annotation_value_fails_naming_it_and_changes_nothing(pair: Pair) -> None:
    before = pair.nat_table()
    proc = pair.a.run([MESHCTL, "redirect", "--exclude-outbound-ip-ranges", "10.0.0.0/8,nope"], check=False,
                      env=pair.env)
    assert proc.returncode == 2
    assert "traffic.sidecar.istio.io/excludeOutboundIPRanges: '10.0.0.0/8,nope' has 'nope', not a CIDR" in proc.stderr
    assert pair.nat_table() == before


def _until(what: str, check: Callable[[], object], timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def _slice_endpoints(cluster: KubeCluster, ns: str, service: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("-n", ns, "get", "endpointslices", "-l", f"kubernetes.io/service-name={service}",
                          "-o", "json").stdout
    return [ep for item in json.loads(out)["items"] for ep in item.get("endpoints") or []]


def test_kubelet_makes_a_pod_an_endpoint(kube_cluster: KubeCluster, pod_network: PodNetwork,
                                         kubelet: Kubelet) -> None:
    ns = f"sandbox-{secrets.token_hex(4)}"
    kube_cluster.kubectl("create", "namespace", ns)
    try:
        _until(f"ServiceAccount default in {ns}", lambda: kube_cluster.kubectl(
            "-n", ns, "get", "serviceaccount", "default", check=False).returncode == 0)
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": ns},
                   "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]}}
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "reviews-v1", "namespace": ns, "labels": {"app": "reviews"}},
               "spec": {"containers": [{"name": "app", "image": "example/reviews:1",
                                        "ports": [{"containerPort": 9080}]}]}}
        kube_cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([service, pod]))
        sandbox = pod_network.create("reviews-v1")
        _serve(sandbox, APP_UID, "reviews:9080")

        kubelet.start(ns, "reviews-v1", sandbox)
        got = json.loads(kube_cluster.kubectl("-n", ns, "get", "pod", "reviews-v1", "-o", "json").stdout)
        assert got["spec"]["nodeName"] == kubelet.node
        assert got["status"]["podIP"] == sandbox.ip

        def ready_endpoint() -> list[dict[str, Any]]:
            return [ep for ep in _slice_endpoints(kube_cluster, ns, "reviews")
                    if ep["addresses"] == [sandbox.ip] and ep["conditions"] == {
                        "ready": True, "serving": True, "terminating": False}]
        endpoint = _until("a ready EndpointSlice endpoint at the sandbox IP", ready_endpoint)
        assert isinstance(endpoint, list) and endpoint[0]["nodeName"] == kubelet.node
        # ... and the address really serves: the host reaches it through the bridge.
        got_line = subprocess.run([sys.executable, ORIGDST, "ask", sandbox.ip, "9080"], capture_output=True,
                                  text=True, timeout=30, check=True).stdout.strip()
        assert got_line == f"reviews - {pod_network.gateway}"

        kubelet.report(ns, "reviews-v1", sandbox.ip, ready=False)
        _until("the endpoint not ready", lambda: [
            ep for ep in _slice_endpoints(kube_cluster, ns, "reviews") if ep["conditions"].get("ready") is False])

        kube_cluster.kubectl("-n", ns, "delete", "pod", "reviews-v1", "--wait=false")
        _until("the deleted pod gone (the kubelet confirms it)", lambda: kube_cluster.kubectl(
            "-n", ns, "get", "pod", "reviews-v1", check=False).returncode != 0)
        _until("the endpoint removed", lambda: not _slice_endpoints(kube_cluster, ns, "reviews"))
        assert kubelet.errors == []
    finally:
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false")


def test_kubelet_runs_a_deployments_pods_and_confirms_scale_down(kube_cluster: KubeCluster, pod_network: PodNetwork,
                                                                 kubelet: Kubelet) -> None:
    ns = f"deploy-{secrets.token_hex(4)}"
    kube_cluster.kubectl("create", "namespace", ns)
    try:
        _until(f"ServiceAccount default in {ns}", lambda: kube_cluster.kubectl(
            "-n", ns, "get", "serviceaccount", "default", check=False).returncode == 0)
        kube_cluster.kubectl("-n", ns, "create", "deployment", "ratings", "--image=example/ratings:1",
                             "--replicas=2", "--port=9080")
        kube_cluster.kubectl("-n", ns, "expose", "deployment", "ratings", "--port=9080")
        names = _until("two pending pods", lambda: len(kubelet.pending(ns)) == 2 and kubelet.pending(ns))
        assert isinstance(names, list)
        sandboxes = {name: pod_network.create(f"r{i}") for i, name in enumerate(names)}
        for name, sandbox in sandboxes.items():
            kubelet.start(ns, name, sandbox)
        want = sorted(s.ip for s in sandboxes.values())
        _until("both addresses ready in the EndpointSlice", lambda: sorted(
            ep["addresses"][0] for ep in _slice_endpoints(kube_cluster, ns, "ratings")
            if ep["conditions"].get("ready")) == want)

        kube_cluster.kubectl("-n", ns, "scale", "deployment", "ratings", "--replicas=0")
        _until("no endpoints once the kubelet confirmed the deletions",
               lambda: not _slice_endpoints(kube_cluster, ns, "ratings"), timeout=60)
        assert kubelet.pending(ns) == [] and kubelet.errors == []
    finally:
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false")


def test_kubelet_keeps_its_node_alive_and_removes_it(kube_cluster: KubeCluster, pod_network: PodNetwork) -> None:
    def lease() -> dict[str, Any]:
        out = kube_cluster.kubectl("-n", "kube-node-lease", "get", "lease", node.node, "-o", "json").stdout
        spec: dict[str, Any] = json.loads(out)["spec"]
        return spec

    with Kubelet.running(kube_cluster, pod_network.gateway, heartbeat_s=1.0) as node:
        got = json.loads(kube_cluster.kubectl("get", "node", node.node, "-o", "json").stdout)
        ready = [c for c in got["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"
        assert {"type": "InternalIP", "address": pod_network.gateway} in got["status"]["addresses"]
        first = lease()["renewTime"]
        _until("the node's Lease renewed", lambda: lease()["renewTime"] != first)
    assert kube_cluster.kubectl("get", "node", node.node, check=False).returncode != 0
    assert node.errors == []


def test_leftovers_of_a_dead_run_are_removed() -> None:
    """Objects named like ours with no live owner (a crashed run) go away when a network starts:
    an unclaimed namespace and bridge, and a dead owner's namespace with a process still in it."""
    unclaimed, crashed = "dead00", "dead01"
    netns, busy = f"mshpod-{unclaimed}-x", f"mshpod-{crashed}-y"
    state = STATE_DIR / f"{crashed}.json"
    for name in (netns, busy):
        subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "link", "add", f"mshbr{unclaimed}", "type", "bridge"], check=True)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"pid": 2**22 + 7, "start": "0"}))  # above pid_max: never alive
    leftover = subprocess.Popen(["ip", "netns", "exec", busy, "sleep", "300"])
    try:
        # `ip netns exec` enters the namespace after Popen returns: until it has, no cleanup can
        # find the process there (once, in CI, the namespace went first and `sleep` outlived it).
        for _ in range(500):
            pids = subprocess.run(["ip", "netns", "pids", busy], capture_output=True, text=True, check=False).stdout
            if str(leftover.pid) in pids.split():
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"the leftover process never entered {busy}")
        with PodNetwork.running() as network:
            names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
            assert netns not in names and busy not in names
            assert subprocess.run(["ip", "link", "show", f"mshbr{unclaimed}"], capture_output=True,
                                  check=False).returncode != 0
            assert leftover.wait(timeout=10) == -9  # killed by PID from `ip netns pids`
            assert not state.exists()
            assert network.token not in (unclaimed, crashed)
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()
        for name in (netns, busy):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "delete", f"mshbr{unclaimed}"], capture_output=True, check=False)
        state.unlink(missing_ok=True)


def test_network_removes_everything_it_made_even_on_failure() -> None:
    with pytest.raises(RuntimeError, match="boom"), PodNetwork.running() as network:
        pod = network.create("p")
        proc = pod.popen(["sleep", "300"])
        token, bridge = network.token, network.bridge
        raise RuntimeError("boom")
    assert proc.poll() is not None
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"mshpod-{token}-" not in names
    assert subprocess.run(["ip", "link", "show", bridge], capture_output=True, check=False).returncode != 0
    assert not Path(f"/run/meshctl-test-pods/{token}.json").exists()
