"""The service registry against a real API server and kube-controller-manager: a Deployment's pods
(run by the tests' kubelet: bound, reported running at an address), the EndpointSlices the
controller publishes for them, and what pilot's pipeline makes of it: the mesh model, the EDS a
sidecar gets, and the EDS fast path when the Deployment is scaled down or a pod turns unready;
then `Pilot` started with a kubeconfig, serving a pod's sidecar over real ADS as its Pod says.

No network namespaces are needed here (nothing connects to the pods): the addresses reported
are never routed, only published.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from kubernetes_asyncio.client import ApiClient
from prometheus_client import CollectorRegistry

from pilot.app import Pilot
from pilot.config.store import ConfigStore
from pilot.kube.client import client_from_kubeconfig
from pilot.kube.meshconfig import NamespaceSelector
from pilot.kube.namespaces import NamespaceFilter
from pilot.kube.registry_source import KubeRegistry
from pilot.metrics import PushMetrics
from pilot.model.build import build_mesh
from pilot.model.diff import endpoints_only
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.push import Pusher
from pilot.settings import PilotSettings
from pilot.testing.ads_client import AdsClient, decode, make_node
from pilot.translate import generate, generate_endpoints
from pilot.xds.cache import SnapshotCache
from pilot.xds.snapshot import Snapshot
from pilot.xds.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE
from tests.k8s.cluster import KubeCluster
from tests.k8s.pods import Kubelet

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FAST = {"min_backoff": 0.05, "max_backoff": 1.0, "request_timeout": 10.0}
NODE_ADDRESS = "10.255.0.1"  # the test node's address: published only, never routed


def manifests(ns: str) -> str:
    labels = {"app": "reviews", "version": "v1", "security.istio.io/tlsMode": "istio"}
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reviews", "namespace": ns}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": ns},
         "spec": {"selector": {"app": "reviews"}, "ports": [
             {"name": "http", "port": 9080, "targetPort": "http"},
             {"name": "metrics", "port": 9090, "targetPort": 9091, "appProtocol": "http"}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "reviews", "namespace": ns},
         "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "reviews"}},
                  "template": {"metadata": {"labels": labels}, "spec": {
                      "serviceAccountName": "reviews", "terminationGracePeriodSeconds": 30,
                      "containers": [{"name": "app", "image": "example.invalid/reviews:1",
                                      "ports": [{"name": "http", "containerPort": 8080}]}]}}}},
    ]
    return yaml.safe_dump_all(docs)


async def until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def kubectl(cluster: KubeCluster, *args: str, stdin: str | None = None) -> str:
    return (await asyncio.to_thread(cluster.kubectl, *args, stdin=stdin)).stdout


async def pods(cluster: KubeCluster, ns: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(await kubectl(cluster, "-n", ns, "get", "pods", "-l", "app=reviews",
                                                           "-o", "json"))["items"]
    return found


@pytest.fixture
async def client(kube_cluster: KubeCluster) -> AsyncIterator[ApiClient]:
    api = await client_from_kubeconfig(kube_cluster.kubeconfig)
    try:
        yield api
    finally:
        await api.close()


@pytest.fixture
async def namespace(kube_cluster: KubeCluster) -> AsyncIterator[str]:
    ns = f"registry-{secrets.token_hex(4)}"
    await kubectl(kube_cluster, "create", "namespace", ns)
    try:
        yield ns
    finally:
        await kubectl(kube_cluster, "delete", "namespace", ns, "--wait=false")


@pytest.fixture
def node_agent(kube_cluster: KubeCluster) -> Iterator[Kubelet]:
    """The tests' kubelet without pod sandboxes: pods are bound and reported, never run."""
    with Kubelet.running(kube_cluster, NODE_ADDRESS) as node:
        yield node


