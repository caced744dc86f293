"""Leader election (pilot.kube.leader) and status writes (pilot.kube.status) against a real API server.

Two candidates for one Lease: exactly one leads; a stopped leader releases the Lease and the other
takes over at once (well within the lease duration); a SIGKILLed `meshctl up` is replaced once its
Lease expires. Two in-process pilots on one cluster: only the status leader writes
`status.conditions`, Reconciled=True for a served object and the problem otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient

from pilot.api import ApiError, parse_object
from pilot.app import Pilot
from pilot.kube.client import client_from_kubeconfig
from pilot.kube.leader import ROOT_ROTATION_LEASE, STATUS_LEASE, LeaderElection, LeaseTiming
from pilot.settings import PilotSettings
from tests.k8s.cluster import KubeCluster
from tests.k8s.pilots import UpProcess, install_crds, kubectl_json, lease_holder, metric, until
from tests.k8s.test_kube_source import minimal_crds

pytestmark = pytest.mark.e2e


@pytest.fixture
def namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    """A fresh namespace: the test's control-plane namespace (its Leases) and its mesh objects."""
    ns = f"leader-{secrets.token_hex(4)}"
    kube_cluster.kubectl("create", "namespace", ns)
    yield ns
    kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture
def crds(kube_cluster: KubeCluster) -> None:
    install_crds(kube_cluster)


@pytest.fixture
async def clients(kube_cluster: KubeCluster) -> AsyncIterator[list[ApiClient]]:
    """Two API clients: one per candidate, as two replicas would have."""
    made = [await client_from_kubeconfig(kube_cluster.kubeconfig) for _ in range(2)]
    try:
        yield made
    finally:
        for api in made:
            await api.close()


class Candidate:
    """One LeaderElection running as a task, with a log of its duty callbacks."""

    def __init__(self, api: ApiClient, namespace: str, name: str, timing: LeaseTiming) -> None:
        self.election = LeaderElection(api, namespace, STATUS_LEASE, name, timing=timing)
        self.events: list[str] = []
        self.task = asyncio.create_task(self.election.run(self._started, self._stopped))

    async def _started(self) -> None:
        self.events.append("started")

    async def _stopped(self) -> None:
        self.events.append("stopped")

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def test_one_of_two_candidates_leads_and_a_stopped_leader_hands_over_at_once(
        kube_cluster: KubeCluster, namespace: str, clients: list[ApiClient]) -> None:
    # A two-minute lease: a successor that had to wait for it to expire would miss the deadline below.
    timing = LeaseTiming(duration=120, renew_deadline=10, retry_period=0.5)
    a, b = (Candidate(api, namespace, f"pilot-{n}", timing) for api, n in zip(clients, "ab", strict=True))
    try:
        async def one_leads() -> bool:
            return [a.election.is_leader, b.election.is_leader].count(True) == 1
        await until("one of two candidates leading", one_leads)
        leader, other = (a, b) if a.election.is_leader else (b, a)
        await asyncio.sleep(3)  # six retry periods: the other keeps trying, and fails
        assert leader.election.is_leader and not other.election.is_leader
        assert (leader.events, other.events) == (["started"], [])
        assert await lease_holder(kube_cluster, namespace, STATUS_LEASE) == leader.election.identity

        await leader.stop()
        assert leader.events == ["started", "stopped"]

        async def other_leads() -> bool:
            return other.election.is_leader
        await until("the other candidate leading after the leader stopped", other_leads, timeout=60)
        assert other.events == ["started"]
        lease = await kubectl_json(kube_cluster, "-n", namespace, "get", "lease", STATUS_LEASE)
        assert lease is not None
        assert lease["spec"]["holderIdentity"] == other.election.identity
        assert lease["spec"]["leaseTransitions"] >= 1
        assert lease["spec"]["leaseDurationSeconds"] == 120
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.timeout(240)
async def test_a_killed_leader_is_replaced_once_its_lease_expires(
        kube_cluster: KubeCluster, namespace: str, clients: list[ApiClient], tmp_path: Path) -> None:
    up = UpProcess(kube_cluster, namespace, tmp_path / "pilot.log")
    candidate: Candidate | None = None
    try:
        await up.start()

        async def held() -> bool:
            return bool(await lease_holder(kube_cluster, namespace, STATUS_LEASE))
        await until("meshctl up holding the status lease", held)
        killed = await lease_holder(kube_cluster, namespace, STATUS_LEASE)
        before = ((await kubectl_json(kube_cluster, "-n", namespace, "get", "lease", STATUS_LEASE)) or {})["spec"]

        candidate = Candidate(clients[0], namespace, "pilot-successor", LeaseTiming(8, 6, 1))
        await asyncio.sleep(4)  # the leader renews: no takeover while it lives
        assert not candidate.election.is_leader
        assert await lease_holder(kube_cluster, namespace, STATUS_LEASE) == killed

        await up.stop(signal.SIGKILL)  # no release: the Lease must expire

        async def replaced() -> bool:
            return candidate is not None and candidate.election.is_leader
        await until("the candidate leading after the leader was killed", replaced, timeout=90)
        after = ((await kubectl_json(kube_cluster, "-n", namespace, "get", "lease", STATUS_LEASE)) or {})["spec"]
        assert after["holderIdentity"] == "pilot-successor"
        assert after["leaseTransitions"] == before.get("leaseTransitions", 0) + 1
    finally:
        if candidate is not None:
            await candidate.stop()
        await up.stop(signal.SIGKILL)


