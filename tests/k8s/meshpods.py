"""The tests' container runtime for injected pods, shared by the end-to-end tests that run a mesh in pods.

On top of `tests/k8s/pods.py` (network namespaces on a bridge, Node/Pod status in the API server),
`Containers` runs each pod as a container runtime would: a network namespace on the bridge, the
init container's command (`meshctl redirect`) as root, then every container in a private mount
namespace with its volumeMounts where the pod spec says (projected service-account tokens from
`kubectl create token` with the volume's audience, bound to the pod; ConfigMaps such as
`istio-ca-root-cert`, which the control plane publishes, read from the API server; downward-API
files; emptyDirs), its environment resolved (fieldRefs) and as its securityContext's UID
(`istio-proxy` 1337, the apps 1000). A pod is Ready once every readiness probe answers 200, so the
EndpointSlice controller publishes it.

`control_plane` runs `meshctl up --kubeconfig` on the host as istiod; `webhook_configs` are the
installed webhook configurations pointed at it; `manifests` and `canary` are what the user applies
(reviews v1/v2 answering their version, a sleep client). Everything is synchronous (subprocesses
and polling); what a helper starts, its context manager or the caller's ExitStack removes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshctl.localmesh import free_port
from meshctl.render import InstallOptions, injector_webhook, validator_webhook
from tests.k8s.cluster import KubeCluster
from tests.k8s.pods import REPO, Kubelet, Pod, PodNetwork, expose_to_others
from tests.k8s.test_webhooks import install_crds

PORT = 9080
APP_UID = 1000
SCOPE_LABEL = "meshctl-test-mesh"

# The reviews app: answers its version, the client certificate its sidecar forwarded, its peer.
APP = """\
import http.server, json, sys
version, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"version": version, "xfcc": self.headers.get("x-forwarded-client-cert", ""),
                           "peer": self.client_address[0]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
"""


def until(what: str, check: Callable[[], bool], timeout: float = 90.0, tail: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{tail()}")
        time.sleep(0.3)


SIDECAR_PROXY_CONFIG = "proxy.istio.io/config"
# Set for every sidecar by the mesh config's defaultConfig.proxyMetadata (`started_mesh`).
MESH_WIDE_VARIABLE = "MESHCTL_TEST_MESH_WIDE"


def manifests(ns: str) -> list[dict[str, Any]]:
    """What the user applies: two versions of reviews behind one Service, and a client."""
    def deployment(name: str, labels: dict[str, str], account: str, container: dict[str, Any],
                   annotations: dict[str, str] | None = None) -> dict[str, Any]:
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
                "spec": {"replicas": 1, "selector": {"matchLabels": labels}, "template": {
                    "metadata": {"labels": labels, "annotations": annotations or {}},
                    "spec": {"serviceAccountName": account, "terminationGracePeriodSeconds": 5,
                             "containers": [{**container, "securityContext": {"runAsUser": APP_UID,
                                                                              "runAsGroup": APP_UID}}]}}}}

    def reviews(version: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        return deployment(f"reviews-{version}", {"app": "reviews", "version": version}, "reviews", {
            "name": "reviews", "image": "example.invalid/reviews:1",
            "command": ["python", "-c", APP, version, str(PORT)],
            "ports": [{"name": "http", "containerPort": PORT}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": PORT}, "periodSeconds": 2}}, annotations)

    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reviews", "namespace": ns}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sleep", "namespace": ns}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": ns},
         "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]}},
        # v2's sidecar speaks state-of-the-world xDS, as Istio users ask with this annotation; the
        # others delta, the default: one mesh, both protocols.
        reviews("v1"), reviews("v2", {SIDECAR_PROXY_CONFIG: 'proxyMetadata:\n  ISTIO_DELTA_XDS: "false"\n'}),
        deployment("sleep", {"app": "sleep"}, "sleep", {"name": "sleep", "image": "example.invalid/curl:1",
                                                        "command": ["sleep", "infinity"]}),
    ]


def canary(ns: str, v1: int) -> list[dict[str, Any]]:
    """The canary rule: subsets by version, `v1`% of the traffic to v1 and the rest to v2."""
    return [
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews",
                                                                                          "namespace": ns},
         "spec": {"host": "reviews", "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews",
                                                                                         "namespace": ns},
         "spec": {"hosts": ["reviews"], "http": [{"route": [
             {"destination": {"host": "reviews", "subset": "v1"}, "weight": v1},
             {"destination": {"host": "reviews", "subset": "v2"}, "weight": 100 - v1}]}]}},
    ]


def webhook_configs(url: str, token: str) -> list[dict[str, Any]]:
    """The installed webhook configurations, calling `url` instead of the istiod Service, limited to
    namespaces labeled with this test's token, under names of their own, and without a caBundle."""
    configs = []
    for rendered in (injector_webhook(InstallOptions()), validator_webhook(InstallOptions())):
        config: dict[str, Any] = json.loads(json.dumps(rendered))
        config["metadata"] = {"name": f"{config['metadata']['name']}-{token}"}
        for hook in config["webhooks"]:
            hook["clientConfig"] = {"url": url + hook["clientConfig"]["service"]["path"]}
            hook.setdefault("namespaceSelector", {}).setdefault("matchExpressions", []).append(
                {"key": SCOPE_LABEL, "operator": "In", "values": [token]})
        configs.append(config)
    return configs