class Pipeline:
    """The store, the registry's watches and the pusher, as pilot wires them; one sidecar class watched.

    The registry takes the Services of the sidecar's namespace only (a discovery selector on
    `kubernetes.io/metadata.name`, as a user would write it): earlier tests' namespaces are still
    being deleted in the background (`--wait=false`), and their Services leaving would otherwise
    change this mesh's clusters and routes in the middle of a test.
    """

    def __init__(self, client: ApiClient, proxy: ProxyClass) -> None:
        self.store, self.cache = ConfigStore(), SnapshotCache()
        self.metrics = PushMetrics(CollectorRegistry())
        name_label = "kubernetes.io/metadata.name"
        only = NamespaceFilter([NamespaceSelector(match_labels={name_label: proxy.namespace})])
        only.upsert({"metadata": {"name": proxy.namespace, "labels": {name_label: proxy.namespace}}})
        self.registry = KubeRegistry(self.store, namespaces=only, watch_options=FAST)
        self.pusher = Pusher(self.store, self.cache, build_mesh, generate, self.metrics, debounce=0.05,
                             endpoints_only=endpoints_only, generate_endpoints=generate_endpoints)
        self.client, self.proxy = client, proxy

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Pipeline]:
        with self.cache.watch(self.proxy):
            tasks = [asyncio.create_task(self.registry.run(self.client)), asyncio.create_task(self.pusher.run())]
            try:
                yield self
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def snapshot(self) -> Snapshot | None:
        return self.cache.get(self.proxy)

    def endpoints(self, cluster: str) -> list[tuple[str, int]]:
        """(address, port) of every endpoint in the published EDS of the watched sidecar for `cluster`."""
        snapshot = self.snapshot()
        found = snapshot.of(ENDPOINT).get(cluster) if snapshot is not None else None
        if found is None:
            return []
        cla = endpoint_pb2.ClusterLoadAssignment.FromString(found.value)
        return sorted((e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
                      for group in cla.endpoints for e in group.lb_endpoints)


async def test_deployment_endpoints_reach_eds_and_scale_down_takes_the_fast_path(
    kube_cluster: KubeCluster, client: ApiClient, namespace: str, node_agent: Kubelet,
) -> None:
    kubelet = node_agent
    ns = namespace
    await until("the default ServiceAccount", lambda: kube_cluster.kubectl(
        "-n", ns, "get", "serviceaccount", "default", check=False).returncode == 0)
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=manifests(ns))
    host = f"reviews.{ns}.svc.cluster.local"
    http, metrics_cluster = f"outbound|9080||{host}", f"outbound|9090||{host}"
    pipeline = Pipeline(client, ProxyClass(ProxyKind.SIDECAR, ns, (("app", "productpage"),)))
    async with pipeline.running():
        # The ReplicaSet controller creates two Pods; the tests' kubelet runs them at chosen addresses.
        await until("two pods of the Deployment", lambda: len(kube_cluster.kubectl(
            "-n", ns, "get", "pods", "-l", "app=reviews", "-o", "name").stdout.split()) == 2)
        addresses = {}
        for i, pod in enumerate(sorted(await pods(kube_cluster, ns), key=lambda p: p["metadata"]["name"])):
            name = pod["metadata"]["name"]
            addresses[name] = f"10.244.{secrets.randbelow(250) + 1}.{10 + i}"
            await asyncio.to_thread(kubelet.bind, ns, name)
            await asyncio.to_thread(kubelet.report, ns, name, addresses[name])
        # kube-controller-manager publishes the ready endpoints; the named targetPort resolved to 8080.
        both = sorted((ip, 8080) for ip in addresses.values())
        await until("both pods in EDS", lambda: pipeline.endpoints(http) == both)
        assert pipeline.endpoints(metrics_cluster) == sorted((ip, 9091) for ip in addresses.values())
        mesh = pipeline.pusher.mesh
        service = mesh.services[host]
        cluster_ip = json.loads(await kubectl(kube_cluster, "-n", ns, "get", "service", "reviews", "-o", "json"))[
            "spec"]["clusterIP"]
        assert service.addresses == (cluster_ip,) and service.location == "MESH_INTERNAL"
        assert [(p.name, p.protocol, p.target_port) for p in service.ports] == [
            ("http", "HTTP", 8080), ("metrics", "HTTP", 9091)]
        assert {e.service_account for e in service.endpoints} == {"reviews"}
        assert all(e.labels["version"] == "v1" for e in service.endpoints)

        # A Node is matched to its Pod: labels and service account are the Pod's, whatever it claims.
        first = min(addresses)
        node = base_pb2.Node(id=f"sidecar~{addresses[first]}~{first}.{ns}~{ns}.svc.cluster.local")
        node.metadata.update({"NAMESPACE": ns, "LABELS": {"app": "impostor"}, "SERVICE_ACCOUNT": "admin"})
        identity = pipeline.registry.classify(node)
        assert dict(identity.proxy_class.labels)["app"] == "reviews" and identity.service_account == "reviews"

        # A pod failing its readiness probe leaves EDS, by the fast path; clusters, listeners, routes stay.
        before, fast = pipeline.snapshot(), pipeline.metrics.eds_only_pushes._value.get()
        assert before is not None
        unready, kept = sorted(addresses)
        await asyncio.to_thread(kubelet.report, ns, unready, addresses[unready], ready=False)
        await until("the unready pod out of EDS", lambda: pipeline.endpoints(http) == [(addresses[kept], 8080)])
        after = pipeline.snapshot()
        assert after is not None and pipeline.metrics.eds_only_pushes._value.get() > fast
        assert [after.version(t) for t in (CLUSTER, LISTENER, ROUTE)] == [
            before.version(t) for t in (CLUSTER, LISTENER, ROUTE)]
        await asyncio.to_thread(kubelet.report, ns, unready, addresses[unready])
        await until("the pod back in EDS", lambda: pipeline.endpoints(http) == both)

        # Scale down: the ReplicaSet deletes a pod; its endpoint turns terminating, then goes. EDS only.
        before, fast = pipeline.snapshot(), pipeline.metrics.eds_only_pushes._value.get()
        assert before is not None
        await kubectl(kube_cluster, "-n", ns, "scale", "deployment", "reviews", "--replicas=1")
        await until("one pod left in EDS", lambda: len(pipeline.endpoints(http)) == 1)
        await until("the deleted pod gone", lambda: len(kube_cluster.kubectl(
            "-n", ns, "get", "pods", "-l", "app=reviews", "-o", "name").stdout.split()) == 1)
        remaining = (await pods(kube_cluster, ns))[0]["metadata"]["name"]
        await until("EDS settled on the remaining pod",
                    lambda: pipeline.endpoints(http) == [(addresses[remaining], 8080)])
        after = pipeline.snapshot()
        assert after is not None and pipeline.metrics.eds_only_pushes._value.get() > fast
        assert [after.version(t) for t in (CLUSTER, LISTENER, ROUTE)] == [
            before.version(t) for t in (CLUSTER, LISTENER, ROUTE)]
        assert after.version(ENDPOINT) != before.version(ENDPOINT)
        assert pipeline.metrics.generate_errors._value.get() == 0


