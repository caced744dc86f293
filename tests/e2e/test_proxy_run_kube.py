"""The injected sidecar's command, run on the host as the kubelet would run the `istio-proxy` container.

The pod goes through the injector's pure `inject`; the test then plays the kubelet: the pod is a
network namespace joined to the host by a veth pair, and the injected `istio-proxy` container's
command runs inside it as the container's runAsUser (1337), with its environment resolved
(downward-API fieldRefs, PROXY_CONFIG, ISTIO_META_*, ISTIO_KUBE_APP_PROBERS), its mounts as host
directories (labels file, token, root certificate, socket and Envoy directories) and a projected-
style token made by the real API server (`kubectl create token --audience istio-ca`); probes are
the injected ones, run as the kubelet would. Pilot (`meshctl up --kubeconfig`) runs on the host
end of the veth with the Kubernetes TokenReview authenticator. Checked: the workload certificate
carries the service account's SPIFFE id, Envoy syncs over mutual-TLS ADS as a captured-traffic
sidecar and is ready on 15021, and the status port's app probes follow the app's state.
Everything made here (network namespace, veth, processes, directories, Kubernetes namespace) goes at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from injector.inject import inject
from injector.settings import InjectSettings
from meshctl.localmesh import free_port
from meshctl.proxy_kube import DEFAULT_ENVOY_DIR, DEFAULT_POD_INFO, DEFAULT_ROOT_CERT, DEFAULT_SOCKET_DIR, DEFAULT_TOKEN
from tests.k8s.cluster import KubeCluster
from tests.k8s.pods import as_user

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
STATUS_PORT = 15020
HEALTH_PORT = 15021

# A tiny app: /ready answers 200 once the file READY_FLAG exists, 503 before.
APP = """
import http.server, os, sys
flag = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path != "/ready" or os.path.exists(flag)
        self.send_response(200 if ok else 503); self.end_headers(); self.wfile.write(b"app")
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""


@dataclass
class Pod:
    """A network namespace with a veth to the host: the pod's IP and the host end's IP."""

    netns: str
    host_ip: str
    pod_ip: str
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def spawn(self, name: str, args: list[str], logs: Path, env: dict[str, str] | None = None,
              in_pod: bool = True, user: int | None = None) -> subprocess.Popen[bytes]:
        log = logs / f"{name}.log"
        prefix = ["ip", "netns", "exec", self.netns] if in_pod else []
        command = args if user is None else as_user(args, user)
        with log.open("wb") as out:
            proc = subprocess.Popen([*prefix, *command], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=REPO)
        self.procs.append((name, proc, log))
        return proc

    def run(self, *args: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.netns, *args], check=True, capture_output=True,
                              text=True, timeout=30).stdout

    def tails(self) -> str:
        return "\n".join(f"--- {name} (exit {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}"
                         for name, proc, log in self.procs)


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@pytest.fixture
def pod() -> Iterator[Pod]:
    tag = secrets.token_hex(3)
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    subnet = next(f"10.254.{n}" for n in random.sample(range(256), 256) if f"10.254.{n}." not in used)
    netns, host_if, pod_if = f"mkt-{tag}", f"mkh{tag}", f"mkp{tag}"
    _sh("ip", "netns", "add", netns)
    try:
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", pod_if)
        try:
            _sh("ip", "link", "set", pod_if, "netns", netns)
            _sh("ip", "addr", "add", f"{subnet}.1/30", "dev", host_if)
            _sh("ip", "link", "set", host_if, "up")
            for cmd in (["ip", "addr", "add", f"{subnet}.2/30", "dev", pod_if], ["ip", "link", "set", pod_if, "up"],
                        ["ip", "link", "set", "lo", "up"]):
                _sh("ip", "netns", "exec", netns, *cmd)
            p = Pod(netns, f"{subnet}.1", f"{subnet}.2")
            try:
                yield p
            finally:
                for _name, proc, _log in reversed(p.procs):
                    if proc.poll() is None:
                        proc.terminate()
                        try:
                            proc.wait(timeout=15)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
        finally:
            subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


@pytest.fixture
def pod_dir() -> Iterator[Path]:
    """The container's mounts, owned by the proxy UID as the kubelet makes them (pytest's tmp is root's 0700)."""
    root = Path(tempfile.mkdtemp(prefix="meshctl-pod-"))
    try:
        for name in ("podinfo", "s", "envoy", "tokens", "istio"):
            (root / name).mkdir()
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _chown_tree(root: Path, uid: int) -> None:
    for path in [root, *root.rglob("*")]:
        os.chown(path, uid, uid)
    root.chmod(0o755)


