"""`meshctl up`'s Kubernetes duties (`meshctl.kube_up.KubeControlPlane`) against a real API server.

Pilot (with the cluster as config source), the mesh CA and `KubeControlPlane` run in this process
as `meshctl up --kubeconfig` composes them. The mesh config map selects this test's namespaces
(discovery selectors); the webhook configurations are the rendered ones, scoped to them, without a
caBundle. Checked: the webhooks serve HTTPS with a certificate the root verifies; both caBundles
and the `istio-ca-root-cert` ConfigMap (selected namespaces only, never kube-public) carry the root,
and follow a root rotation; an edited ConfigMap gets its key back (another key kept), a deleted
one comes back, and a namespace joining the selectors gets it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry

from citadel.keys import certs_pem
from meshctl.kube_up import MANAGED_LABEL, ROOT_CERT_KEY, KubeControlPlane
from meshctl.localmesh import free_port
from meshctl.security import MeshSecurity
from pilot.app import Pilot
from pilot.settings import PilotSettings
from tests.k8s.cluster import KubeCluster
from tests.k8s.meshpods import SCOPE_LABEL, webhook_configs
from tests.k8s.pilots import metric

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


async def until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(check):
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def config_map(cluster: KubeCluster, ns: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("-n", ns, "get", "configmap", "istio-ca-root-cert", "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def root_in(cluster: KubeCluster, ns: str) -> str | None:
    found = config_map(cluster, ns)
    return None if found is None else (found.get("data") or {}).get(ROOT_CERT_KEY)


def bundles(cluster: KubeCluster, config: dict[str, Any]) -> set[str]:
    got = json.loads(cluster.kubectl("get", config["kind"].lower(), config["metadata"]["name"], "-o", "json").stdout)
    return {base64.b64decode(h["clientConfig"].get("caBundle", "")).decode() for h in got["webhooks"]}


async def test_root_configmaps_and_ca_bundles_follow_the_root(kube_cluster: KubeCluster, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, token = kube_cluster, os.urandom(3).hex()
    mesh_ns, inside, outside = f"istio-{token}", f"in-{token}", f"out-{token}"
    port = free_port()
    configs = webhook_configs(f"https://127.0.0.1:{port}", token)
    monkeypatch.setenv("MESHCTL_KUBE_INJECTION_WEBHOOK_CONFIG_NAME", configs[0]["metadata"]["name"])
    monkeypatch.setenv("MESHCTL_KUBE_VALIDATION_WEBHOOK_CONFIG_NAME", configs[1]["metadata"]["name"])

    def kubectl(*args: str, stdin: str | None = None) -> Any:
        return asyncio.to_thread(cluster.kubectl, *args, stdin=stdin)

    try:
        for name, labels in ((mesh_ns, {}), (inside, {SCOPE_LABEL: token}), (outside, {})):
            await kubectl("create", "-f", "-", stdin=json.dumps(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}))
        mesh = yaml.safe_dump({"discoverySelectors": [{"matchLabels": {SCOPE_LABEL: token}}]})
        await kubectl("-n", mesh_ns, "create", "configmap", "istio", f"--from-literal=mesh={mesh}")
        for config in configs:
            await kubectl("create", "-f", "-", stdin=json.dumps(config))

        settings = PilotSettings(ads_port=0, debug_port=0, debounce_ms=20, kubeconfig=cluster.kubeconfig,
                                 kube_mesh_namespace=mesh_ns)
        security = MeshSecurity(tmp_path / "state", CollectorRegistry())
        kube = await KubeControlPlane.open(security, settings, trust_domain="cluster.local",
                                           webhooks=("127.0.0.1", port))
        await security.start()
        try:
            async with Pilot(settings) as pilot:
                await kube.start(pilot)
                ca = security.citadel.ca
                root = certs_pem(ca.trust_bundle())

                # The webhooks answer over TLS with a certificate the mesh root verifies.
                context = ssl.create_default_context(cadata=root)
                async with aiohttp.ClientSession() as session, session.get(
                        f"https://127.0.0.1:{port}/ready", ssl=context) as resp:
                    assert resp.status == 200

                # Their reviews are counted in pilot's registry, under Istio's names on pilot's /metrics.
                review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
                    "uid": "u-1", "operation": "CREATE", "namespace": inside, "dryRun": False,
                    "kind": {"group": "networking.istio.io", "version": "v1", "kind": "VirtualService"},
                    "resource": {"group": "networking.istio.io", "version": "v1", "resource": "virtualservices"},
                    "object": {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                               "metadata": {"name": "bad"}, "spec": {"hosts": []}}}}
                async with aiohttp.ClientSession() as session, session.post(
                        f"https://127.0.0.1:{port}/validate", json=review, ssl=context) as resp:
                    assert (await resp.json())["response"]["allowed"] is False
                debug = f"127.0.0.1:{pilot.debug_port}"
                assert await metric(debug, "galley_validation_failed", {
                    "group": "networking.istio.io", "version": "v1", "resource": "virtualservices",
                    "reason": "invalid_resource"}) == 1.0
                assert await metric(debug, "sidecar_injection_requests_total") == 0.0

                # The root: in both caBundles and the selected namespace's ConfigMap only.
                for config in configs:
                    await until(f"caBundle of {config['metadata']['name']}",
                                lambda c=config: bundles(cluster, c) == {root})  # type: ignore[misc]
                await until("the root ConfigMap in the selected namespace", lambda: root_in(cluster, inside) == root)
                published = config_map(cluster, inside)
                assert published is not None
                assert MANAGED_LABEL.items() <= published["metadata"]["labels"].items()
                assert root_in(cluster, outside) is None and root_in(cluster, "kube-public") is None

                # A root rotation (a second root introduced): ConfigMap and caBundles carry both.
                ca.introduce_root()
                rotated = certs_pem(ca.trust_bundle())
                assert rotated != root and root in rotated
                await until("the rotated bundle in the ConfigMap", lambda: root_in(cluster, inside) == rotated)
                for config in configs:
                    await until(f"the rotated caBundle of {config['metadata']['name']}",
                                lambda c=config: bundles(cluster, c) == {rotated})  # type: ignore[misc]

                # Someone edits the ConfigMap: our key comes back, theirs stays. Deleted: it comes back.
                patch = json.dumps({"data": {ROOT_CERT_KEY: "garbage", "extra": "kept"}})
                await kubectl("-n", inside, "patch", "configmap", "istio-ca-root-cert", "--type=merge", "-p", patch)
                await until("the key restored", lambda: root_in(cluster, inside) == rotated)
                again = config_map(cluster, inside)
                assert again is not None and again["data"]["extra"] == "kept"
                await kubectl("-n", inside, "delete", "configmap", "istio-ca-root-cert")
                await until("the ConfigMap re-created", lambda: root_in(cluster, inside) == rotated)

                # A namespace joining the discovery selectors gets it.
                await kubectl("label", "namespace", outside, f"{SCOPE_LABEL}={token}")
                await until("the ConfigMap in the newly selected namespace",
                            lambda: root_in(cluster, outside) == rotated)
                assert kube.publisher is not None and kube.publisher.writes >= 4
                for task in ("root-cert-configmaps", "webhook-ca-bundles"):  # no guarded task failed
                    assert pilot.failures.counter.labels(task=task)._value.get() == 0
        finally:
            await kube.close()
            await security.stop()
    finally:
        for config in configs:
            await kubectl("delete", config["kind"].lower(), config["metadata"]["name"], "--ignore-not-found")
        for name in (mesh_ns, inside, outside):
            await kubectl("delete", "namespace", name, "--ignore-not-found", "--wait=false")