@pytest.mark.timeout(240)
async def test_meshctl_up_rotates_the_ca_root_only_while_it_holds_the_rotation_lease(
        kube_cluster: KubeCluster, namespace: str, tmp_path: Path) -> None:
    up = UpProcess(kube_cluster, namespace, tmp_path / "pilot.log", state_dir=tmp_path / "state")
    try:
        await up.start()

        async def leading() -> bool:
            return await metric(up.debug, "pilot_leader", {"lease": ROOT_ROTATION_LEASE}) == 1
        await until("meshctl up leading CA root rotation", leading)
        rotation = await lease_holder(kube_cluster, namespace, ROOT_ROTATION_LEASE)
        assert rotation and rotation == await lease_holder(kube_cluster, namespace, STATUS_LEASE)
        await up.stop()  # SIGTERM: a clean stop releases both leases
        assert await lease_holder(kube_cluster, namespace, ROOT_ROTATION_LEASE) == ""
        assert await lease_holder(kube_cluster, namespace, STATUS_LEASE) == ""
    finally:
        await up.stop(signal.SIGKILL)


# -- status ------------------------------------------------------------------------------------------

def _vs(ns: str, name: str, host: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"hosts": [host], "http": [{"route": [{"destination": {"host": host}}]}], **spec}}


def _gateway(ns: str, name: str, host: str) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"istio": "ingressgateway"},
                     "servers": [{"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": [host]}]}}


async def _apply(cluster: KubeCluster, *docs: dict[str, Any]) -> None:
    await asyncio.to_thread(cluster.kubectl, "apply", "-f", "-",
                            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}))


async def _reconciled(cluster: KubeCluster, ns: str, name: str, kind: str = "VirtualService") -> dict[str, Any] | None:
    """The object's Reconciled condition and validation codes, once written. (`--raw`: kubectl's
    discovery cache may predate CRDs made in this session.)"""
    plural = next(c["spec"]["names"]["plural"] for c in minimal_crds() if c["spec"]["names"]["kind"] == kind)
    done = await asyncio.to_thread(cluster.kubectl, "get", "--raw",
                                   f"/apis/networking.istio.io/v1/namespaces/{ns}/{plural}/{name}", check=False)
    assert done.returncode == 0 or "NotFound" in done.stderr, done.stderr
    obj: dict[str, Any] = json.loads(done.stdout) if done.returncode == 0 else {}
    status = obj.get("status") or {}
    found = [c for c in status.get("conditions") or () if c.get("type") == "Reconciled"]
    if not found:
        return None
    codes = [m["type"]["code"] for m in status.get("validationMessages") or ()]
    return {**found[0], "codes": codes, "observedGeneration": status.get("observedGeneration"),
            "generation": obj["metadata"]["generation"]}


def _written(pilot: Pilot) -> float:
    return pilot.registry.get_sample_value("pilot_status_writes_total", {"result": "written"}) or 0.0


