"""pilot.kube.watch against a real API server: list+watch, 410 re-list, an API server restart."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from kubernetes_asyncio.client import ApiClient

from pilot.kube.client import client_from_kubeconfig
from pilot.kube.watch import Resource, Watch, backoff_delay
from tests.k8s.cluster import KubeCluster

CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
LABEL = "meshctl-test=watch"  # kube-controller-manager adds kube-root-ca.crt to every namespace: not ours
FAST: dict[str, Any] = {"min_backoff": 0.05, "max_backoff": 1.0, "request_timeout": 10.0}


class Recorder:
    """A handler keeping the state a consumer would (name -> object) and every call it got."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, str]] = []  # (call, name, resourceVersion)
        self.replaces = 0

    def replace(self, objects: list[dict[str, Any]]) -> None:
        self.replaces += 1
        self.state = {o["metadata"]["name"]: o for o in objects}
        self.calls += [("replace", name, o["metadata"]["resourceVersion"]) for name, o in sorted(self.state.items())]

    def upsert(self, obj: dict[str, Any]) -> None:
        self.state[obj["metadata"]["name"]] = obj
        self.calls.append(("upsert", obj["metadata"]["name"], obj["metadata"]["resourceVersion"]))

    def delete(self, obj: dict[str, Any]) -> None:
        self.state.pop(obj["metadata"]["name"], None)
        self.calls.append(("delete", obj["metadata"]["name"], obj["metadata"]["resourceVersion"]))

    def data(self) -> dict[str, dict[str, str]]:
        return {name: obj.get("data") or {} for name, obj in self.state.items()}


async def until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def kubectl(cluster: KubeCluster, *args: str) -> str:
    return (await asyncio.to_thread(cluster.kubectl, *args)).stdout


async def put_configmap(cluster: KubeCluster, ns: str, name: str, value: str) -> None:
    manifest = (f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\n"
                f"  labels: {{meshctl-test: watch}}\ndata:\n  value: '{value}'\n")
    await asyncio.to_thread(cluster.kubectl, "apply", "-f", "-", stdin=manifest)


def cluster_state(cluster: KubeCluster, ns: str) -> dict[str, dict[str, str]]:
    items = json.loads(cluster.kubectl("-n", ns, "get", "configmaps", "-l", LABEL, "-o", "json").stdout)["items"]
    return {item["metadata"]["name"]: item.get("data") or {} for item in items}


@pytest.fixture
async def client(kube_cluster: KubeCluster) -> AsyncIterator[ApiClient]:
    api = await client_from_kubeconfig(kube_cluster.kubeconfig)
    try:
        yield api
    finally:
        await api.close()


@pytest.fixture
def namespace(kube_cluster: KubeCluster) -> Any:
    ns = f"watch-{secrets.token_hex(4)}"
    kube_cluster.kubectl("create", "namespace", ns)
    yield ns
    kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


async def running(watch: Watch) -> asyncio.Task[None]:
    task = asyncio.create_task(watch.run())
    await asyncio.wait_for(watch.synced.wait(), 30)
    return task


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, 0.2, 30.0, rng) for n in range(12)]
    for n, delay in enumerate(delays):
        step = min(30.0, 0.2 * 2**n)
        assert step / 2 <= delay <= step
    assert len(set(delays)) == len(delays)  # jittered: never the same twice in a row
    assert max(delays) <= 30.0


@pytest.mark.e2e
async def test_lists_then_delivers_add_modify_delete_in_order(
        kube_cluster: KubeCluster, client: ApiClient, namespace: str) -> None:
    await put_configmap(kube_cluster, namespace, "before", "0")
    recorder = Recorder()
    watch = Watch(client, CONFIGMAPS, recorder, namespace=namespace, label_selector=LABEL, **FAST)
    task = await running(watch)
    try:
        assert recorder.data() == {"before": {"value": "0"}}
        assert [c[0] for c in recorder.calls] == ["replace"]
        await put_configmap(kube_cluster, namespace, "a", "1")
        await put_configmap(kube_cluster, namespace, "a", "2")
        await kubectl(kube_cluster, "-n", namespace, "delete", "configmap", "before")
        await until("the delete", lambda: len(recorder.calls) == 4)
        assert [(c[0], c[1]) for c in recorder.calls[1:]] == [("upsert", "a"), ("upsert", "a"), ("delete", "before")]
        assert recorder.data() == {"a": {"value": "2"}} == cluster_state(kube_cluster, namespace)
        assert watch.resource_version == recorder.calls[-1][2]
        assert watch.errors == 0
    finally:
        await stop(task)


