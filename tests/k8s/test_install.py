"""manifests/ and `meshctl install` against a real API server (tests/k8s/cluster.py).

The CRDs from manifests/crds.yaml install and become Established; every example (and golden
case) is accepted by the API server's own schema validation in every served version, and a
wrongly typed field is refused with its path. `meshctl install` (the real command, in a
subprocess) creates every rendered object, the Deployment gets its ReplicaSet from
kube-controller-manager, a second run changes nothing, `meshctl uninstall` removes them. The
rendered RBAC is checked as the API server applies it: with the istiod ServiceAccount's own token
the calls istiod makes succeed and others are forbidden.

The CRDs are cluster-scoped and shared by the session: tests here leave them installed
(the purge test re-applies them), everything else lives in random namespaces removed at the end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshctl.cabundle import patch_ca_bundles
from meshctl.crds import crds, served_kinds
from meshctl.kubeapply import KubeApiError
from meshctl.render import InstallOptions, control_plane
from pilot.kube.client import client_from_kubeconfig
from tests.k8s.cluster import KubeCluster, kubectl_path
from tests.unit.test_crd_schema import example_documents

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CRDS_YAML = ROOT / "manifests" / "crds.yaml"


def _until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def meshctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "meshctl.cli", *args], capture_output=True, text=True,
                          timeout=180, check=False, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def install_crds(cluster: KubeCluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS_YAML))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    *[f"crd/{c['metadata']['name']}" for c in crds()])


@pytest.fixture
def namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    with kube_cluster.scratch_namespace("inst") as ns:
        yield ns


def test_crds_install_and_become_established(kube_cluster: KubeCluster) -> None:
    install_crds(kube_cluster)
    got = json.loads(kube_cluster.kubectl("get", "crd", "-l", "app.kubernetes.io/part-of=meshctl",
                                          "-o", "json").stdout)
    names = {c["metadata"]["name"]: c for c in got["items"]}
    assert set(names) == {c["metadata"]["name"] for c in crds()}
    for crd in names.values():
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True"
        assert conditions["NamesAccepted"] == "True"
        assert conditions.get("NonStructuralSchema") is None  # the API server found every schema structural
    # Istio's short names and categories are served: `kubectl get istio-io` lists the mesh kinds.
    resources = kube_cluster.kubectl("api-resources", "--categories=istio-io", "-o", "name").stdout.split()
    assert len(resources) == len(crds())


def test_every_example_is_accepted_in_every_served_version(kube_cluster: KubeCluster, namespace: str) -> None:
    install_crds(kube_cluster)
    versions = {group: vs for group, _kind, vs, _model in served_kinds()}
    docs = example_documents()
    for version in ("v1", "v1beta1", "v1alpha3"):
        stream = []
        for _where, doc in docs:
            group = doc["apiVersion"].split("/")[0]
            if version in versions[group]:
                copy = {**doc, "apiVersion": f"{group}/{version}",
                        "metadata": {**doc["metadata"], "namespace": namespace}}
                stream.append(copy)
        # Strict field validation (kubectl's default): an example field the schema lacks fails too.
        out = kube_cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-",
                                   stdin=yaml.safe_dump_all(stream), check=False)
        assert out.returncode == 0, f"{version}: {out.stderr}"
        assert out.stdout.count("(server dry run)") == len(stream)


def test_a_wrongly_typed_field_is_refused_with_its_path(kube_cluster: KubeCluster, namespace: str) -> None:
    install_crds(kube_cluster)
    vs = {"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
          "metadata": {"name": "bad", "namespace": namespace},
          "spec": {"hosts": "reviews", "http": [{"route": [{"destination": {"host": "reviews"}, "weight": "x"}]}]}}
    out = kube_cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(vs), check=False)
    assert out.returncode != 0
    assert 'spec.hosts: Invalid value: "string": spec.hosts in body must be of type array' in out.stderr
    assert "spec.http[0].route[0].weight in body must be of type integer" in out.stderr
    pa = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
          "metadata": {"name": "bad", "namespace": namespace}, "spec": {"mtls": {"mode": "SOMETIMES"}}}
    out = kube_cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(pa), check=False)
    assert out.returncode != 0 and "spec.mtls.mode: Unsupported value: \"SOMETIMES\"" in out.stderr


def test_objects_written_as_v1alpha3_read_back_as_v1(kube_cluster: KubeCluster, namespace: str) -> None:
    install_crds(kube_cluster)
    dr = {"apiVersion": "networking.istio.io/v1alpha3", "kind": "DestinationRule",
          "metadata": {"name": "reviews", "namespace": namespace},
          "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}],
                   "unknownField": 1}}
    kube_cluster.kubectl("apply", "--validate=false", "-f", "-", stdin=yaml.safe_dump(dr))
    got = json.loads(kube_cluster.kubectl("-n", namespace, "get", "destinationrules.v1.networking.istio.io",
                                          "reviews", "-o", "json").stdout)
    assert got["apiVersion"] == "networking.istio.io/v1"
    assert got["spec"] == {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}  # pruned
    table = kube_cluster.kubectl("-n", namespace, "get", "dr").stdout
    assert table.split()[:3] == ["NAME", "HOST", "AGE"] and "reviews" in table


def _get(cluster: KubeCluster, obj: dict[str, Any]) -> dict[str, Any] | None:
    kind = obj["kind"].lower()
    resource = {"clusterrole": "clusterroles.rbac.authorization.k8s.io",
                "clusterrolebinding": "clusterrolebindings.rbac.authorization.k8s.io",
                "role": "roles.rbac.authorization.k8s.io",
                "rolebinding": "rolebindings.rbac.authorization.k8s.io"}.get(kind, kind)
    args = ["get", resource, obj["metadata"]["name"], "-o", "json"]
    if "namespace" in obj["metadata"]:
        args += ["-n", obj["metadata"]["namespace"]]
    out = cluster.kubectl(*args, check=False)
    if out.returncode != 0:
        assert "NotFound" in out.stderr, out.stderr
        return None
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def _version(obj: dict[str, Any]) -> str:
    """What changes when the object's spec is written: `generation` where controllers write status
    (Deployment, PodDisruptionBudget, webhooks), the resourceVersion for the rest."""
    meta = obj["metadata"]
    return f"generation {meta['generation']}" if "generation" in meta else meta["resourceVersion"]


@pytest.fixture
def installed(kube_cluster: KubeCluster) -> Iterator[InstallOptions]:
    """`meshctl install` into a fresh namespace; uninstalled (and the namespace deleted) at the end."""
    options = InstallOptions(namespace=f"mesh-{secrets.token_hex(4)}", trust_domain="example.org")
    kubeconfig = str(kube_cluster.kubeconfig)
    try:
        meshctl("install", "--kubeconfig", kubeconfig, "-n", options.namespace, "--trust-domain", "example.org")
        yield options
    finally:
        meshctl("uninstall", "--kubeconfig", kubeconfig, "-n", options.namespace, check=False)
        kube_cluster.kubectl("delete", "namespace", options.namespace, "--wait=false", check=False)


@pytest.mark.timeout(300)
def test_install_is_complete_idempotent_and_uninstall_removes_it(
        kube_cluster: KubeCluster, installed: InstallOptions) -> None:
    ns, kubeconfig = installed.namespace, str(kube_cluster.kubeconfig)
    stored = {}
    for obj in control_plane(installed):
        got = _get(kube_cluster, obj)
        assert got is not None, f"{obj['kind']} {obj['metadata']['name']} missing after install"
        stored[(obj["kind"], obj["metadata"]["name"])] = _version(got)
    # The Deployment was accepted as valid and kube-controller-manager acted on it.
    _until("istiod's ReplicaSet", lambda: json.loads(kube_cluster.kubectl(
        "-n", ns, "get", "replicasets", "-l", "app=istiod", "-o", "json").stdout)["items"] != [])
    config = _get(kube_cluster, {"kind": "ConfigMap", "metadata": {"name": "istio", "namespace": ns}})
    assert config is not None
    mesh = yaml.safe_load(config["data"]["mesh"])
    assert mesh["trustDomain"] == "example.org" and mesh["rootNamespace"] == ns

    second = meshctl("install", "--kubeconfig", kubeconfig, "-n", ns, "--trust-domain", "example.org")
    assert "istio-system" not in second.stdout and f"Deployment {ns}/istiod applied" in second.stdout
    for obj in control_plane(installed):
        got = _get(kube_cluster, obj)
        assert got is not None
        key = (obj["kind"], obj["metadata"]["name"])
        assert _version(got) == stored[key], f"{key} rewritten by an identical install"

    out = meshctl("uninstall", "--kubeconfig", kubeconfig, "-n", ns)
    assert out.stdout.splitlines()[0] == f"ValidatingWebhookConfiguration istio-validator-{ns} deleted"
    for obj in control_plane(installed):
        def gone(o: dict[str, Any] = obj) -> bool:
            return _get(kube_cluster, o) is None

        _until(f"{obj['kind']} {obj['metadata']['name']} gone", gone)
    assert _get(kube_cluster, crds()[0]) is not None  # CRDs (and users' mesh config) stay without --purge
    again = meshctl("uninstall", "--kubeconfig", kubeconfig, "-n", ns)
    assert "not found" in again.stdout  # nothing left: still exit 0


def test_install_into_a_cluster_that_refuses_names_the_object(kube_cluster: KubeCluster, tmp_path: Path) -> None:
    # A token the API server does not know: the first object is refused, one line, exit 1.
    config = yaml.safe_load(kube_cluster.kubeconfig.read_text())
    config["users"][0]["user"]["token"] = "not-a-token"
    bad = tmp_path / "kubeconfig"
    bad.write_text(yaml.safe_dump(config))
    out = meshctl("install", "--kubeconfig", str(bad), check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["Error: Namespace istio-system: Unauthorized"]


def _sa_kubeconfig(cluster: KubeCluster, namespace: str, path: Path) -> Path:
    token = cluster.kubectl("-n", namespace, "create", "token", "istiod").stdout.strip()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "c", "cluster": {"server": cluster.server,
                                               "certificate-authority": str(cluster.ca_file)}}],
        "users": [{"name": "istiod", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "c", "user": "istiod"}}]}))
    return path


# (verb, resource, namespace or "" for all/cluster, expected)
CAN_I = [
    ("list", "virtualservices.networking.istio.io", "", True),
    ("watch", "authorizationpolicies.security.istio.io", "", True),
    ("patch", "virtualservices.networking.istio.io/status", "", True),
    ("list", "endpointslices.discovery.k8s.io", "", True),
    ("watch", "pods", "", True),
    ("create", "tokenreviews.authentication.k8s.io", "", True),
    ("create", "subjectaccessreviews.authorization.k8s.io", "", True),  # gateway secrets: may it list them?
    ("update", "leases.coordination.k8s.io", "@own", True),
    ("create", "secrets", "@own", True),
    ("delete", "pods", "", False),
    ("create", "pods", "default", False),
    ("update", "virtualservices.networking.istio.io", "", False),  # spec belongs to users: status only
    ("delete", "virtualservices.networking.istio.io", "default", False),
    ("create", "secrets", "default", False),
    ("update", "secrets", "kube-system", False),
    ("update", "leases.coordination.k8s.io", "kube-system", False),
    ("patch", "deployments.apps", "@own", False),
    ("list", "nodes", "", False),
    ("patch", "mutatingwebhookconfigurations.admissionregistration.k8s.io", "", False),  # only its own, by name
    ("escalate", "clusterroles.rbac.authorization.k8s.io", "", False),
]


def test_rbac_is_least_privilege(kube_cluster: KubeCluster, installed: InstallOptions) -> None:
    ns = installed.namespace
    user = f"system:serviceaccount:{ns}:istiod"
    for verb, target, where, expected in CAN_I:
        scope = ["-n", ns] if where == "@own" else (["-n", where] if where else ["--all-namespaces"])
        resource, _, sub = target.partition("/")
        scope += [f"--subresource={sub}"] if sub else []
        out = kube_cluster.kubectl("auth", "can-i", verb, resource, *scope, f"--as={user}", check=False)
        assert out.stdout.strip() == ("yes" if expected else "no"), f"can-i {verb} {resource}/{sub} {where}"
    for name in ("istio-sidecar-injector", f"istio-validator-{ns}"):
        kind = ("mutating" if name == "istio-sidecar-injector" else "validating") + "webhookconfigurations"
        out = kube_cluster.kubectl("auth", "can-i", "patch", f"{kind}.admissionregistration.k8s.io/{name}",
                                   f"--as={user}", check=False)
        assert out.stdout.strip() == "yes", name


def test_service_account_token_calls_as_istiod_does(
        kube_cluster: KubeCluster, installed: InstallOptions, tmp_path: Path) -> None:
    """The rendered ServiceAccount's real token: allowed calls answer, others are 403 Forbidden."""
    config = _sa_kubeconfig(kube_cluster, installed.namespace, tmp_path / "istiod.kubeconfig")

    def as_istiod(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(kubectl_path()), "--kubeconfig", str(config), *args], input=stdin,
                              capture_output=True, text=True, timeout=60, check=False)

    assert as_istiod("get", "virtualservices", "-A").returncode == 0
    assert as_istiod("get", "endpointslices", "-A").returncode == 0
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
              "spec": {"token": "garbage", "audiences": ["istio-ca"]}}
    created = as_istiod("create", "--validate=false", "-f", "-", "-o", "json", stdin=json.dumps(review))
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["status"].get("authenticated") is not True
    for denied in (("delete", "pod", "any-pod", "-n", "default"),
                   ("create", "secret", "generic", "x", "-n", "default", "--from-literal=a=b"),
                   ("get", "nodes")):
        out = as_istiod(*denied)
        assert out.returncode != 0 and "forbidden" in out.stderr.lower(), denied


