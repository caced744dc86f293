"""`meshctl describe --k8s` against a real API server: Pods (created as objects, not run), a Service,
mesh CRDs from manifests/crds.yaml, and a local file overriding a live object."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from meshctl.cli import cli
from tests.k8s.cluster import KubeCluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
CRDS = Path(__file__).parents[2] / "manifests" / "crds.yaml"


@pytest.fixture(scope="module")
def crds(kube_cluster: KubeCluster) -> None:
    """The mesh CRDs; ones another test installed already are kept."""
    kube_cluster.ensure_crds(crd for crd in yaml.safe_load_all(CRDS.read_text()) if crd)


@pytest.fixture
def namespace(kube_cluster: KubeCluster, crds: None) -> Iterator[str]:
    with kube_cluster.scratch_namespace("describe") as ns:
        yield ns


def pod(ns: str, version: str, sidecar: bool) -> dict[str, Any]:
    containers = [{"name": "app", "image": "example.invalid/reviews:1"}]
    if sidecar:
        containers.append({"name": "istio-proxy", "image": "example.invalid/proxy:1"})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"reviews-{version}", "namespace": ns, "labels": {"app": "reviews", "version": version}},
        "spec": {"serviceAccountName": "reviews", "containers": containers}}


def objects(ns: str) -> list[dict[str, Any]]:
    meta = {"namespace": ns}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reviews", **meta}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", **meta},
         "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080, "targetPort": 8080}]}},
        pod(ns, "v1", sidecar=True),
        pod(ns, "v2", sidecar=False),
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews", **meta},
         "spec": {"host": "reviews", "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
                  "subsets": [{"name": v, "labels": {"version": v}} for v in ("v1", "v2")]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews", **meta},
         "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}],
                                                  "timeout": "5s"}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": {"name": "default", **meta},
         "spec": {"mtls": {"mode": "STRICT"}}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "reviews", **meta},
         "spec": {"selector": {"matchLabels": {"app": "reviews"}},
                  "rules": [{"from": [{"source": {"namespaces": [ns]}}]}]}},
    ]


def describe(cluster: KubeCluster, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["describe", *args, "--k8s", "--kubeconfig", str(cluster.kubeconfig),
                                      "-o", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    found: dict[str, Any] = json.loads(result.output)
    return found


def test_describe_live_pods_and_service(kube_cluster: KubeCluster, namespace: str, tmp_path: Path) -> None:
    ns = namespace
    kube_cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(objects(ns)))
    host = f"reviews.{ns}.svc.cluster.local"

    v1 = describe(kube_cluster, "pod", "reviews-v1", "-n", ns)
    (service,) = v1["services"]
    assert (service["kind"], service["host"], service["ports"]) == ("Service", host, ["9080/HTTP (http)"])
    assert service["destination_rules"][0]["policy"] == ["load balancer: ROUND_ROBIN"]
    route = service["virtual_services"][0]["routes"][0]
    assert route["reaches_target"] is True and "timeout 5s" in route["details"]
    assert v1["mtls"] == {"mode": "STRICT", "source": f"PeerAuthentication {ns}/default (namespace)", "ports": []}
    assert [(p["kind"], p["name"], p["action"]) for p in v1["policies"]] == [
        ("AuthorizationPolicy", "reviews", "ALLOW")]
    assert v1["warnings"] == []

    v2 = describe(kube_cluster, "pod", f"{ns}/reviews-v2")
    assert v2["workload"]["sidecar"] is False
    assert any(w.startswith(f"receives no traffic from VirtualService {ns}/reviews") for w in v2["warnings"])
    assert any("runs no sidecar" in w for w in v2["warnings"])

    svc = describe(kube_cluster, "service", "reviews", "-n", ns)
    endpoints = {e["name"]: (e["subsets"], e["sidecar"], e["inbound_mtls"]) for e in svc["services"][0]["endpoints"]}
    assert endpoints == {
        f"{ns}/reviews-v1": ([f"v1 (DestinationRule {ns}/reviews)"], True, "STRICT"),
        f"{ns}/reviews-v2": ([f"v2 (DestinationRule {ns}/reviews)"], False, "DISABLE"),
    }

    # A file replaces the live VirtualService: "what if I applied this?" - v2 would get half the traffic.
    vs = next(o for o in objects(ns) if o["kind"] == "VirtualService")
    vs["spec"]["http"][0]["route"] = [{"destination": {"host": "reviews", "subset": s}, "weight": 50}
                                      for s in ("v1", "v2")]
    (tmp_path / "vs.yaml").write_text(yaml.safe_dump(vs))
    whatif = describe(kube_cluster, "pod", f"{ns}/reviews-v2", "-f", str(tmp_path / "vs.yaml"))
    route = whatif["services"][0]["virtual_services"][0]["routes"][0]
    assert route["reaches_target"] is True and route["destinations"] == [f"{host} subset v1: 50%",
                                                                         f"{host} subset v2: 50%"]

    missing = CliRunner().invoke(cli, ["describe", "pod", "nope", "-n", ns, "--k8s", "--kubeconfig",
                                       str(kube_cluster.kubeconfig)])
    assert missing.exit_code == 1 and f"pod {ns}/nope not found" in missing.output