def downward_text(values: dict[str, str]) -> str:
    """A downward-API labels/annotations file: `key="value"` lines, sorted."""
    return "".join(f"{k}={json.dumps(values[k])}\n" for k in sorted(values))


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@dataclass
class RunningPod:
    """A pod this module's kubelet runs: its object (as the API server returned it) and its sandbox."""

    obj: dict[str, Any]
    sandbox: Pod
    root: Path  # volumes and logs
    logs: list[tuple[str, subprocess.Popen[Any], Path]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.obj["metadata"]["namespace"])

    def tails(self) -> str:
        return "\n".join(f"--- {self.name}/{name} (exit {proc.poll()}):\n{log.read_text(errors='replace')[-2500:]}"
                         for name, proc, log in self.logs)


class Containers:
    """The container-runtime half of the tests' kubelet: volumes, mounts, environment, users."""

    def __init__(self, cluster: KubeCluster, kubelet: Kubelet, network: PodNetwork, work: Path) -> None:
        self.cluster, self.kubelet, self.network, self.work = cluster, kubelet, network, work
        self.pods: dict[str, RunningPod] = {}

    def run(self, ns: str, name: str) -> RunningPod:
        """Bind the pod, give it an address, run its init containers, then start its containers."""
        self.kubelet.bind(ns, name)
        sandbox = self.network.create(f"p{len(self.pods)}")
        self.kubelet.report(ns, name, sandbox.ip, ready=False)  # the address is known before containers start
        obj = json.loads(self.cluster.kubectl("-n", ns, "get", "pod", name, "-o", "json").stdout)
        root = self.work / name
        root.mkdir(mode=0o700)
        pod = RunningPod(obj, sandbox, root)
        self.pods[name] = pod
        volumes = self._volumes(pod)
        for container in obj["spec"].get("initContainers") or []:
            done = sandbox.run(self._argv_in_container(pod, container, volumes), env=self._env(pod, container),
                               timeout=60)
            (root / f"{container['name']}.log").write_text(done.stdout + done.stderr)
        for container in obj["spec"]["containers"]:
            log = root / f"{container['name']}.log"
            with log.open("wb") as out:
                proc = sandbox.popen(self._argv_in_container(pod, container, volumes), env=self._env(pod, container),
                                     stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
            pod.logs.append((container["name"], proc, log))
        return pod

    def ready(self, pod: RunningPod) -> bool:
        """Every container's readiness probe (httpGet, as injected) answers 200 at the pod's address."""
        for container in pod.obj["spec"]["containers"]:
            http = (container.get("readinessProbe") or {}).get("httpGet")
            if http is not None and http_status(f"http://{pod.sandbox.ip}:{http['port']}{http['path']}") != 200:
                return False
        return True

    def stop(self, pod: RunningPod) -> None:
        """What a kubelet does for a deleted pod: SIGTERM its containers (SIGKILL after 5 s)."""
        pod.sandbox.stop_processes()

    # --- volumes ---------------------------------------------------------------------------------

    def _volumes(self, pod: RunningPod) -> dict[str, Path]:
        out = {}
        for volume in pod.obj["spec"].get("volumes") or []:
            path = pod.root / "volumes" / volume["name"]
            path.mkdir(parents=True)
            if "emptyDir" in volume:
                path.chmod(0o1777)
            elif "configMap" in volume:
                self._config_map(pod.namespace, volume["configMap"], path)
            elif "downwardAPI" in volume:
                self._downward(pod, volume["downwardAPI"]["items"], path)
            elif "projected" in volume:
                for source in volume["projected"]["sources"]:
                    if "serviceAccountToken" in source:
                        self._token(pod, source["serviceAccountToken"], path)
                    elif "configMap" in source:
                        self._config_map(pod.namespace, source["configMap"], path)
                    elif "downwardAPI" in source:
                        self._downward(pod, source["downwardAPI"]["items"], path)
                    else:
                        raise AssertionError(f"projected source the test kubelet cannot make: {source}")
            else:
                raise AssertionError(f"volume the test kubelet cannot make: {volume}")
            path.chmod(path.stat().st_mode | 0o755)
            out[volume["name"]] = path
        return out

    def _config_map(self, ns: str, ref: dict[str, Any], path: Path) -> None:
        """The ConfigMap's keys as files; a kubelet waits for a missing one, so do we."""
        found: list[dict[str, Any]] = []

        def get() -> bool:
            proc = self.cluster.kubectl("-n", ns, "get", "configmap", ref["name"], "-o", "json", check=False)
            if proc.returncode == 0:
                found.append(json.loads(proc.stdout))
            return bool(found)

        until(f"ConfigMap {ns}/{ref['name']}", get)
        data = found[-1].get("data") or {}
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            (path / item["path"]).write_text(data[item["key"]])
            (path / item["path"]).chmod(0o644)

    def _downward(self, pod: RunningPod, items: list[dict[str, Any]], path: Path) -> None:
        meta = pod.obj["metadata"]
        values = {"metadata.labels": downward_text(meta.get("labels") or {}),
                  "metadata.annotations": downward_text(meta.get("annotations") or {}),
                  "metadata.namespace": str(meta["namespace"]), "metadata.name": str(meta["name"])}
        for item in items:
            value = values[item["fieldRef"]["fieldPath"]]
            (path / item["path"]).write_text(value)
            (path / item["path"]).chmod(0o644)

    def _token(self, pod: RunningPod, source: dict[str, Any], path: Path) -> None:
        """A service-account token as the kubelet projects it: the volume's audience and lifetime, bound to the pod."""
        args = ["-n", pod.namespace, "create", "token", pod.obj["spec"].get("serviceAccountName") or "default",
                "--duration", f"{source.get('expirationSeconds', 3607)}s", "--bound-object-kind", "Pod",
                "--bound-object-name", pod.name, "--bound-object-uid", pod.obj["metadata"]["uid"]]
        if source.get("audience"):
            args += ["--audience", source["audience"]]
        (path / source["path"]).write_text(self.cluster.kubectl(*args).stdout.strip())
        (path / source["path"]).chmod(0o644)

    # --- processes -------------------------------------------------------------------------------

    def _env(self, pod: RunningPod, container: dict[str, Any]) -> dict[str, str]:
        fields = {"metadata.name": pod.name, "metadata.namespace": pod.namespace,
                  "metadata.uid": pod.obj["metadata"]["uid"], "spec.nodeName": self.kubelet.node,
                  "spec.serviceAccountName": pod.obj["spec"].get("serviceAccountName") or "default",
                  "status.podIP": pod.sandbox.ip, "status.hostIP": self.network.gateway}
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/tmp"}
        for item in container.get("env") or []:
            env[item["name"]] = item["value"] if "value" in item else fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        return env

    @staticmethod
    def _argv(container: dict[str, Any]) -> list[str]:
        """The container's command on this host: its image's `meshctl` and `python` are ours."""
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        if argv[:1] == ["meshctl"]:
            return [sys.executable, "-m", "meshctl.cli", *argv[1:]]
        if argv[:1] == ["python"]:
            return [sys.executable, *argv[1:]]
        return argv

    def _argv_in_container(self, pod: RunningPod, container: dict[str, Any], volumes: dict[str, Path]) -> list[str]:
        """A private mount namespace with the container's volumeMounts at their paths (over
        throwaway overlays of the host directories that hold them, so nothing is made on the
        host), then the command as the container's user."""
        mounts = container.get("volumeMounts") or []
        scratch = pod.root / f"scratch-{container['name']}"
        scratch.mkdir()
        tops = sorted({"/" + Path(os.path.realpath(_existing(m["mountPath"]))).parts[1] for m in mounts})
        steps = ["set -e", "mount --make-rprivate /", f"mount -t tmpfs -o mode=0755 tmpfs {scratch}"]
        for i, top in enumerate(tops):
            upper, workdir = f"{scratch}/u{i}", f"{scratch}/w{i}"
            steps += [f"mkdir {upper} {workdir}",
                      f"mount -t overlay overlay -o lowerdir={top},upperdir={upper},workdir={workdir} {top}"]
        for mount in mounts:
            target = shlex.quote(mount["mountPath"])
            steps += [f"mkdir -p {target}", f"mount --bind {shlex.quote(str(volumes[mount['name']]))} {target}"]
            if mount.get("readOnly"):
                steps.append(f"mount -o remount,bind,ro {target}")
        context = {**(pod.obj["spec"].get("securityContext") or {}), **(container.get("securityContext") or {})}
        uid = int(context.get("runAsUser", 0))
        gid = int(context.get("runAsGroup", uid))
        argv = shlex.join(self._argv(container))
        if uid:  # this interpreter and the checkout (its editable install) are the image's
            steps += expose_to_others(Path(sys.executable), REPO)
        steps.append(f"exec setpriv --reuid={uid} --regid={gid} --clear-groups -- {argv}" if uid else f"exec {argv}")
        return ["unshare", "--mount", "--", "sh", "-c", "\n".join(steps)]


def _existing(path: str) -> str:
    """The deepest existing ancestor of `path` (where a mount point under it must be made)."""
    current = Path(path)
    while not current.exists():
        current = current.parent
    return str(current)


class Mesh:
    """The handles a test step needs: the cluster, the control plane's addresses, the running pods."""

    def __init__(self, cluster: KubeCluster, ns: str, debug: str, containers: Containers,
                 control_plane: subprocess.Popen[bytes], log: Path) -> None:
        self.cluster, self.ns, self.debug, self.containers = cluster, ns, debug, containers
        self.control_plane, self.log = control_plane, log
        self.host = f"reviews.{ns}.svc.cluster.local"

    def tails(self) -> str:
        pods = "\n".join(p.tails() for p in self.containers.pods.values())
        up = self.log.read_text(errors="replace")[-4000:]
        return f"{pods}\n--- meshctl up (exit {self.control_plane.poll()}):\n{up}"

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.cluster.kubectl("-n", self.ns, *args, "-o", "json").stdout)

    def apply(self, docs: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("-n", self.ns, "apply", "-f", "-", stdin=yaml.safe_dump_all(docs), check=False)

    def client(self) -> RunningPod:
        return next(p for p in self.containers.pods.values() if p.name.startswith("sleep-"))

    def requests(self, count: int) -> list[tuple[int, dict[str, Any]]]:
        """`count` plain requests from the client pod's app user, by name (resolved to the clusterIP)."""
        vip = self.kubectl_json("get", "service", "reviews")["spec"]["clusterIP"]
        url = f"http://{self.host}:{PORT}/"
        proc = self.client().sandbox.run(["curl", "-sS", "--max-time", "10", "--resolve", f"{self.host}:{PORT}:{vip}",
                                          "-w", "\n%{http_code}\n", *[url] * count], user=APP_UID, check=False,
                                         timeout=120)
        lines = proc.stdout.splitlines()
        out = []
        for body, code in zip(lines[0::2], lines[1::2], strict=False):
            try:
                out.append((int(code), json.loads(body) if code == "200" else {"body": body}))
            except ValueError:
                out.append((0, {"body": body}))
        return out + [(0, {"error": proc.stderr})] * (count - len(out))

    def versions(self, count: int) -> Counter[str]:
        answers = self.requests(count)
        assert all(code == 200 for code, _ in answers), answers
        return Counter(str(a["version"]) for _, a in answers)

    def client_endpoints(self) -> dict[str, set[str]]:
        """Cluster -> endpoint addresses as the client's Envoy has them (its EDS), from its admin."""
        text = self.client().sandbox.run(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:15000/clusters"],
                                         check=False).stdout
        out: dict[str, set[str]] = {}
        for line in text.splitlines():
            name, _, rest = line.partition("::")
            address = rest.partition("::")[0]
            if name.endswith(self.host) and ":" in address and address[0].isdigit():
                out.setdefault(name, set()).add(address.rsplit(":", 1)[0])
        return out

    def proxy_status(self) -> str:
        return subprocess.run([sys.executable, "-m", "meshctl.cli", "proxy-status", "--debug", self.debug],
                              capture_output=True, text=True, timeout=30, cwd=REPO, check=False).stdout


@contextlib.contextmanager
def cleanup(cluster: KubeCluster, namespaces: list[str], configs: list[dict[str, Any]],
            crds: list[str]) -> Iterator[None]:
    try:
        yield
    finally:
        for config in configs:
            cluster.kubectl("delete", config["kind"].lower(), config["metadata"]["name"], "--ignore-not-found",
                            check=False)
        for ns in namespaces:
            cluster.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=false", check=False)
        for crd in crds:
            cluster.kubectl("delete", "crd", crd, "--ignore-not-found", "--wait=false", check=False)


@contextlib.contextmanager
def control_plane(cluster: KubeCluster, work: Path, gateway: str, mesh_ns: str,
                  configs: list[dict[str, Any]], webhooks_port: int) -> Iterator[tuple[subprocess.Popen[bytes], str,
                                                                                          Path]]:
    """`meshctl up --kubeconfig` on the host: xDS and CA on the bridge's gateway, webhooks on loopback."""
    tls, debug = f"{gateway}:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {**os.environ, "MESHCTL_INJECT_DISCOVERY_ADDRESS": tls, "MESHCTL_INJECT_CA_ADDRESS": tls,
           "MESHCTL_INJECT_PROXY_IMAGE": "meshctl/proxy:test",
           "MESHCTL_KUBE_INJECTION_WEBHOOK_CONFIG_NAME": configs[0]["metadata"]["name"],
           "MESHCTL_KUBE_VALIDATION_WEBHOOK_CONFIG_NAME": configs[1]["metadata"]["name"]}
    log = work / "meshctl-up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "meshctl.cli", "up", "--kubeconfig", str(cluster.kubeconfig),
                                 "--mesh-namespace", mesh_ns, "--xds-tls", tls, "--ads", f"127.0.0.1:{free_port()}",
                                 "--debug", debug, "--webhooks", f"127.0.0.1:{webhooks_port}",
                                 "--state-dir", str(work / "state")],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO)
    try:
        until("meshctl up's debug API", lambda: proc.poll() is not None
              or http_status(f"http://{debug}/debug/syncz") == 200, timeout=120)
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        yield proc, debug, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def installed(world: Mesh, configs: list[dict[str, Any]], root_file: Path, plain_ns: str, other_ns: str) -> None:
    """The control plane's start-up duties: caBundles patched, the root published where the mesh is."""
    root = root_file.read_text()
    for config in configs:
        def patched(c: dict[str, Any] = config) -> bool:
            got = json.loads(world.cluster.kubectl("get", c["kind"].lower(), c["metadata"]["name"], "-o",
                                                   "json").stdout)
            return all(base64.b64decode(h["clientConfig"].get("caBundle", "")).decode() == root
                       for h in got["webhooks"])
        until(f"the caBundle of {config['metadata']['name']}", patched, tail=world.tails)

    def published(ns: str) -> str | None:
        proc = world.cluster.kubectl("-n", ns, "get", "configmap", "istio-ca-root-cert", "-o", "json", check=False)
        return json.loads(proc.stdout)["data"]["root-cert.pem"] if proc.returncode == 0 else None

    until("the root ConfigMap in the mesh's namespaces", lambda: published(world.ns) == root == published(plain_ns),
          tail=world.tails)
    assert published(other_ns) is None  # not selected by the mesh's discoverySelectors (reconciled earlier)

    # The API server picks up the caBundle asynchronously: wait until it calls the injector.
    probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "warmup", "labels": {"app": "warmup"}},
             "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}}

    def injected() -> bool:
        proc = world.cluster.kubectl("-n", world.ns, "create", "--dry-run=server", "-o", "json", "-f", "-",
                                     stdin=json.dumps(probe), check=False)
        return proc.returncode == 0 and "istio-proxy" in proc.stdout

    until("the API server to call the injection webhook", injected, tail=world.tails)