def test_ca_bundle_patch_with_istiod_token(
        kube_cluster: KubeCluster, installed: InstallOptions, tmp_path: Path) -> None:
    """`meshctl.cabundle` as istiod runs it: its own token patches its two configurations, no others."""
    ns = installed.namespace
    config = _sa_kubeconfig(kube_cluster, ns, tmp_path / "istiod.kubeconfig")
    pem = kube_cluster.ca_file.read_bytes()  # any PEM will do: the API server stores it as given
    validator = f"istio-validator-{ns}"

    async def patch(kubeconfig: Path, validating: list[str]) -> list[tuple[str, int, bool]]:
        api = await client_from_kubeconfig(kubeconfig)
        try:
            results = await patch_ca_bundles(api, pem, mutating=["istio-sidecar-injector"], validating=validating)
            return [(r.name, r.patched, r.found) for r in results]
        finally:
            await api.close()

    assert asyncio.run(patch(config, [validator])) == [("istio-sidecar-injector", 3, True), (validator, 1, True)]
    bundle = base64.b64encode(pem).decode()
    got = _get(kube_cluster, {"kind": "ValidatingWebhookConfiguration", "metadata": {"name": validator}})
    assert got is not None and got["webhooks"][0]["clientConfig"]["caBundle"] == bundle
    assert asyncio.run(patch(config, [validator])) == [("istio-sidecar-injector", 0, True), (validator, 0, True)]
    with pytest.raises(KubeApiError, match=r"ValidatingWebhookConfiguration istio-validator-other: .*forbidden"):
        asyncio.run(patch(config, ["istio-validator-other"]))  # another configuration: not istiod's to touch
    absent = asyncio.run(patch(kube_cluster.kubeconfig, [f"istio-validator-absent-{ns}"]))
    assert absent[1] == (f"istio-validator-absent-{ns}", 0, False)
    # A second install keeps the patched bundle: the applied objects never owned the field.
    meshctl("install", "--kubeconfig", str(kube_cluster.kubeconfig), "-n", ns, "--trust-domain", "example.org")
    got = _get(kube_cluster, {"kind": "ValidatingWebhookConfiguration", "metadata": {"name": validator}})
    assert got is not None and got["webhooks"][0]["clientConfig"]["caBundle"] == bundle


@pytest.mark.timeout(300)
def test_uninstall_purge_removes_crds_and_namespace(kube_cluster: KubeCluster) -> None:
    ns = f"mesh-{secrets.token_hex(4)}"
    kubeconfig = str(kube_cluster.kubeconfig)
    try:
        meshctl("install", "--kubeconfig", kubeconfig, "-n", ns)
        out = meshctl("uninstall", "--purge", "--kubeconfig", kubeconfig, "-n", ns)
        assert out.stdout.splitlines()[-1] == f"Namespace {ns} deleted"
        _until("the mesh CRDs gone", lambda: all(_get(kube_cluster, c) is None for c in crds()))
    finally:
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        install_crds(kube_cluster)  # the session's other tests expect them
