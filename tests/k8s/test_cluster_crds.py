"""The test cluster's CRD helper against a real API server: a CRD still being deleted by another
test's clean-up (`kubectl delete --wait=false`) is created again, not taken as installed."""

from __future__ import annotations

import json
import secrets
import threading
import time

import pytest

from tests.k8s.cluster import KubeCluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
HOLD = "meshctl.test/hold"  # a finalizer of the test's own: the deletion waits until it is removed


def _crd(group: str) -> dict[str, object]:
    schema = {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": schema}]},
    }


def test_a_crd_being_deleted_is_created_again(kube_cluster: KubeCluster) -> None:
    crd = _crd(f"t{secrets.token_hex(4)}.meshctl.dev")
    name = str(crd["metadata"]["name"])  # type: ignore[index]
    held = {**crd, "metadata": {"name": name, "finalizers": [HOLD]}}
    kube_cluster.kubectl("create", "-f", "-", stdin=json.dumps(held))
    kube_cluster.ensure_crds([crd])  # installed already: kept
    kube_cluster.kubectl("delete", "crd", name, "--wait=false")
    terminating = kube_cluster.kubectl("get", "crd", name, "-o", "jsonpath={.metadata.deletionTimestamp}")
    assert terminating.stdout.strip(), "the finalizer should hold the CRD in its deletion"

    def release() -> None:  # another test's clean-up finishing a moment later
        time.sleep(2)
        kube_cluster.kubectl("patch", "crd", name, "--type=json",
                             "-p", json.dumps([{"op": "remove", "path": "/metadata/finalizers"}]))

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        kube_cluster.ensure_crds([crd])
    finally:
        releaser.join()
    try:
        after = json.loads(kube_cluster.kubectl("get", "crd", name, "-o", "json").stdout)
        assert "deletionTimestamp" not in after["metadata"]
        conditions = {c["type"]: c["status"] for c in after["status"]["conditions"]}
        assert conditions.get("Established") == "True", conditions
    finally:
        kube_cluster.kubectl("delete", "crd", name, "--ignore-not-found", "--wait=false", check=False)