async def test_pilot_serves_a_sidecar_as_its_pod_and_refuses_a_node_with_another_ip(
    kube_cluster: KubeCluster, namespace: str, node_agent: Kubelet,
) -> None:
    ns, ip = namespace, f"10.244.{secrets.randbelow(250) + 1}.7"
    await until("the default ServiceAccount", lambda: kube_cluster.kubectl(
        "-n", ns, "get", "serviceaccount", "default", check=False).returncode == 0)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ratings-0", "namespace": ns, "labels": {
        "app": "ratings", "security.istio.io/tlsMode": "istio"}}, "spec": {"containers": [
            {"name": "app", "image": "example.invalid/ratings:1", "ports": [{"name": "http", "containerPort": 8080}]}]}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ratings", "namespace": ns},
               "spec": {"selector": {"app": "ratings"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=yaml.safe_dump_all([pod, service]))
    await asyncio.to_thread(node_agent.bind, ns, "ratings-0")
    await asyncio.to_thread(node_agent.report, ns, "ratings-0", ip)
    # Pilot as deployed: a kubeconfig in its settings starts the config source and the registry.
    async with Pilot(PilotSettings(ads_port=0, debug_port=0, debounce_ms=20, kubeconfig=kube_cluster.kubeconfig,
                                   kube_mesh_namespace=ns)) as pilot:
        assert pilot.store.get("Service", ns, "ratings") is not None  # the first push waited for the lists
        cluster = f"outbound|80||ratings.{ns}.svc.cluster.local"
        node = make_node(f"sidecar~{ip}~ratings-0.{ns}~{ns}.svc.cluster.local", namespace=ns,
                         labels={"app": "impostor"})
        async with AdsClient(pilot.ads_address, node) as ads:
            ads.send(ENDPOINT, [cluster])
            addresses: list[str] = []
            while addresses != [ip]:  # pushed once kube-controller-manager published the ready endpoint
                response = await ads.recv(timeout=60)
                ads.ack(response)
                addresses = [e.endpoint.address.socket_address.address for r in response.resources
                             for g in decode(r).endpoints for e in g.lb_endpoints]
            row = next(r for r in pilot.status.syncz() if r["proxy"] == node.id)
            assert row["labels"] == {"app": "ratings", "security.istio.io/tlsMode": "istio"}
            assert row["service_account"] == "default"
        impostor = make_node(f"sidecar~10.9.9.9~ratings-0.{ns}~{ns}.svc.cluster.local", namespace=ns)
        async with AdsClient(pilot.ads_address, impostor) as ads:
            ads.send(CLUSTER)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ads.recv(timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"Pod {ns}/ratings-0 has {ip}" in str(refused.value.details())


async def test_a_relabelled_pod_moves_its_connected_sidecar_to_its_new_class(
    kube_cluster: KubeCluster, namespace: str, node_agent: Kubelet,
) -> None:
    """`kubectl label pod` on a running pod: its sidecar's stream (not reconnected) is classified
    again from the Pod and gets the config of its new labels, here the inbound cluster of a Service
    that selects the new label, as Istio updates a proxy's labels from its Pod."""
    ns, ip = namespace, f"10.244.{secrets.randbelow(250) + 1}.8"
    await until("the default ServiceAccount", lambda: kube_cluster.kubectl(
        "-n", ns, "get", "serviceaccount", "default", check=False).returncode == 0)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ratings-0", "namespace": ns, "labels": {
        "app": "ratings"}}, "spec": {"containers": [{"name": "app", "image": "example.invalid/ratings:1"}]}}
    services = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
                 "spec": {"selector": selector, "ports": [{"name": "http", "port": port, "targetPort": target}]}}
                for name, selector, port, target in (("ratings", {"app": "ratings"}, 80, 8080),
                                                     ("ratings-v2", {"app": "ratings", "version": "v2"}, 81, 9080))]
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=yaml.safe_dump_all([pod, *services]))
    await asyncio.to_thread(node_agent.bind, ns, "ratings-0")
    await asyncio.to_thread(node_agent.report, ns, "ratings-0", ip)
    async with Pilot(PilotSettings(ads_port=0, debug_port=0, debounce_ms=20, kubeconfig=kube_cluster.kubeconfig,
                                   kube_mesh_namespace=ns)) as pilot:
        node = make_node(f"sidecar~{ip}~ratings-0.{ns}~{ns}.svc.cluster.local", namespace=ns)
        async with AdsClient(pilot.ads_address, node) as ads:
            ads.send(CLUSTER)

            async def inbound(expected: set[str]) -> set[str]:
                """The inbound clusters of the first CDS response that has `expected` (or of the last
                one in 30 s): a Service's EndpointSlice change may push before the Pod's label change."""
                loop = asyncio.get_running_loop()
                deadline, names = loop.time() + 30, set[str]()
                while names != expected and loop.time() < deadline:
                    response = await ads.recv(timeout=max(0.1, deadline - loop.time()))
                    ads.ack(response)
                    names = {c.name for c in map(decode, response.resources) if c.name.startswith("inbound|")}
                return names

            assert await inbound({"inbound|8080||"}) == {"inbound|8080||"}
            (row,) = [r for r in pilot.status.syncz() if r["proxy"] == node.id]
            await kubectl(kube_cluster, "-n", ns, "label", "pod", "ratings-0", "version=v2")
            assert await inbound({"inbound|8080||", "inbound|9080||"}) == {"inbound|8080||", "inbound|9080||"}
            (after,) = [r for r in pilot.status.syncz() if r["proxy"] == node.id]
            assert after["labels"] == {"app": "ratings", "version": "v2"}
            assert (after["peer"], after["connected_since"]) == (row["peer"], row["connected_since"])
            await kubectl(kube_cluster, "-n", ns, "label", "pod", "ratings-0", "version-")
            assert await inbound({"inbound|8080||"}) == {"inbound|8080||"}
