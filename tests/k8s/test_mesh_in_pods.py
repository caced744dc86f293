"""The whole mesh on a real API server: `meshctl up --kubeconfig` as istiod, injected pods run for real.

What a user does, step by step (README "Try it: a canary on a cluster"): the CRDs and the webhook
configurations `meshctl install` renders are installed (the webhooks' client switched from the
istiod Service to `https://127.0.0.1:<port>` and scoped to this test's namespaces, without a
caBundle: the control plane patches it at start); `meshctl up --kubeconfig` runs on the host as
istiod, its authenticated xDS/CA port on the pod bridge's gateway (the node's address pods reach)
and told so through the injector's settings (`MESHCTL_INJECT_DISCOVERY_ADDRESS`/`CA_ADDRESS`).
A namespace labeled `istio-injection=enabled` gets Deployments `reviews-v1`, `reviews-v2` (an app
answering its version) behind Service `reviews` (port `http` 9080) and a `sleep` client; the API
server calls the injection webhook, so the pods come back with `istio-init` and `istio-proxy`.

The tests' kubelet (`Containers` in `tests/k8s/meshpods.py`, on top of `tests/k8s/pods.py`) then runs each pod as a
container runtime would: a network namespace on the bridge, the init container's command
(`meshctl redirect`) as root, then every container in a private mount namespace with its
volumeMounts where the pod spec says (projected service-account tokens from `kubectl create
token` with the volume's audience, bound to the pod; ConfigMaps such as `istio-ca-root-cert`,
which the control plane publishes, read from the API server; downward-API files; emptyDirs),
its environment resolved (fieldRefs) and as its securityContext's UID (`istio-proxy` 1337, the
apps 1000). The pod is reported Ready once every readiness probe answers 200, so the EndpointSlice
controller publishes it.

Checked: a plain `curl` in the client pod to `reviews.<ns>.svc.cluster.local:9080` (resolved to
the Service's clusterIP: there is no cluster DNS) is captured, crosses both sidecars over mutual
TLS (the server app sees the client's SPIFFE id in x-forwarded-client-cert) and reaches v1 and v2;
a kubectl-applied DestinationRule + VirtualService sends every answer to v1, then every answer to
v2; an invalid VirtualService is refused by `kubectl apply` with its field path; a pod in an
unlabeled namespace is not injected; `meshctl proxy-status` shows every sidecar SYNCED; scaling
reviews-v2 to 0 takes its endpoint out of the client's EDS. Everything made here (processes,
network namespaces, links, iptables rules inside them, Kubernetes objects, files) goes at the
end, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections import Counter

import pytest

from tests.k8s.cluster import KubeCluster
from tests.k8s.meshpods import MESH_WIDE_VARIABLE, PORT, canary, manifests, run_pods, started_mesh, until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_canary_in_injected_pods(kube_cluster: KubeCluster) -> None:
    if os.geteuid() != 0:
        pytest.fail("pods as network namespaces need root (ip netns, veth, bridge, iptables, mount)")
    cluster = kube_cluster
    with contextlib.ExitStack() as stack:
        world, names = started_mesh(cluster, stack)
        ns, plain_ns, proc, containers = world.ns, names.plain, world.control_plane, world.containers

        # The user's workloads; the API server calls the injector for the enrolled namespace only.
        applied = world.apply(manifests(ns))
        assert applied.returncode == 0, applied.stderr
        plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain", "labels": {"app": "plain"}},
                 "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}}
        created = json.loads(cluster.kubectl("-n", plain_ns, "create", "-o", "json", "-f", "-",
                                             stdin=json.dumps(plain)).stdout)
        assert [c["name"] for c in created["spec"]["containers"]] == ["app"]
        assert "initContainers" not in created["spec"]
        run_pods(world)

        # The sidecars' environment: the mesh config's defaultConfig.proxyMetadata for every pod,
        # and the annotation's entries for reviews-v2's (merged per key, as Istio does).
        listed = json.loads(cluster.kubectl("-n", ns, "get", "pods", "-o", "json").stdout)["items"]
        environments = {p["metadata"]["name"].rsplit("-", 2)[0]: {
            e["name"]: e.get("value") for c in p["spec"]["containers"] if c["name"] == "istio-proxy"
            for e in c["env"]} for p in listed}
        assert sorted(environments) == ["reviews-v1", "reviews-v2", "sleep"], sorted(environments)
        assert all(e[MESH_WIDE_VARIABLE] == "applied" for e in environments.values()), environments
        assert environments["reviews-v2"]["ISTIO_DELTA_XDS"] == "false"
        assert "ISTIO_DELTA_XDS" not in environments["reviews-v1"]
        assert json.loads(environments["reviews-v2"]["PROXY_CONFIG"])["proxyMetadata"] == {
            MESH_WIDE_VARIABLE: "applied", "ISTIO_DELTA_XDS": "false"}

        # Captured plain HTTP crosses both sidecars over mutual TLS and reaches both versions.
        until("both reviews endpoints in the client's EDS", lambda: len(world.client_endpoints().get(
            f"outbound|{PORT}||{world.host}", set())) == 2, tail=world.tails)
        answers = world.requests(30)
        assert all(code == 200 for code, _ in answers), answers
        assert {a["version"] for _, a in answers} == {"v1", "v2"}
        client_id = f"spiffe://cluster.local/ns/{ns}/sa/sleep"
        assert all(f"URI={client_id}" in a["xfcc"] for _, a in answers), answers[0]
        assert all(a["peer"].startswith("127.") for _, a in answers)  # delivered by the server's sidecar

        # The canary: a kubectl-applied rule moves every request, then all of them back.
        for v1, expected in ((100, "v1"), (0, "v2")):
            result = world.apply(canary(ns, v1))
            assert result.returncode == 0, result.stderr
            until(f"every answer from {expected}", lambda e=expected: set(world.versions(10)) == {e},  # type: ignore[misc]
                  tail=world.tails)
            assert world.versions(40) == Counter({expected: 40})

        # An invalid VirtualService is refused by the validation webhook, naming its field.
        bad = canary(ns, 100)[1]
        bad["metadata"]["name"] = "reviews-bad"
        bad["spec"]["http"][0]["timeout"] = "abc"
        refused = world.apply([bad])
        assert refused.returncode != 0
        assert f"VirtualService {ns}/reviews-bad: spec.http[0].timeout:" in refused.stderr, refused.stderr
        assert cluster.kubectl("-n", ns, "get", "virtualservice", "reviews-bad", check=False).returncode != 0

        # Every sidecar SYNCED in `meshctl proxy-status`.
        pods = sorted(world.containers.pods.values(), key=lambda p: p.name)

        def all_synced() -> bool:
            lines = world.proxy_status().splitlines()
            rows = [next((line for line in lines if f"~{p.name}.{ns}~" in line), "") for p in pods]
            return all(row.split().count("SYNCED") == 4 for row in rows)

        until("every sidecar SYNCED in proxy-status", all_synced, tail=world.proxy_status)
        # The pod annotated with proxyMetadata ISTIO_DELTA_XDS "false" speaks state of the world.
        with urllib.request.urlopen(f"http://{world.debug}/debug/syncz", timeout=10) as resp:
            protocols = {row["proxy"].split("~")[2].split(".")[0]: row["protocol"] for row in json.load(resp)}
        assert {name.rsplit("-", 2)[0]: proto for name, proto in protocols.items()} == {
            "reviews-v1": "delta", "reviews-v2": "sotw", "sleep": "delta"}, protocols

        # Scaling reviews-v2 to 0: its endpoint leaves the client's EDS.
        v2 = next(p for p in pods if p.name.startswith("reviews-v2-"))
        cluster.kubectl("-n", ns, "scale", "deployment", "reviews-v2", "--replicas=0")
        until("the v2 pod deleted", lambda: cluster.kubectl("-n", ns, "get", "pod", v2.name,
                                                             check=False).returncode != 0)
        containers.stop(v2)
        v1_ips = {p.sandbox.ip for p in pods if p.name.startswith("reviews-v1-")}
        until("v2 out of the client's EDS", lambda: world.client_endpoints().get(
            f"outbound|{PORT}||{world.host}") == v1_ips, tail=world.tails)
        endpoints = world.client_endpoints()
        assert endpoints[f"outbound|{PORT}|v1|{world.host}"] == v1_ips
        assert not endpoints.get(f"outbound|{PORT}|v2|{world.host}")

        # The control plane stops cleanly on SIGTERM (webhooks, watches and tasks included).
        proc.terminate()
        assert proc.wait(timeout=30) == 0, world.tails()
