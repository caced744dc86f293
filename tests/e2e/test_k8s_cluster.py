"""Smoke test of the real control plane the Kubernetes tests run on (tests/k8s/cluster.py)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable

import pytest
import yaml

from tests.k8s.cluster import KubeCluster

pytestmark = pytest.mark.e2e

# A minimal CRD for Istio's VirtualService: enough for the API server to serve the kind.
VIRTUAL_SERVICE_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "virtualservices.networking.istio.io"},
    "spec": {
        "group": "networking.istio.io",
        "scope": "Namespaced",
        "names": {"plural": "virtualservices", "singular": "virtualservice", "kind": "VirtualService",
                  "listKind": "VirtualServiceList", "shortNames": ["vs"]},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}},
        }],
    },
}


def _until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll `check()` until it is true; fail naming `what` if it never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_api_server_serves_the_built_version(kube_cluster: KubeCluster) -> None:
    version = json.loads(kube_cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.37.2"
    assert kube_cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_kubectl_creates_namespace_and_configmap_and_controller_adds_default_sa(
    kube_cluster: KubeCluster,
) -> None:
    ns = f"smoke-{secrets.token_hex(4)}"
    kube_cluster.kubectl("create", "namespace", ns)
    try:
        kube_cluster.kubectl("-n", ns, "create", "configmap", "mesh", "--from-literal=mesh=trustDomain: x")
        got = json.loads(kube_cluster.kubectl("-n", ns, "get", "configmap", "mesh", "-o", "json").stdout)
        assert got["data"] == {"mesh": "trustDomain: x"}
        # Only kube-controller-manager's serviceaccount controller creates this.
        _until(f"ServiceAccount default in {ns}",
               lambda: kube_cluster.kubectl("-n", ns, "get", "serviceaccount", "default", check=False).returncode == 0)
    finally:
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false")


def test_crd_becomes_established_and_serves_its_kind(kube_cluster: KubeCluster) -> None:
    kube_cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(VIRTUAL_SERVICE_CRD))
    kube_cluster.kubectl("wait", "--for=condition=Established", "--timeout=30s",
                         "crd/virtualservices.networking.istio.io")
    ns = f"crd-{secrets.token_hex(4)}"
    kube_cluster.kubectl("create", "namespace", ns)
    try:
        vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
              "metadata": {"name": "reviews", "namespace": ns},
              "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}}
        kube_cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(vs))
        got = json.loads(kube_cluster.kubectl("-n", ns, "get", "vs", "reviews", "-o", "json").stdout)
        assert got["spec"]["hosts"] == ["reviews"]
    finally:
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false")
        # Cluster-scoped and shared by the session: later tests install the full CRDs from manifests/.
        kube_cluster.kubectl("delete", "crd", "virtualservices.networking.istio.io")
