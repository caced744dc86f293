"""`meshctl analyze --k8s` against a real API server: the cluster's mesh objects, Services, Pods and
Secrets analyzed together, reported for one namespace, and a local file overriding a live object."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from meshctl.analyze import EXIT_FOUND_ISSUES
from meshctl.cli import cli
from tests.k8s.cluster import KubeCluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
CRDS = Path(__file__).parents[2] / "manifests" / "crds.yaml"


@pytest.fixture(scope="module")
def crds(kube_cluster: KubeCluster) -> None:
    """The mesh CRDs from manifests/crds.yaml; ones another test installed already are kept."""
    kube_cluster.ensure_crds(crd for crd in yaml.safe_load_all(CRDS.read_text()) if crd)


@pytest.fixture
def namespace(kube_cluster: KubeCluster, crds: None) -> Iterator[str]:
    with kube_cluster.scratch_namespace("analyze") as ns:
        yield ns


def objects(ns: str) -> list[dict[str, Any]]:
    meta = {"namespace": ns}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reviews", **meta}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", **meta},
         "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "web", "port": 9080}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "reviews-v1", "labels": {
            "app": "reviews", "version": "v1"}, **meta},
         "spec": {"serviceAccountName": "reviews", "containers": [{"name": "app", "image": "example.invalid/r:1"}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews", **meta},
         "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                 {"name": "v2", "labels": {"version": "v2"}}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews", **meta},
         "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "ratings"}}]}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "ratings", **meta},
         "spec": {"selector": {"matchLabels": {"app": "ratings"}},
                  "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/{ns}/sa/reviews",
                                                                 f"cluster.local/ns/{ns}/sa/ghost"]}}]}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "public", **meta},
         "spec": {"selector": {"app": "reviews"}, "servers": [{
             "port": {"number": 8443, "name": "https", "protocol": "HTTPS"}, "hosts": ["reviews.example.com"],
             "tls": {"mode": "SIMPLE", "credentialName": "reviews-cert"}}]}},
    ]


def analyze(cluster: KubeCluster, *args: str) -> tuple[int, set[tuple[str, str, str, str]]]:
    result = CliRunner().invoke(cli, ["analyze", "--k8s", "--kubeconfig", str(cluster.kubeconfig), "-o", "json",
                                      *args], catch_exceptions=False)
    assert result.exit_code in (0, EXIT_FOUND_ISSUES), result.output
    return result.exit_code, {(m["code"], m["kind"], m["resourceName"], m["path"]) for m in json.loads(result.output)}


def test_analyze_a_live_namespace_and_a_file_over_it(kube_cluster: KubeCluster, namespace: str,
                                                     tmp_path: Path) -> None:
    kube_cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(objects(namespace)))
    code, found = analyze(kube_cluster, "-n", namespace)
    assert code == EXIT_FOUND_ISSUES
    expected = {
        ("IST0101", "VirtualService", "reviews", "spec.http[0].route[0].destination.host"),  # no Service ratings
        ("IST0173", "DestinationRule", "reviews", "spec.subsets[1].labels"),  # no pod has version=v2
        ("IST0127", "AuthorizationPolicy", "ratings", "spec.selector.matchLabels"),  # no pod app=ratings
        ("MSH0104", "AuthorizationPolicy", "ratings", "spec.rules[0].from[0].source.principals[1]"),
        ("IST0161", "Gateway", "public", "spec.servers[0].tls.credentialName"),  # no Secret reviews-cert
        ("IST0118", "Service", "reviews", "spec.ports[0].name"),  # "web" states no protocol
        ("MSH0101", "Gateway", "public", "spec.servers[0].hosts[0]"),  # no VirtualService on the Gateway
    }
    assert expected <= found, sorted(found)
    assert ("IST0173", "DestinationRule", "reviews", "spec.subsets[0].labels") not in found  # the v1 pod is there
    assert ("MSH0104", "AuthorizationPolicy", "ratings", "spec.rules[0].from[0].source.principals[0]") not in found

    # The missing Secret appears: the credential message goes; a file fixes the route before it is applied.
    kube_cluster.kubectl("-n", namespace, "create", "secret", "generic", "reviews-cert",
                         "--from-literal=tls.crt=x", "--from-literal=tls.key=y")
    fixed = next(o for o in objects(namespace) if o["kind"] == "VirtualService")
    fixed["spec"]["http"][0]["route"][0]["destination"]["host"] = "reviews"
    (tmp_path / "vs.yaml").write_text(yaml.safe_dump(fixed))
    _, after = analyze(kube_cluster, "-n", namespace, "-f", str(tmp_path / "vs.yaml"))
    assert not {m for m in after if m[0] in ("IST0101", "IST0161")}, sorted(after)
    assert ("IST0173", "DestinationRule", "reviews", "spec.subsets[1].labels") in after

    # Another namespace has none of these objects: nothing reported there.
    other_code, other = analyze(kube_cluster, "-n", "kube-public")
    assert other_code == 0 and other == set()