def run_pods(world: Mesh) -> None:
    """Run the Deployments' pods as they come back from the injector, until all three are Ready."""
    until("three pods", lambda: len(world.containers.kubelet.pending(world.ns)) == 3, tail=world.tails)
    for name in world.containers.kubelet.pending(world.ns):
        obj = world.kubectl_json("get", "pod", name)
        assert [c["name"] for c in obj["spec"]["initContainers"]] == ["istio-init"]
        assert [c["name"] for c in obj["spec"]["containers"]][-1] == "istio-proxy"
        assert obj["spec"]["initContainers"][0]["command"][:2] == ["meshctl", "redirect"]
        assert obj["metadata"]["labels"]["security.istio.io/tlsMode"] == "istio"
        world.containers.run(world.ns, name)
    for pod in world.containers.pods.values():
        until(f"pod {pod.name} ready", lambda p=pod: world.containers.ready(p)  # type: ignore[misc]
              or any(proc.poll() is not None for _n, proc, _l in p.logs), timeout=180, tail=world.tails)
        assert all(proc.poll() is None for _n, proc, _l in pod.logs), world.tails()
        world.containers.kubelet.report(pod.namespace, pod.name, pod.sandbox.ip)


@dataclass(frozen=True)
class Namespaces:
    """The namespaces `started_mesh` made: the mesh's, an enrolled one (`Mesh.ns`), a selected but
    unlabeled one and one outside the discovery selectors."""

    mesh: str
    plain: str
    other: str