@pytest.fixture
def namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    ns = f"sidecar-{secrets.token_hex(4)}"
    kube_cluster.kubectl("create", "namespace", ns)
    try:
        kube_cluster.kubectl("-n", ns, "create", "serviceaccount", "reviews")
        yield ns
    finally:
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def _until(what: str, check: Callable[[], bool], pod: Pod, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if any(proc.poll() is not None for _n, proc, _l in pod.procs):
            break
        time.sleep(0.3)
    pytest.fail(f"{what}: not reached\n{pod.tails()}")


def _cert_uris(pod: Pod) -> list[str]:
    """The URI SANs of the workload certificate Envoy serves, from its admin (loopback inside the pod)."""
    script = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:15000/certs').read().decode())"
    certs: dict[str, Any] = json.loads(pod.run(sys.executable, "-c", script))
    return sorted({san["uri"] for entry in certs.get("certificates", []) for cert in entry.get("cert_chain", [])
                   for san in cert.get("subject_alt_names", []) if "uri" in san})


def _injected_pod(namespace: str, pod_name: str, control_plane: str) -> dict[str, Any]:
    """The pod as the injector returns it: the app with its probes, plus `istio-proxy` and its volumes."""
    app = {"name": "reviews", "image": "reviews:v1", "ports": [{"containerPort": 8080, "name": "http"}],
           "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "timeoutSeconds": 2},
           "livenessProbe": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 2},
           "startupProbe": {"tcpSocket": {"port": 8081}}}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": pod_name, "namespace": namespace,
                        "labels": {"app": "reviews", "version": "v1", "pod-template-hash": "5d8f"}},
           "spec": {"serviceAccountName": "reviews", "containers": [app]}}
    settings = InjectSettings(discovery_address=control_plane, ca_address=control_plane)
    return inject(pod, settings, {"istio-injection": "enabled"}, workload="reviews-v1")


def _probe_url(pod_ip: str, probe: dict[str, Any]) -> str:
    """The URL the kubelet GETs for an httpGet probe (the only kind the injector leaves on captured ports)."""
    http = probe["httpGet"]
    return f"{http.get('scheme', 'HTTP').lower()}://{pod_ip}:{http['port']}{http['path']}"


