"""Several `meshctl up --kubeconfig` replicas share one CA root through Secret `istio-ca-secret`.

A sidecar with an identity (the workload agent, authenticated by a TokenReview-checked service-account
token, and a real Envoy over mutual-TLS ADS) syncs at replica L; replicas F and G start afterwards
and load L's root from the Secret. L is SIGKILLed: the sidecar reconnects to F over mutual TLS (F's
serving certificate chains to the same root, checked for `istiod.<mesh ns>.svc`) and is SYNCED there
with no NACK. F and G are eager to rotate (a root near its end by their settings); once L's Lease
expires one of them leads, introduces a new root into the Secret, and the other adopts it: both
trust bundles then hold the old and the new root.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from kubernetes_asyncio.client import ApiClient
from prometheus_client import CollectorRegistry

import meshctl.envoy
from citadel import rotation
from citadel.agent import AgentSettings, WorkloadAgent
from citadel.authority import CertificateAuthority
from citadel.ca import WorkloadCertPolicy
from citadel.errors import CAConfigError
from citadel.keys import KeyAlgorithm, fingerprint
from citadel.kube_store import CA_SECRET, KubeCA, ca_secret, state_from_secret
from citadel.store import SelfSignedStore, new_root
from citadel.testing import PluggedCA, write_cacerts
from meshctl.envoy import EnvoyProcess
from meshctl.kube_pod import pod_bootstrap, pod_from_env
from meshctl.kube_up import trust_domain_conflict
from meshctl.localmesh import free_port
from pilot.bootstrap import XDS_CLUSTER, BootstrapSpec
from pilot.kube.client import client_from_kubeconfig
from pilot.kube.leader import ROOT_ROTATION_LEASE
from pilot.kube.meshconfig import parse_mesh_config
from tests.k8s.cluster import KubeCluster
from tests.k8s.pilots import (
    FAST_LEASE,
    UpProcess,
    get_json,
    install_crds,
    kubectl_json,
    lease_holder,
    no_namespace_terminating,
    until,
)
from tests.k8s.test_replicas import with_second_pilot

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SHORT_ROOT = {"MESHCTL_CITADEL_ROOT_TTL": "PT1H"}
# A root with less than 99.9 % of its lifetime left is due for rotation: at once, for its leader.
EAGER = {**SHORT_ROOT, "MESHCTL_CITADEL_EXPIRY_WARN_FRACTION": "0.999", "MESHCTL_CITADEL_CHECK_INTERVAL": "PT1S"}


@dataclass
class SecureUp(UpProcess):
    """`meshctl up --kubeconfig` with the CA and mutual-TLS xDS on a known port."""

    tls: str = field(default_factory=lambda: f"127.0.0.1:{free_port()}")

    async def start(self) -> None:
        assert self.state_dir is not None
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "meshctl.cli", "up", "--state-dir", str(self.state_dir), "--xds-tls", self.tls,
                "--webhooks", f"127.0.0.1:{free_port()}", "--kubeconfig", str(self.cluster.kubeconfig),
                "--mesh-namespace", self.mesh_namespace, "--ads", self.ads, "--debug", self.debug,
                "--log-level", "info", stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=asyncio.subprocess.STDOUT, env={**os.environ, **FAST_LEASE, **self.env})
        await until(f"pilot {self.debug} serving", self.serving, 90)

    @property
    def tls_port(self) -> int:
        return int(self.tls.rpartition(":")[2])

    def roots(self) -> list[str]:
        """Fingerprints of the trust bundle this replica exports (its CA's roots)."""
        assert self.state_dir is not None
        path = self.state_dir / "root-cert.pem"
        return [fingerprint(c) for c in x509.load_pem_x509_certificates(path.read_bytes())] if path.exists() else []


@pytest.fixture
def namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    install_crds(kube_cluster)
    ns = f"shared-root-{secrets.token_hex(4)}"
    kube_cluster.kubectl("create", "namespace", ns)
    yield ns
    kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


async def secret_roots(cluster: KubeCluster, ns: str) -> list[str]:
    secret = await kubectl_json(cluster, "-n", ns, "get", "secret", CA_SECRET)
    if secret is None:
        return []
    pem = base64.b64decode(secret["data"].get("root-cert.pem", ""))
    return [fingerprint(c) for c in x509.load_pem_x509_certificates(pem)] if pem else []


# What a delta sidecar of Envoy 1.40 holds once synced: its row lists a type only from the proxy's
# first request of it, so a row of CDS alone (a stream just opened) is SYNCED but not the config.
SIDECAR_TYPES = frozenset({"CDS", "EDS", "LDS", "RDS", "VHDS"})


async def _synced(debug: str, node_id: str) -> bool:
    rows = await get_json(f"http://{debug}/debug/syncz")
    row = next((r for r in rows or () if r["proxy"] == node_id), None)
    return (row is not None and row["types"].keys() >= SIDECAR_TYPES
            and all(t["state"] == "SYNCED" for t in row["types"].values()))


async def _row(debug: str, node_id: str) -> dict[str, Any] | None:
    rows = await get_json(f"http://{debug}/debug/syncz")
    return next((r for r in rows or () if r["proxy"] == node_id), None)


async def test_replicas_share_the_root_a_sidecar_fails_over_over_mtls_and_a_rotation_reaches_both(
        kube_cluster: KubeCluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ns = namespace
    # Earlier tests delete their namespaces without waiting; their Services leaving mid-test would
    # change every replica's mesh between the two version readings compared below.
    await until("namespaces of earlier tests gone", lambda: no_namespace_terminating(kube_cluster), 120)
    await asyncio.to_thread(kube_cluster.kubectl, "-n", ns, "create", "serviceaccount", "client")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": ns},
               "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]}}
    await asyncio.to_thread(kube_cluster.kubectl, "apply", "-f", "-", stdin=json.dumps(service))

    lead, follower, other = (SecureUp(kube_cluster, ns, tmp_path / f"{name}.log", env=env,
                                      state_dir=tmp_path / f"state-{name}")
                             for name, env in (("l", SHORT_ROOT), ("f", EAGER), ("g", EAGER)))
    sockets = tempfile.mkdtemp(prefix="mshr-")
    try:
        await lead.start()  # creates the Secret and takes the rotation Lease (not eager: no rotation)
        async def has_leader() -> bool:
            return await lease_holder(kube_cluster, ns, ROOT_ROTATION_LEASE) != ""
        await until("the rotation Lease held by the first replica", has_leader)
        first_root = await secret_roots(kube_cluster, ns)
        assert len(first_root) == 1 and lead.roots() == first_root
        assert lead.state_dir is not None and not (lead.state_dir / "ca" / "state.json").exists(), \
            "on a cluster the state directory holds no root"

        token = tmp_path / "client.token"
        made = await asyncio.to_thread(kube_cluster.kubectl, "-n", ns, "create", "token", "client",
                                       "--audience", "istio-ca", "--duration", "1h")
        token.write_text(made.stdout.strip())
        token.chmod(0o600)
        trust = tmp_path / "trust.pem"
        trust.write_bytes((lead.state_dir or tmp_path).joinpath("root-cert.pem").read_bytes())
        agent_settings = AgentSettings(namespace=ns, service_account="client", ca_address=lead.tls,
                                       ca_root_file=trust, token_file=token, sds_socket=Path(sockets) / "sds.sock")
        spec = BootstrapSpec(namespace=ns, workload="client", address=f"127.0.{random.randint(100, 200)}.1",
                             service_account="client", pilot_host="127.0.0.1", pilot_port=lead.tls_port,
                             pilot_tls=True, pilot_san=f"istiod.{ns}.svc", sds_socket=str(agent_settings.sds_socket))
        # Envoy's xDS cluster lists L and F; F is not up yet, so the stream lands on L.
        monkeypatch.setattr(meshctl.envoy, "sidecar_bootstrap", with_second_pilot(follower.tls_port))
        async with WorkloadAgent(agent_settings, CollectorRegistry()) as agent:
            await asyncio.wait_for(agent.ready.wait(), 60)
            async with EnvoyProcess(spec) as envoy:
                await until("Envoy SYNCED at L over mutual TLS", lambda: _synced(lead.debug, spec.node_id), 90)
                before = await _row(lead.debug, spec.node_id)
                assert before is not None

                await asyncio.gather(follower.start(), other.start())
                assert follower.roots() == first_root and other.roots() == first_root, "not L's root from the Secret"

                await lead.stop(signal.SIGKILL)
                await until("Envoy SYNCED at F over mutual TLS after L was killed",
                            lambda: _synced(follower.debug, spec.node_id), 120)
                after = await _row(follower.debug, spec.node_id)
                assert after is not None
                assert all(v["nacks"] == 0 for v in after["types"].values()), after
                assert {t: v["acked_version"] for t, v in after["types"].items()} == \
                       {t: v["acked_version"] for t, v in before["types"].items()}
                stats = await envoy.stats(r"update_rejected|control_plane\.connected_state")
                assert stats["control_plane.connected_state"] == 1
                assert {k: v for k, v in stats.items() if k.endswith("update_rejected") and v} == {}

                # L's Lease expires; F or G leads and introduces a new root; the other reloads it from the Secret.
                async def rotated() -> bool:
                    roots = await secret_roots(kube_cluster, ns)
                    return len(roots) == 2 and follower.roots() == roots and other.roots() == roots
                await until("the new root in the Secret and in both replicas' trust bundles", rotated, 120)
                roots = await secret_roots(kube_cluster, ns)
                assert roots[0] == first_root[0], "the old root must stay trusted (and signing) while introduced"
                # One of them led the rotation (its log says so), the other adopted it from the Secret.
                logs = [p.log.read_text() for p in (follower, other)]
                led = [("root rotation introduce" in text) for text in logs]
                adopted = [("adopted the roots another replica wrote" in text) for text in logs]
                # Under load the lease may change hands mid-rotation: both may then have tried to introduce
                # (the stale write is refused), but at least one led and every non-leader adopted.
                assert any(led) and all(a or x for a, x in zip(adopted, led, strict=True)), (led, adopted)
                # The sidecar is still served over mutual TLS by F after the rotation (same signing root).
                await until("Envoy still SYNCED at F", lambda: _synced(follower.debug, spec.node_id), 60)
    finally:
        await asyncio.gather(*(p.stop(signal.SIGKILL) for p in (lead, follower, other)))
        shutil.rmtree(sockets, ignore_errors=True)



# --- the Secret store itself, in process, against the real API server ---------------------------------

def _ca(tmp_path: Path, name: str) -> CertificateAuthority:
    """A CA whose own state directory is throwaway: `KubeCA.open` points it at the cluster's Secrets."""
    return CertificateAuthority.self_signed(tmp_path / name, WorkloadCertPolicy(), trust_domain="cluster.local")


async def _open(api: ApiClient, ns: str, ca: CertificateAuthority, fallback: Path) -> KubeCA:
    return await KubeCA.open(api, ns, ca, algorithm=KeyAlgorithm.ECDSA_P256, root_ttl=timedelta(hours=1),
                             fallback_dir=fallback)


def test_roots_survive_the_secret_round_trip_and_an_istio_secret_loads_as_stable() -> None:
    now = datetime.now(UTC)
    old, new = (new_root(KeyAlgorithm.ECDSA_P256, "cluster.local", now, timedelta(hours=1)) for _ in range(2))
    state = rotation.introduce(rotation.initial_state(old, now), new, now)
    secret = ca_secret("istio-system", state, "42")
    assert secret["type"] == "istio.io/ca-root" and secret["metadata"]["resourceVersion"] == "42"
    assert {"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"} <= set(secret["data"])
    back = state_from_secret(secret, "here")
    assert (back.phase, back.active.id, [r.id for r in back.trusted]) == (state.phase, old.id, [old.id, new.id])
    assert back.changed_at == state.changed_at
    # Istio's own secret: the signing root and its key only.
    istio = {"data": {k: secret["data"][k] for k in ("ca-cert.pem", "ca-key.pem")}}
    stable = state_from_secret(istio, "here")
    assert stable.phase is rotation.Phase.STABLE and [r.id for r in stable.trusted] == [old.id]
    broken = {**secret, "data": {k: v for k, v in secret["data"].items() if not k.startswith("root-key-")}}
    with pytest.raises(CAConfigError, match=f"here: data.root-key-{new.id}.pem missing"):
        state_from_secret(broken, "here")


async def test_racing_replicas_get_one_root_and_a_stale_rotation_write_is_refused(
        kube_cluster: KubeCluster, namespace: str, tmp_path: Path) -> None:
    apis = [await client_from_kubeconfig(kube_cluster.kubeconfig) for _ in range(2)]
    watcher: asyncio.Task[None] | None = None
    try:
        one, two = _ca(tmp_path, "one"), _ca(tmp_path, "two")
        kube_one, kube_two = await asyncio.gather(_open(apis[0], namespace, one, tmp_path / "f1"),
                                                  _open(apis[1], namespace, two, tmp_path / "f2"))
        assert one.bundle.roots == two.bundle.roots and len(one.bundle.roots) == 1
        assert await secret_roots(kube_cluster, namespace) == [fingerprint(one.bundle.roots[0])]

        # One introduces a new root; two (watching) adopts it without writing.
        watcher = asyncio.create_task(kube_two.run())
        await asyncio.to_thread(one.introduce_root)
        async def adopted() -> bool:
            return len(two.trust_bundle()) == 2
        await until("the other replica adopting the new root", adopted, 30)
        assert two.trust_bundle() == one.trust_bundle() and kube_two.adopted == 1
        assert two.bundle.signing_cert == one.bundle.signing_cert  # the old root signs until activation

        # Two moves on (activate); one, not watching, still has the old resourceVersion: its write is refused.
        await asyncio.to_thread(two.activate_root)
        state_before = one.state
        with pytest.raises(CAConfigError, match="changed by another replica meanwhile"):
            await asyncio.to_thread(one.activate_root)
        assert one.state is state_before
        assert kube_one.store is not None and kube_one.store.resource_version is not None
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        for api in apis:
            await api.close()


async def test_a_cacerts_secret_wins_and_its_changes_are_reloaded(
        kube_cluster: KubeCluster, namespace: str, tmp_path: Path) -> None:
    def create(name: str) -> PluggedCA:
        plugged = write_cacerts(tmp_path / name)
        args = [f"--from-file={f}={tmp_path / name / f}" for f in ("ca-cert.pem", "ca-key.pem", "root-cert.pem",
                                                                   "cert-chain.pem")]
        manifest = kube_cluster.kubectl("-n", namespace, "create", "secret", "generic", "cacerts", *args,
                                        "--dry-run=client", "-o", "json").stdout
        kube_cluster.kubectl("apply", "-f", "-", stdin=manifest)
        return plugged

    first = await asyncio.to_thread(create, "first")
    api = await client_from_kubeconfig(kube_cluster.kubeconfig)
    watcher: asyncio.Task[None] | None = None
    try:
        ca = _ca(tmp_path, "ca")
        kube_ca = await _open(api, namespace, ca, tmp_path / "fallback")
        assert kube_ca.plugged and ca.state is None
        assert ca.bundle.signing_cert == first.ca_cert and ca.trust_bundle() == (first.root,)
        assert await kubectl_json(kube_cluster, "-n", namespace, "get", "secret", CA_SECRET) is None
        watcher = asyncio.create_task(kube_ca.run())
        second = await asyncio.to_thread(create, "second")
        async def reloaded() -> bool:
            return ca.bundle.signing_cert == second.ca_cert
        await until("the CA reloading the changed cacerts Secret", reloaded, 30)
        assert ca.trust_bundle() == (second.root,)
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await api.close()


def test_trust_domain_conflict_only_when_the_mesh_config_sets_another() -> None:
    assert trust_domain_conflict(parse_mesh_config(""), "example.org", "cm") is None  # unset: no claim
    assert trust_domain_conflict(parse_mesh_config("trustDomain: example.org"), "example.org", "cm") is None
    problem = trust_domain_conflict(parse_mesh_config("trustDomain: cluster.local"), "example.org", "cm")
    assert problem is not None and problem.startswith("cm: trustDomain 'cluster.local' differs from --trust-domain")


async def test_meshctl_up_refuses_a_mesh_config_of_another_trust_domain(
        kube_cluster: KubeCluster, namespace: str, tmp_path: Path) -> None:
    await asyncio.to_thread(kube_cluster.kubectl, "-n", namespace, "create", "configmap", "istio",
                            "--from-literal=mesh=trustDomain: other.example\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshctl.cli", "up", "--state-dir", str(tmp_path / "state"),
        "--xds-tls", f"127.0.0.1:{free_port()}", "--webhooks", f"127.0.0.1:{free_port()}",
        "--kubeconfig", str(kube_cluster.kubeconfig), "--mesh-namespace", namespace,
        "--ads", f"127.0.0.1:{free_port()}", "--debug", f"127.0.0.1:{free_port()}",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 1, out.decode()[-2000:]
    assert (f"ConfigMap {namespace}/istio key mesh: trustDomain 'other.example' differs from --trust-domain "
            "'cluster.local'") in out.decode()


@pytest.mark.parametrize(("discovery", "san_type", "sni"), [
    ("istiod.mesh-ns.svc:15012", "DNS", "istiod.mesh-ns.svc"),
    ("10.244.0.1:15012", "IP_ADDRESS", ""),
])
def test_a_pod_sidecar_verifies_pilot_as_its_discovery_address_host(discovery: str, san_type: str, sni: str) -> None:
    env = {"POD_NAME": "p", "POD_NAMESPACE": "ns", "INSTANCE_IP": "10.244.0.9", "SERVICE_ACCOUNT": "sa",
           "PROXY_CONFIG": json.dumps({"discoveryAddress": discovery})}
    bootstrap = pod_bootstrap(pod_from_env(env), "/tmp/sds.sock")
    xds = next(c for c in bootstrap.static_resources.clusters if c.name == XDS_CLUSTER)
    context = tls_pb2.UpstreamTlsContext()
    xds.transport_socket.typed_config.Unpack(context)
    matchers = context.common_tls_context.combined_validation_context.default_validation_context
    [san] = matchers.match_typed_subject_alt_names
    assert common_pb2.SubjectAltNameMatcher.SanType.Name(san.san_type) == san_type
    assert san.matcher.exact == discovery.rpartition(":")[0] and context.sni == sni


async def test_without_the_control_plane_namespace_the_state_directory_ca_is_used(
        kube_cluster: KubeCluster, tmp_path: Path) -> None:
    api = await client_from_kubeconfig(kube_cluster.kubeconfig)
    try:
        ca = _ca(tmp_path, "ca")
        kube_ca = await _open(api, f"absent-{secrets.token_hex(4)}", ca, tmp_path / "fallback")
        assert not kube_ca.plugged and kube_ca.store is None
        assert isinstance(ca.store, SelfSignedStore) and (tmp_path / "fallback" / "state.json").exists()
        assert ca.state is not None and ca.trust_bundle() == (ca.state.active.cert,)
        await kube_ca.run()  # nothing in the cluster to follow: returns at once
    finally:
        await api.close()