def _pilot(cluster: KubeCluster, ns: str) -> Pilot:
    return Pilot(PilotSettings(ads_port=0, debug_port=0, kubeconfig=cluster.kubeconfig, kube_mesh_namespace=ns,
                               lease_duration_ms=8000, lease_renew_deadline_ms=6000, lease_retry_period_ms=500,
                               kube_sync_timeout_ms=60_000))


@pytest.mark.timeout(300)
async def test_only_the_status_leader_writes_reconciled_or_the_problem(
        kube_cluster: KubeCluster, crds: None, namespace: str) -> None:
    ns = namespace
    invalid = _vs(ns, "bad", "details", http=[{"route": [{"destination": {"host": "details"}, "weight": -5}]}])
    with pytest.raises(ApiError):  # what pilot will reject (no validating webhook in this test)
        parse_object(invalid)
    for service in ("reviews", "ratings"):  # destinations that exist (the service registry)
        await asyncio.to_thread(kube_cluster.kubectl, "-n", ns, "create", "service", "clusterip", service,
                                "--tcp=9080:9080")
    await _apply(kube_cluster, _vs(ns, "good", "reviews"), _vs(ns, "lost", "ratings", gateways=["nowhere"]),
                 invalid)
    first, second = _pilot(kube_cluster, ns), _pilot(kube_cluster, ns)
    running: list[Pilot] = []
    try:
        for pilot in (first, second):
            await pilot.start()
            running.append(pilot)

        async def one_leads() -> bool:
            return [p.elections[STATUS_LEASE].is_leader for p in (first, second)].count(True) == 1
        await until("one status leader", one_leads)
        leader, follower = (first, second) if first.elections[STATUS_LEASE].is_leader else (second, first)

        async def all_written() -> bool:
            return all([await _reconciled(kube_cluster, ns, n) for n in ("good", "lost", "bad")])
        await until("status on all three VirtualServices", all_written, timeout=120)
        good = await _reconciled(kube_cluster, ns, "good")
        lost = await _reconciled(kube_cluster, ns, "lost")
        bad = await _reconciled(kube_cluster, ns, "bad")
        assert good is not None and lost is not None and bad is not None
        assert (good["status"], good["reason"], good["codes"]) == ("True", "Accepted", [])
        assert good["observedGeneration"] == good["generation"]
        assert lost["status"] == "False" and lost["codes"] == ["IST0101"]
        assert f"gateway {ns}/nowhere does not exist" in lost["message"], lost
        assert bad["status"] == "False" and bad["reason"] == "Invalid" and bad["codes"] == ["IST0106"]
        assert "weight" in bad["message"], bad
        assert _written(leader) >= 3 and _written(follower) == 0

        # Only on change: a rebuild with the same outcome writes nothing; the fixed object is rewritten.
        written = _written(leader)
        revision = leader.store.touch()
        await leader.pusher.wait_built(revision)
        await _apply(kube_cluster, _gateway(ns, "nowhere", "*"))

        async def fixed() -> bool:
            found = await _reconciled(kube_cluster, ns, "lost")
            return found is not None and found["status"] == "True"
        await until("the VirtualService Reconciled once its gateway exists", fixed)
        await asyncio.sleep(2)  # room for any extra write to show up
        assert _written(leader) == written + 2  # the fixed VirtualService and the new Gateway
        gateway = await _reconciled(kube_cluster, ns, "nowhere", "Gateway")
        assert gateway is not None and gateway["status"] == "True", gateway
        assert _written(follower) == 0

        # The leader stops (releasing the lease): the other takes over and writes the next change only.
        assert leader.kube is not None
        gateways = leader.kube.watches["Gateway"].resource.path(ns)
        running.remove(leader)
        await leader.stop()

        async def follower_leads() -> bool:
            return follower.elections[STATUS_LEASE].is_leader
        await until("the other pilot leading status", follower_leads)
        await asyncio.to_thread(kube_cluster.kubectl, "delete", "--raw",
                                f"{gateways}/nowhere")

        async def broken_again() -> bool:
            found = await _reconciled(kube_cluster, ns, "lost")
            return found is not None and found["status"] == "False"
        await until("the VirtualService not Reconciled once its gateway is gone", broken_again)
        await asyncio.sleep(2)
        assert _written(follower) == 1, "the new leader rewrote statuses that were already right"
    finally:
        for pilot in running:
            await pilot.stop()
