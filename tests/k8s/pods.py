"""The tests' kubelet: pods as network namespaces on a test bridge, and their Node/Pod status in
the real API server.

`PodNetwork.running()` makes a bridge `mshbr<token>` with the gateway address of a random
10.244.<n>.0/24 (chosen so it clashes with no address or route of this host) and removes it, with
every namespace, link and process it made, when the `with` block ends, also on failure.
`network.create(name)` returns a `Pod`: a namespace `mshpod-<token>-<name>` with loopback up, one
veth (`eth0`) on the bridge, an address from the range and a default route via the gateway.
`pod.run(argv, user=1337)` / `pod.popen(...)` run a process inside it (`ip netns exec` +
`setpriv`, so as any UID without a passwd entry). Processes on the host reach pods through the
bridge; pods reach the host at `network.gateway`, so a control plane that pods use (pilot, the CA)
listens there, as on a node.

A crashed run leaves its objects behind: each run first writes `/run/meshctl-test-pods/<token>.json`
(owner PID and start time) and removes it last, and every new run deletes the objects of runs
whose owner is gone (killing the processes left in their namespaces by PID), plus any object
named with our prefixes that no state file claims. Concurrent sessions (other PIDs) are left alone.

`Kubelet` plays the node agent against the API server: it registers a Node (Ready, with its Lease
renewed every 10 s by a background thread, so kube-controller-manager's node lifecycle controller
never marks its pods NotReady), lists the pods no node runs yet (`pending`: there is no
scheduler either), binds Pods to it, reports a pod's `podIP` and Ready condition (then
the EndpointSlice controller publishes the address), and finishes deleting pods that get a
deletion timestamp (as a kubelet confirms a stopped pod), so namespace deletion and scale-down
complete. It talks REST with the admin token (one request per second while idle).

Concurrency: one test thread drives both; the only other thread is the Kubelet's heartbeat, which
touches only the API server and stops before `close()` returns.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import shlex
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.cluster import KubeCluster

log = logging.getLogger(__name__)

STATE_DIR = Path("/run/meshctl-test-pods")
NETNS_PREFIX = "mshpod-"
BRIDGE_PREFIX = "mshbr"
VETH_PREFIX = "mshv"
POD_RANGE = ipaddress.IPv4Network("10.244.0.0/16")
CMD_TIMEOUT_S = 30.0
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?$")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=CMD_TIMEOUT_S, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (guards against a reused PID)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def _kill_netns_processes(netns: str) -> None:
    """Kill (by PID) what still runs in a namespace we made, then delete the namespace."""
    pids = [int(p) for p in _ip("netns", "pids", netns, check=False).stdout.split() if p.isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _ip("netns", "delete", netns, check=False)


def _remove_token(token: str) -> None:
    for netns in _netns_names():
        if netns.startswith(f"{NETNS_PREFIX}{token}-"):
            _kill_netns_processes(netns)
    # A namespace kept alive by a process we could not kill leaves its host-side veth behind.
    for link in json.loads(_ip("-j", "link", "show").stdout or "[]"):
        if link["ifname"].startswith(f"{VETH_PREFIX}{token}"):
            _ip("link", "delete", link["ifname"], check=False)
    _ip("link", "delete", f"{BRIDGE_PREFIX}{token}", check=False)
    (STATE_DIR / f"{token}.json").unlink(missing_ok=True)


def remove_stale() -> list[str]:
    """Remove what crashed earlier runs left: the tokens of dead owners and unclaimed objects."""
    removed = []
    for state in STATE_DIR.glob("*.json") if STATE_DIR.is_dir() else []:
        if not _owner_alive(state.stem):
            _remove_token(state.stem)
            removed.append(state.stem)
    links = json.loads(_ip("-j", "link", "show", "type", "bridge").stdout or "[]")
    found = {n[len(NETNS_PREFIX):].split("-", 1)[0] for n in _netns_names() if n.startswith(NETNS_PREFIX)}
    found |= {link["ifname"][len(BRIDGE_PREFIX):] for link in links if link["ifname"].startswith(BRIDGE_PREFIX)}
    # A run writes its state file before it makes anything, so an object seen here whose token
    # has no live owner *now* (checked after listing) is an orphan, not a run starting meanwhile.
    for token in sorted(found):
        if not _owner_alive(token):
            _remove_token(token)
            removed.append(token)
    return removed


def _owner_alive(token: str) -> bool:
    try:
        owner = json.loads((STATE_DIR / f"{token}.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(_start_time(int(owner["pid"])) == owner["start"])


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default" and not dst.startswith(("broadcast", "local")):
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(dst, strict=False))
    for link in json.loads(_ip("-j", "-4", "addr").stdout or "[]"):
        for addr in link.get("addr_info", []):
            nets.append(ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    return nets


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    candidates = list(POD_RANGE.subnets(new_prefix=24))[1:-1]
    random.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError(f"no free /24 in {POD_RANGE} on this host")


def expose_to_others(*paths: Path) -> list[str]:
    """Shell steps (in a private mount namespace) making `paths` reachable for another user, as an
    image's /usr/local and application tree are.

    A checkout or interpreter may sit in or under a directory others cannot enter (`mktemp -d` is
    0700, so is /root): the first such directory on each path gets a throwaway overlay whose top
    layer is world-readable, so its contents show through to every user (nothing on the host
    changes). Paths every user can reach need nothing. Whether a directory is closed is looked at
    again when the steps run: a mount step before them may have replaced it (a tmpfs over /tmp
    recreates a clone's 0700 parent as 0755), and an overlay there would hide what was bound below
    it (the checkout itself).
    """
    closed: set[Path] = set()
    for path in paths:
        real = Path(os.path.realpath(path))
        found = next((p for p in (*reversed(real.parents), real) if p != Path("/") and not os.stat(p).st_mode & 0o001),
                     None)
        if found is not None:
            closed.add(found)
    steps: list[str] = []
    for i, directory in enumerate(sorted(closed)):
        layer, target = f"/run/meshctl-exposed-{i}", shlex.quote(str(directory))
        steps += [f"if [ $(( 0$(stat -c %a {target}) & 1 )) -eq 0 ]; then",  # still closed to others
                  f"mkdir -p {layer} && mount -t tmpfs -o mode=0755 tmpfs {layer} && mkdir -m 0755 {layer}/u {layer}/w",
                  f"mount -t overlay overlay -o lowerdir={target},upperdir={layer}/u,workdir={layer}/w {target}",
                  "fi"]
    return steps


# The checkout (the tests run its code in pods, from an editable install).
REPO = Path(__file__).resolve().parents[2]


def as_user(argv: Sequence[str], user: int, group: int | None = None) -> list[str]:
    """`argv` run as `user` (and `group`, default the same) without a passwd entry, as a container's
    user. When this checkout or interpreter sits where that user could not reach them, the process
    gets a mount namespace of its own exposing them (`expose_to_others`); otherwise nothing is added."""
    gid = user if group is None else group
    command = ["setpriv", f"--reuid={user}", f"--regid={gid}", "--clear-groups", "--", *argv]
    exposed = expose_to_others(Path(sys.executable), REPO)
    if not exposed:
        return command
    script = "\n".join(["set -e", "mount --make-rprivate /", *exposed, f"exec {shlex.join(command)}"])
    return ["unshare", "--mount", "--", "sh", "-c", script]


@dataclass
class Pod:
    """A pod sandbox: a network namespace with one address on the test bridge."""

    name: str
    netns: str
    ip: str
    host_veth: str
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def argv(self, argv: Sequence[str], user: int | None = None, group: int | None = None) -> list[str]:
        """`argv` prefixed to run inside the pod, as `user` (and `group`, default the same) if given."""
        prefix = ["ip", "netns", "exec", self.netns]
        return [*prefix, *(argv if user is None else as_user(argv, user, group))]

    def run(self, argv: Sequence[str], user: int | None = None, group: int | None = None, *, check: bool = True,
            timeout: float = CMD_TIMEOUT_S, stdin: str | None = None,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run to completion inside the pod; with `check` a failure raises with its output."""
        proc = subprocess.run(self.argv(argv, user, group), input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"in pod {self.name}: {' '.join(argv)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def popen(self, argv: Sequence[str], user: int | None = None, group: int | None = None,
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside the pod; it is stopped when the pod (or its network) goes away."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(argv, user, group), **kwargs)
        self._procs.append(proc)
        return proc

    def stop_processes(self) -> None:
        """SIGTERM what `popen` started, SIGKILL after 5 s, then kill anything left in the namespace."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()


@dataclass
class PodNetwork:
    """A bridge and the pods on it; build with `PodNetwork.running()`."""

    token: str
    subnet: ipaddress.IPv4Network
    pods: dict[str, Pod] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"{BRIDGE_PREFIX}{self.token}"

    @property
    def gateway(self) -> str:
        """The host's (node's) address on the bridge: pods reach host processes listening here."""
        return str(self.subnet.network_address + 1)

    @classmethod
    @contextlib.contextmanager
    def running(cls) -> Iterator[PodNetwork]:
        """A fresh bridge on a free /24; everything made in the block is removed when it ends."""
        removed = remove_stale()
        if removed:
            log.warning("removed pod networks left by crashed runs: %s", ", ".join(removed))
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        network = cls(token=secrets.token_hex(3), subnet=_free_subnet())
        state = STATE_DIR / f"{network.token}.json"
        partial = state.with_suffix(".tmp")  # written whole, then renamed: never read half-written
        partial.write_text(json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid()),
                                       "subnet": str(network.subnet)}))
        os.replace(partial, state)
        try:
            _ip("link", "add", network.bridge, "type", "bridge")
            _ip("addr", "add", f"{network.gateway}/{network.subnet.prefixlen}", "dev", network.bridge)
            _ip("link", "set", network.bridge, "up")
            yield network
        finally:
            network.close()

    def create(self, name: str) -> Pod:
        """A new pod sandbox named `name` (DNS-label-like) with the next free address."""
        if not _NAME.match(name) or name in self.pods:
            raise ValueError(f"pod sandbox name {name!r} is not a short DNS label or is taken")
        index = len(self.pods) + 2
        if index >= self.subnet.num_addresses - 1:
            raise RuntimeError(f"pod network {self.subnet} is full")
        pod = Pod(name=name, netns=f"{NETNS_PREFIX}{self.token}-{name}", ip=str(self.subnet.network_address + index),
                  host_veth=f"{VETH_PREFIX}{self.token}{index:03d}")
        self.pods[name] = pod
        _ip("netns", "add", pod.netns)
        _ip("link", "add", pod.host_veth, "type", "veth", "peer", "name", "eth0", "netns", pod.netns)
        _ip("link", "set", pod.host_veth, "master", self.bridge, "up")
        _ip("-n", pod.netns, "addr", "add", f"{pod.ip}/{self.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", pod.netns, "link", "set", "lo", "up")
        _ip("-n", pod.netns, "link", "set", "eth0", "up")
        _ip("-n", pod.netns, "route", "add", "default", "via", self.gateway)
        return pod

    def close(self) -> None:
        """Stop every pod's processes and remove its namespace, then the bridge and the state file."""
        errors = []
        for pod in self.pods.values():
            try:
                pod.stop_processes()
            except Exception as exc:
                errors.append(f"{pod.name}: {exc}")
        self.pods.clear()
        _remove_token(self.token)
        if errors:
            raise RuntimeError(f"pod network {self.token}: processes did not stop: {'; '.join(errors)}")


@pytest.fixture
def pod_network() -> Iterator[PodNetwork]:
    """A bridge with pod sandboxes for one test (root only: `ip netns`, veth, a bridge)."""
    if os.geteuid() != 0:
        pytest.fail("the pod sandbox needs root (ip netns, veth, bridge, iptables)")
    with PodNetwork.running() as network:
        yield network


def _now(micro: bool = False) -> str:
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


class Kubelet:
    """A Node in the API server whose pods the test runs as sandboxes; stop it with `close()`."""

    SYNC_S = 1.0

    def __init__(self, cluster: KubeCluster, node: str, address: str, heartbeat_s: float = 10.0) -> None:
        self.cluster, self.node, self.address, self.heartbeat_s = cluster, node, address, heartbeat_s
        self._ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []  # heartbeat failures, for a test to assert on or show

    def api(self, method: str, path: str, body: object = None,
            content_type: str = "application/json") -> dict[str, Any]:
        """One REST call as the cluster admin; an error status raises with the server's message."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.cluster.server}{path}", data=data, method=method, headers={
            "Authorization": f"Bearer {self.cluster.admin_token}", "Content-Type": content_type,
            "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self._ctx, timeout=10) as resp:
                result: dict[str, Any] = json.loads(resp.read() or b"{}")
                return result
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path}: {exc.code} {exc.read().decode(errors='replace')[:500]}") from None

    def register(self) -> Kubelet:
        """Create the Node (Ready) and its Lease, and start the heartbeat thread."""
        self.api("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": self.node, "labels": {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux"}}})
        self.api("PATCH", f"/api/v1/nodes/{self.node}/status", {"status": {
            "addresses": [{"type": "InternalIP", "address": self.address}, {"type": "Hostname", "address": self.node}],
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test kubelet",
                            "lastHeartbeatTime": _now(), "lastTransitionTime": _now()}],
        }}, "application/strategic-merge-patch+json")
        self.api("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
            "metadata": {"name": self.node},
            "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": _now(micro=True)}})
        self._thread = threading.Thread(target=self._heartbeat, name=f"kubelet-{self.node}", daemon=True)
        self._thread.start()
        return self

    def bind(self, namespace: str, name: str) -> None:
        """Schedule the pod onto this node (what the scheduler would do)."""
        self.api("POST", f"/api/v1/namespaces/{namespace}/pods/{name}/binding", {
            "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "namespace": namespace},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node}})

    def report(self, namespace: str, name: str, pod_ip: str, *, ready: bool = True) -> None:
        """Report the pod running at `pod_ip`, Ready or not (its readiness probe's verdict)."""
        now, flag = _now(), "True" if ready else "False"
        conditions = [{"type": t, "status": s, "lastTransitionTime": now} for t, s in (
            ("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", flag), ("Ready", flag))]
        self.api("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status", {"status": {
            "phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}], "hostIP": self.address,
            "hostIPs": [{"ip": self.address}], "startTime": now, "conditions": conditions}},
            "application/strategic-merge-patch+json")

    def pending(self, namespace: str) -> list[str]:
        """Names of the namespace's pods no node runs yet (made by a controller, e.g. a Deployment)."""
        pods = self.api("GET", f"/api/v1/namespaces/{namespace}/pods?fieldSelector=spec.nodeName%3D")["items"]
        return sorted(p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp"))

    def start(self, namespace: str, name: str, pod: Pod, *, ready: bool = True) -> None:
        """Bind the Pod object and report it running at the sandbox's address."""
        self.bind(namespace, name)
        self.report(namespace, name, pod.ip, ready=ready)

    def sync(self) -> list[str]:
        """Finish deleting this node's pods that have a deletion timestamp; returns their names."""
        pods = self.api("GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{self.node}")["items"]
        done = []
        for pod in pods:
            meta = pod["metadata"]
            if meta.get("deletionTimestamp"):
                with contextlib.suppress(AssertionError):  # already gone
                    self.api("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                             {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})
                done.append(f"{meta['namespace']}/{meta['name']}")
        return done

    def _heartbeat(self) -> None:
        last_renew = time.monotonic()
        while not self._stop.wait(self.SYNC_S):
            try:
                if time.monotonic() - last_renew >= self.heartbeat_s:
                    self.api("PATCH", f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}",
                             {"spec": {"renewTime": _now(micro=True)}}, "application/merge-patch+json")
                    last_renew = time.monotonic()
                self.sync()
            except Exception as exc:  # logged and kept: the next tick retries
                log.warning("test kubelet %s: heartbeat failed: %s", self.node, exc)
                self.errors.append(str(exc))

    def close(self) -> None:
        """Stop the heartbeat, force-delete this node's pods, delete the Node and its Lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        for pod in self.api("GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{self.node}")["items"]:
            with contextlib.suppress(AssertionError):
                self.api("DELETE", f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}",
                         {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})
        with contextlib.suppress(AssertionError):
            self.api("DELETE", f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}")
        with contextlib.suppress(AssertionError):
            self.api("DELETE", f"/api/v1/nodes/{self.node}")

    @classmethod
    @contextlib.contextmanager
    def running(cls, cluster: KubeCluster, address: str, node: str | None = None,
                heartbeat_s: float = 10.0) -> Iterator[Kubelet]:
        """A registered node (named `node-<random>` unless given) for the `with` block."""
        kubelet = cls(cluster, node or f"node-{secrets.token_hex(4)}", address, heartbeat_s)
        try:
            yield kubelet.register()
        finally:
            kubelet.close()


@pytest.fixture
def kubelet(kube_cluster: KubeCluster, pod_network: PodNetwork) -> Iterator[Kubelet]:
    """A Node for this test's pod sandboxes, at the pod network's gateway address."""
    with Kubelet.running(kube_cluster, pod_network.gateway) as node:
        yield node