def _resolved_env(container: dict[str, Any], fields: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet fills it in (values and downward-API fieldRefs)."""
    return {item["name"]: item["value"] if "value" in item else fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
            for item in container["env"]}


def test_injected_sidecar_command_gets_its_identity_syncs_and_serves_probes(
        kube_cluster: KubeCluster, namespace: str, pod: Pod, pod_dir: Path, tmp_path: Path) -> None:
    state, config = tmp_path / "state", tmp_path / "config"
    config.mkdir()
    ready_flag = tmp_path / "app-ready"
    tls, ads, debug = f"{pod.host_ip}:{free_port()}", f"{pod.host_ip}:{free_port()}", f"127.0.0.1:{free_port()}"
    pod_name = f"reviews-v1-5d8f-{secrets.token_hex(2)}"
    injected = _injected_pod(namespace, pod_name, tls)
    sidecar = next(c for c in injected["spec"]["containers"] if c["name"] == "istio-proxy")

    # The kubelet's part: the container's mounts as host directories (the injector's paths are the
    # command's defaults), the projected token, the downward-API labels file, the environment.
    mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    assert (mounts["istio-token"], mounts["istiod-ca-cert"], mounts["workload-socket"], mounts["istio-podinfo"],
            mounts["istio-envoy"]) == (str(DEFAULT_TOKEN.parent), str(DEFAULT_ROOT_CERT.parent),
                                       str(DEFAULT_SOCKET_DIR), str(DEFAULT_POD_INFO), str(DEFAULT_ENVOY_DIR))
    pod_info, sockets, envoy_dir = pod_dir / "podinfo", pod_dir / "s", pod_dir / "envoy"
    token, root_cert = pod_dir / "tokens" / DEFAULT_TOKEN.name, pod_dir / "istio" / DEFAULT_ROOT_CERT.name
    token.write_text(kube_cluster.kubectl("-n", namespace, "create", "token", "reviews", "--audience", "istio-ca",
                                          "--duration", "1h").stdout.strip())
    token.chmod(0o600)
    labels = injected["metadata"]["labels"]
    (pod_info / "labels").write_text("".join(f"{k}={json.dumps(labels[k])}\n" for k in sorted(labels)))
    env = {"PATH": os.environ["PATH"], "HOME": str(pod_dir), **_resolved_env(sidecar, {
        "metadata.name": pod_name, "metadata.namespace": namespace, "status.podIP": pod.pod_ip,
        "spec.serviceAccountName": "reviews", "status.hostIP": pod.host_ip})}
    assert sidecar["command"][:1] == ["meshctl"]
    command = [sys.executable, "-m", "meshctl.cli", *sidecar["command"][1:], "--token-file", str(token),
               "--ca-root-file", str(root_cert), "--sds-socket-dir", str(sockets), "--pod-info-dir", str(pod_info),
               "--envoy-dir", str(envoy_dir), "--log-level", "warning"]

    pod.spawn("pilot", [sys.executable, "-m", "meshctl.cli", "up", "--config-dir", str(config), "--ads", ads,
                        "--xds-tls", tls, "--debug", debug, "--state-dir", str(state),
                        "--kubeconfig", str(kube_cluster.kubeconfig), "--log-level", "warning"],
              tmp_path, in_pod=False)
    _until("pilot's debug API", lambda: _get(f"http://{debug}/debug/syncz")[0] == 200, pod)
    shutil.copyfile(state / "root-cert.pem", root_cert)  # what ConfigMap istio-ca-root-cert holds
    _chown_tree(pod_dir, sidecar["securityContext"]["runAsUser"])
    pod.spawn("app", [sys.executable, "-c", APP, str(ready_flag)], tmp_path)
    pod.spawn("sidecar", command, tmp_path, env=env, user=sidecar["securityContext"]["runAsUser"])

    # The sidecar's own readiness probe, as the kubelet runs it: Envoy's listener on the pod IP.
    ready = _probe_url(pod.pod_ip, sidecar["readinessProbe"])
    assert ready == f"http://{pod.pod_ip}:{HEALTH_PORT}/healthz/ready"
    _until(ready, lambda: _get(ready)[0] == 200, pod)
    assert _get(f"http://{pod.pod_ip}:{STATUS_PORT}/healthz/ready")[0] == 200

    # Envoy's files live in the writable volume (the container's root filesystem is read-only).
    bootstraps = list(envoy_dir.glob("meshctl-envoy-*/envoy.yaml"))
    assert len(bootstraps) == 1 and pod.pod_ip in bootstraps[0].read_text()

    # The certificate is the service account's, from the TokenReview-authenticated CSR.
    assert _cert_uris(pod) == [f"spiffe://cluster.local/ns/{namespace}/sa/reviews"]

    # Pilot serves it over mutual TLS as a captured-traffic sidecar with Istio's node id.
    node_id = f"sidecar~{pod.pod_ip}~{pod_name}.{namespace}~{namespace}.svc.cluster.local"
    rows = json.loads(_get(f"http://{debug}/debug/syncz")[1])
    mine = [r for r in rows if r["proxy"] == node_id]
    assert len(mine) == 1, rows
    row = mine[0]
    assert row["service_account"] == "reviews"
    assert row["labels"] == {k: v for k, v in labels.items() if k != "pod-template-hash"}
    assert row["labels"]["service.istio.io/canonical-name"] == "reviews"
    assert "captured" in row["proxy_class"]
    assert {t: s["state"] for t, s in row["types"].items() if t in ("CDS", "LDS")} == {"CDS": "SYNCED",
                                                                                      "LDS": "SYNCED"}

    # The app's probes as the injector rewrote them, run as the kubelet would: they follow the app.
    app = next(c for c in injected["spec"]["containers"] if c["name"] == "reviews")
    readyz, livez, startupz = (_probe_url(pod.pod_ip, app[p]) for p in ("readinessProbe", "livenessProbe",
                                                                         "startupProbe"))
    assert readyz == f"http://{pod.pod_ip}:{STATUS_PORT}/app-health/reviews/readyz"
    assert _get(readyz)[0] == 503  # the app's own answer, passed on
    ready_flag.touch()
    assert _get(readyz)[0] == 200
    assert _get(livez)[0] == 200
    assert _get(startupz)[0] == 500  # nothing listens on 8081
    assert _get(f"http://{pod.pod_ip}:{STATUS_PORT}/app-health/other/readyz")[0] == 404

    # SIGTERM stops the sidecar cleanly (the kubelet's way).
    proc = next(proc for name, proc, _log in pod.procs if name == "sidecar")
    proc.terminate()
    assert proc.wait(timeout=30) == 0, pod.tails()
    with contextlib.suppress(OSError):
        assert not (sockets / "socket").exists()