@pytest.mark.e2e
@pytest.mark.timeout(300)
async def test_stale_resource_version_relists_the_full_set_once(
        kube_cluster: KubeCluster, client: ApiClient, namespace: str) -> None:
    """A watch resumed from a version the server no longer has (410 Gone) lists again: objects
    deleted meanwhile are gone, none is duplicated, and later changes still arrive."""
    for name in ("a", "b"):
        await put_configmap(kube_cluster, namespace, name, "1")
    listed = json.loads(await kubectl(kube_cluster, "get", "--raw", f"/api/v1/namespaces/{namespace}/configmaps"))
    stale = listed["metadata"]["resourceVersion"]
    assert stale
    await kubectl(kube_cluster, "-n", namespace, "delete", "configmap", "a")
    await put_configmap(kube_cluster, namespace, "c", "1")
    # History before now is gone from etcd, and a restarted API server's watch cache starts
    # after it: both answer a watch from `stale` with 410 Gone.
    await asyncio.to_thread(kube_cluster.compact_etcd)
    await asyncio.to_thread(kube_cluster.restart_apiserver)
    recorder = Recorder()
    watch = Watch(client, CONFIGMAPS, recorder, namespace=namespace, label_selector=LABEL,
                  resource_version=stale, **FAST)
    task = asyncio.create_task(watch.run())
    try:
        await until("the re-list", lambda: watch.lists == 1)
        assert recorder.replaces == 1
        assert recorder.data() == {"b": {"value": "1"}, "c": {"value": "1"}} == cluster_state(kube_cluster, namespace)
        assert [c[0] for c in recorder.calls] == ["replace", "replace"]  # b and c once each, nothing else
        await put_configmap(kube_cluster, namespace, "d", "1")
        await until("d after the re-list", lambda: "d" in recorder.state)
        assert recorder.data() == cluster_state(kube_cluster, namespace)
        assert watch.lists == 1
    finally:
        await stop(task)


@pytest.mark.e2e
@pytest.mark.timeout(300)
async def test_survives_an_api_server_restart_without_losing_or_repeating_changes(
        kube_cluster: KubeCluster, client: ApiClient, namespace: str) -> None:
    recorder = Recorder()
    watch = Watch(client, CONFIGMAPS, recorder, namespace=namespace, label_selector=LABEL, **FAST)
    task = await running(watch)
    try:
        await put_configmap(kube_cluster, namespace, "a", "1")
        await put_configmap(kube_cluster, namespace, "b", "1")
        watches_before = watch.watches
        # Changed just before the server stops: may arrive before or after the restart, never lost.
        await put_configmap(kube_cluster, namespace, "a", "2")
        await asyncio.to_thread(kube_cluster.restart_apiserver, 1.0)
        # Changed right after it is back, possibly before the watch has reconnected.
        await put_configmap(kube_cluster, namespace, "c", "1")
        await put_configmap(kube_cluster, namespace, "b", "2")
        await kubectl(kube_cluster, "-n", namespace, "delete", "configmap", "a")
        expected = {"b": {"value": "2"}, "c": {"value": "1"}}
        assert cluster_state(kube_cluster, namespace) == expected
        await until("every change made around the restart", lambda: recorder.data() == expected)
        assert watch.watches > watches_before  # it did reconnect
        # Nothing delivered twice as an event (a re-list's replace is the only repeat allowed).
        events = [c for c in recorder.calls if c[0] != "replace"]
        assert len(events) == len(set(events))
        await put_configmap(kube_cluster, namespace, "d", "1")
        await until("a change after recovery", lambda: "d" in recorder.state)
    finally:
        await stop(task)


@pytest.mark.e2e
async def test_an_event_larger_than_many_network_reads_arrives_whole(
        kube_cluster: KubeCluster, client: ApiClient, namespace: str) -> None:
    recorder = Recorder()
    watch = Watch(client, CONFIGMAPS, recorder, namespace=namespace, label_selector=LABEL, **FAST)
    task = await running(watch)
    try:
        big = secrets.token_hex(450_000)  # 900 KB: near a ConfigMap's 1 MiB limit, read in many chunks
        manifest = {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "big", "namespace": namespace, "labels": {"meshctl-test": "watch"}},
                    "data": {"value": big, "after": "end"}}
        await asyncio.to_thread(kube_cluster.kubectl, "create", "-f", "-", stdin=json.dumps(manifest))
        await put_configmap(kube_cluster, namespace, "small", "1")
        await until("both", lambda: {"big", "small"} <= recorder.state.keys())
        assert recorder.data()["big"] == {"value": big, "after": "end"}
        assert [(c[0], c[1]) for c in recorder.calls] == [("upsert", "big"), ("upsert", "small")]
    finally:
        await stop(task)