def started_mesh(cluster: KubeCluster, stack: contextlib.ExitStack) -> tuple[Mesh, Namespaces]:
    """Install and start the control plane as a user would, up to the point where pods can be injected.

    CRDs, the webhook configurations (no caBundle yet), the mesh config with discovery selectors
    (this test's namespaces only), an enrolled and an unlabeled namespace, the pod network, the
    kubelet and `meshctl up --kubeconfig`; returns once the caBundles and root ConfigMaps are in
    place and the API server calls the injector. Everything is undone by `stack`, also on failure.
    """
    token = os.urandom(3).hex()
    mesh_ns, ns, plain_ns, other_ns = f"istio-{token}", f"shop-{token}", f"plain-{token}", f"other-{token}"
    webhooks_port = free_port()
    configs = webhook_configs(f"https://127.0.0.1:{webhooks_port}", token)
    work = Path(tempfile.mkdtemp(prefix="meshctl-mesh-in-pods-"))
    new_crds: list[str] = []
    stack.callback(shutil.rmtree, work, ignore_errors=True)
    stack.enter_context(cleanup(cluster, [mesh_ns, ns, plain_ns, other_ns], configs, new_crds))
    # Install: CRDs, webhook configurations (no caBundle yet), the mesh config with discovery
    # selectors (this test's namespaces only), an enrolled and an unlabeled namespace.
    new_crds += install_crds(cluster)
    for config in configs:
        cluster.kubectl("create", "-f", "-", stdin=json.dumps(config))
    for name, labels in ((mesh_ns, {}), (ns, {"istio-injection": "enabled", SCOPE_LABEL: token}),
                         (plain_ns, {SCOPE_LABEL: token}), (other_ns, {})):
        cluster.kubectl("create", "-f", "-", stdin=json.dumps(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}))
    mesh = yaml.safe_dump({"discoverySelectors": [{"matchLabels": {SCOPE_LABEL: token}}],
                           "defaultConfig": {"proxyMetadata": {MESH_WIDE_VARIABLE: "applied"}}})
    cluster.kubectl("-n", mesh_ns, "create", "configmap", "istio", f"--from-literal=mesh={mesh}")
    for name in (ns, plain_ns):
        until(f"ServiceAccount {name}/default", lambda n=name: cluster.kubectl(  # type: ignore[misc]
            "-n", n, "get", "serviceaccount", "default", check=False).returncode == 0)

    network = stack.enter_context(PodNetwork.running())
    kubelet = stack.enter_context(Kubelet.running(cluster, network.gateway))
    containers = Containers(cluster, kubelet, network, work)
    proc, debug, log = stack.enter_context(control_plane(cluster, work, network.gateway, mesh_ns, configs,
                                                         webhooks_port))
    world = Mesh(cluster, ns, debug, containers, proc, log)
    installed(world, configs, work / "state" / "root-cert.pem", plain_ns, other_ns)
    return world, Namespaces(mesh_ns, plain_ns, other_ns)
