"""`meshctl install`'s renderer (meshctl/render.py), its CLI edges and the caBundle patch.

`manifests/istiod.yaml` is the committed default render (namespace + control plane; the CRDs
are `manifests/crds.yaml`); regenerate both with `pytest --update-goldens`. The same objects
applied to a real API server: tests/k8s/test_install.py.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from meshctl.cabundle import ca_bundle_patch
from meshctl.cli import cli
from meshctl.install import uninstall_order
from meshctl.kubeapply import RESOURCES, object_path
from meshctl.localmesh import free_port
from meshctl.render import InstallOptions, control_plane, namespace, render, rules, to_yaml
from pilot.kube.meshconfig import CONFIGMAP_KEY, CONFIGMAP_NAME, parse_mesh_config
from tests.unit.kubeconfigs import token_kubeconfig

ROOT = Path(__file__).resolve().parents[2]
ISTIOD_YAML = ROOT / "manifests" / "istiod.yaml"
CUSTOM = InstallOptions(namespace="mesh-a", image="reg.example/cp:1", proxy_image="reg.example/proxy:1",
                        trust_domain="example.org", replicas=3)


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def test_istiod_yaml_is_the_current_render(update_goldens: bool) -> None:
    options = InstallOptions()
    text = to_yaml([namespace(options), *control_plane(options)])
    if update_goldens:
        ISTIOD_YAML.write_text(text)
    assert ISTIOD_YAML.read_text() == text, "manifests/istiod.yaml is stale: run pytest --update-goldens"


def test_render_is_deterministic_and_every_kind_has_a_path() -> None:
    assert to_yaml(render(CUSTOM)) == to_yaml(render(CUSTOM))
    for obj in render(CUSTOM):
        assert (obj["apiVersion"], obj["kind"]) in RESOURCES
        assert object_path(obj).endswith("/" + obj["metadata"]["name"])


def test_options_reach_every_object() -> None:
    objects = render(CUSTOM)
    for obj in objects:
        scoped = RESOURCES[(obj["apiVersion"], obj["kind"])][1]
        assert obj["metadata"].get("namespace") == ("mesh-a" if scoped else None), obj["kind"]
    kinds = _by_kind(objects)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert kinds["Deployment"]["spec"]["replicas"] == 3
    assert container["image"] == "reg.example/cp:1"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MESHCTL_INJECT_PROXY_IMAGE"] == "reg.example/proxy:1"
    assert env["MESHCTL_INJECT_DISCOVERY_ADDRESS"] == "istiod.mesh-a.svc:15012"
    assert "--trust-domain=example.org" in container["args"]
    mesh = yaml.safe_load(kinds["ConfigMap"]["data"]["mesh"])
    assert mesh["trustDomain"] == "example.org" and mesh["rootNamespace"] == "mesh-a"
    assert mesh["discoverySelectors"] == []
    assert kinds["ClusterRoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "istiod", "namespace": "mesh-a"}]
    assert kinds["ValidatingWebhookConfiguration"]["metadata"]["name"] == "istio-validator-mesh-a"
    for hook in kinds["MutatingWebhookConfiguration"]["webhooks"]:
        assert hook["clientConfig"]["service"] == {"name": "istiod", "namespace": "mesh-a", "path": "/inject",
                                                   "port": 443}
        assert "caBundle" not in hook["clientConfig"]  # istiod patches it; re-install must not wipe it


def test_pilot_reads_the_rendered_mesh_config() -> None:
    kinds = _by_kind(render(CUSTOM))
    config = kinds["ConfigMap"]
    assert (config["metadata"]["name"], list(config["data"])) == (CONFIGMAP_NAME, [CONFIGMAP_KEY])
    mesh = parse_mesh_config(config["data"][CONFIGMAP_KEY])
    assert (mesh.trust_domain, mesh.root_namespace, mesh.discovery_selectors) == ("example.org", "mesh-a", ())
    args = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--mesh-namespace=mesh-a" in args  # where pilot looks for that ConfigMap


def test_control_plane_shape() -> None:
    kinds = _by_kind(render(InstallOptions()))
    pod = kinds["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert sorted(p["containerPort"] for p in container["ports"]) == [15010, 15012, 15014, 15017]
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 15014}
    assert container["livenessProbe"]["httpGet"] == {"path": "/ready", "port": 15014}
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["requests"]
    assert pod["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    ports = {p["port"]: p["targetPort"] for p in kinds["Service"]["spec"]["ports"]}
    assert ports == {15010: 15010, 15012: 15012, 15014: 15014, 443: 15017}
    hooks = {h["name"]: h for h in kinds["MutatingWebhookConfiguration"]["webhooks"]}
    enrolled = hooks["namespace.sidecar-injector.istio.io"]
    assert enrolled["namespaceSelector"]["matchExpressions"] == [
        {"key": "istio-injection", "operator": "In", "values": ["enabled"]}]
    assert enrolled["objectSelector"]["matchExpressions"] == [
        {"key": "sidecar.istio.io/inject", "operator": "NotIn", "values": ["false"]}]
    assert hooks["rev.namespace.sidecar-injector.istio.io"]["namespaceSelector"]["matchExpressions"][0]["key"] == (
        "istio.io/rev")
    validator = kinds["ValidatingWebhookConfiguration"]["webhooks"][0]
    assert validator["clientConfig"]["service"]["path"] == "/validate"
    assert validator["rules"][0]["apiGroups"] == ["networking.istio.io", "security.istio.io"]
    assert kinds["PodDisruptionBudget"]["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]


def test_rbac_has_no_wildcards_no_deletes_and_writes_only_its_own() -> None:
    for rule in rules(InstallOptions()):
        assert "*" not in rule.verbs and "*" not in rule.resources and "*" not in rule.api_groups
        assert "delete" not in rule.verbs and "deletecollection" not in rule.verbs
        writes = set(rule.verbs) - {"get", "list", "watch"}
        if writes and not rule.namespaced:
            # cluster-wide writes: status subresources, Token/SubjectAccessReviews (questions to the API
            # server, nothing stored), root-cert ConfigMaps, own webhooks
            assert (all(r.endswith("/status") for r in rule.resources) or rule.resources in (
                ("tokenreviews",), ("subjectaccessreviews",), ("configmaps",)) or rule.resource_names), rule
        assert rule.why


def test_dry_run_prints_exactly_the_render() -> None:
    result = CliRunner().invoke(cli, [
        "install", "--dry-run", "-n", "mesh-a", "--image", "reg.example/cp:1", "--proxy-image",
        "reg.example/proxy:1", "--trust-domain", "example.org", "--replicas", "3"])
    assert result.exit_code == 0, result.output
    assert result.output == to_yaml(render(CUSTOM))
    assert len(list(yaml.safe_load_all(result.output))) == len(render(CUSTOM))


@pytest.mark.parametrize(("args", "message"), [
    (["-n", "Istio_System"], "'Istio_System' is not a namespace name"),
    (["--trust-domain", "a b"], "'a b' is not a trust domain"),
    (["--replicas", "0"], "0 is not in the range x>=1"),
])
def test_bad_options_exit_2_naming_the_option(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["install", "--dry-run", *args])
    assert result.exit_code == 2
    assert message in result.output


def test_unreachable_cluster_is_one_line_and_exit_1(tmp_path: Path) -> None:
    kubeconfig = token_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{free_port()}")
    for command in (["install"], ["uninstall"]):
        result = CliRunner().invoke(cli, [*command, "--kubeconfig", str(kubeconfig)])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert lines[-1].startswith("Error: ") and "cannot reach the API server" in lines[-1]


def test_missing_kubeconfig_names_the_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["install", "--kubeconfig", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert f"kubeconfig {tmp_path / 'nope'}" in result.output


def test_uninstall_removes_webhooks_first_and_keeps_crds_unless_purge() -> None:
    options = InstallOptions()
    plain = [o["kind"] for o in uninstall_order(options, purge=False)]
    assert plain[:2] == ["ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"]
    assert "CustomResourceDefinition" not in plain and "Namespace" not in plain
    assert len(plain) == len(control_plane(options))
    purge = [o["kind"] for o in uninstall_order(options, purge=True)]
    assert purge.count("CustomResourceDefinition") == 9 and purge[-1] == "Namespace"


def test_ca_bundle_patch_sets_each_differing_webhook_guarded_by_its_name() -> None:
    pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    bundle = base64.b64encode(pem).decode()
    config: dict[str, Any] = {"webhooks": [{"name": "a", "clientConfig": {"caBundle": bundle}},
                           {"name": "b", "clientConfig": {"service": {"name": "istiod"}}}]}
    assert ca_bundle_patch(config, pem) == [
        {"op": "test", "path": "/webhooks/1/name", "value": "b"},
        {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": bundle}]
    config["webhooks"][1]["clientConfig"]["caBundle"] = bundle
    assert ca_bundle_patch(config, pem) == []
