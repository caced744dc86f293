"""The injector's pure core: the enrolment decision, the injected pod, probes, patches, validation,
and `meshctl kube-inject` errors. The full injected pod is covered by tests/golden/inject."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from injector.containers import INIT_CONTAINER, PROXY_CONTAINER
from injector.inject import ENROLLED, InjectionError, decide, inject, workload_name
from injector.patch import pod_patch
from injector.settings import InjectSettings
from injector.validate import review_object
from meshctl.cli import cli
from pilot.config.yaml_text import load_text

SETTINGS = InjectSettings(proxy_image="meshctl/proxy:test")


def make_pod(*, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
             namespace: str = "shop", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": namespace, "labels": labels or {"app": "web"},
                     "annotations": annotations or {}},
        "spec": {"containers": [{"name": "web", "image": "example/web:1",
                                 "ports": [{"name": "http", "containerPort": 8080}]}], **spec},
    }


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod["spec"]
    found: list[dict[str, Any]] = [
        c for c in spec.get("containers", []) + spec.get("initContainers", []) if c["name"] == name]
    assert len(found) == 1, f"{name}: {len(found)} containers"
    return found[0]


def env(pod: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(pod, PROXY_CONTAINER)["env"]}


# ---- the decision ------------------------------------------------------------------------------

@pytest.mark.parametrize(("ns_labels", "pod_labels", "pod_notes", "expected"), [
    ({"istio-injection": "enabled"}, {}, {}, True),
    ({}, {}, {}, False),
    ({"istio-injection": "disabled"}, {"sidecar.istio.io/inject": "true"}, {}, False),
    ({"istio.io/rev": "default"}, {}, {}, True),
    ({"istio.io/rev": "canary"}, {}, {}, False),
    ({"istio.io/rev": "canary", "istio-injection": "enabled"}, {}, {}, True),  # istio-injection wins
    ({"istio-injection": "enabled"}, {"sidecar.istio.io/inject": "false"}, {}, False),
    ({"istio-injection": "enabled"}, {}, {"sidecar.istio.io/inject": "false"}, False),
    ({}, {"sidecar.istio.io/inject": "true"}, {}, True),  # a pod may opt in (Istio's object selector)
    ({"istio-injection": "enabled"}, {"sidecar.istio.io/inject": "true"}, {"sidecar.istio.io/inject": "false"}, True),
    ({"istio-injection": "enabled"}, {"sidecar.istio.io/inject": "false"}, {"sidecar.istio.io/inject": "true"}, False),
    ({"istio-injection": "enabled"}, {"sidecar.istio.io/inject": "maybe"}, {}, True),  # invalid: default
])
def test_decision(ns_labels: dict[str, str], pod_labels: dict[str, str], pod_notes: dict[str, str],
                  expected: bool) -> None:
    pod = make_pod(labels=pod_labels, annotations=pod_notes)
    decision = decide(pod, SETTINGS, ns_labels)
    assert decision.inject is expected, decision.reason
    assert (inject(pod, SETTINGS, ns_labels) != pod) is expected


def test_host_network_and_system_namespaces_are_never_injected() -> None:
    host = make_pod(labels={"sidecar.istio.io/inject": "true"}, hostNetwork=True)
    assert decide(host, SETTINGS, ENROLLED).reason.startswith("hostNetwork")
    assert inject(host, SETTINGS, ENROLLED) == host
    system = make_pod(namespace="kube-system")
    assert not decide(system, SETTINGS, ENROLLED).inject


def test_status_annotation_alone_marks_a_pod_injected() -> None:
    pod = make_pod(annotations={"sidecar.istio.io/status": "{}"})
    assert decide(pod, SETTINGS, ENROLLED).reason == "already injected"
    assert inject(pod, SETTINGS, ENROLLED) == pod


# ---- the injected pod --------------------------------------------------------------------------

def test_injection_adds_sidecar_init_volumes_and_leaves_the_input_alone() -> None:
    pod = make_pod()
    before = copy.deepcopy(pod)
    out = inject(pod, SETTINGS, ENROLLED)
    assert pod == before
    assert [c["name"] for c in out["spec"]["containers"]] == ["web", PROXY_CONTAINER]
    assert [c["name"] for c in out["spec"]["initContainers"]] == [INIT_CONTAINER]
    proxy = container(out, PROXY_CONTAINER)
    assert proxy["securityContext"]["runAsUser"] == 1337
    assert proxy["securityContext"]["runAsNonRoot"] is True
    assert proxy["securityContext"]["readOnlyRootFilesystem"] is True
    assert proxy["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    init = container(out, INIT_CONTAINER)
    assert init["command"] == ["meshctl", "redirect"]
    assert init["securityContext"]["runAsUser"] == 0
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    token = next(v for v in out["spec"]["volumes"] if v["name"] == "istio-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "istio-ca"
    assert {v["name"] for v in out["spec"]["volumes"]} >= {"workload-socket", "istio-token"}
    assert out["metadata"]["labels"]["security.istio.io/tlsMode"] == "istio"
    status = json.loads(out["metadata"]["annotations"]["sidecar.istio.io/status"])
    assert status["containers"] == [PROXY_CONTAINER] and status["initContainers"] == [INIT_CONTAINER]
    values = env(out)
    assert values["CA_ADDR"] == "istiod.istio-system.svc:15012"
    assert values["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert json.loads(values["PROXY_CONFIG"])["discoveryAddress"] == "istiod.istio-system.svc:15012"


def test_injecting_twice_is_a_no_op() -> None:
    once = inject(make_pod(), SETTINGS, ENROLLED)
    assert inject(once, SETTINGS, ENROLLED) == once
    assert pod_patch(once, inject(once, SETTINGS, ENROLLED)) == []


def test_settings_flow_into_the_pod() -> None:
    custom = InjectSettings(proxy_image="registry.example/proxy:9", proxy_uid=2000, proxy_gid=2001,
                            discovery_address="pilot.mesh.svc:15012", trust_domain="example.org")
    out = inject(make_pod(), custom, ENROLLED)
    proxy = container(out, PROXY_CONTAINER)
    assert proxy["image"] == "registry.example/proxy:9"
    assert proxy["securityContext"]["runAsUser"] == 2000
    assert container(out, INIT_CONTAINER)["command"] == ["meshctl", "redirect", "--proxy-uid", "2000",
                                                         "--proxy-gid", "2001"]
    assert env(out)["ISTIO_META_MESH_ID"] == "example.org"


def test_capture_annotations_become_redirect_flags() -> None:
    pod = make_pod(annotations={"traffic.sidecar.istio.io/excludeOutboundPorts": "5432",
                                "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.96.0.0/12"})
    command = container(inject(pod, SETTINGS, ENROLLED), INIT_CONTAINER)["command"]
    assert command == ["meshctl", "redirect", "--include-outbound-ip-ranges", "10.96.0.0/12",
                       "--exclude-outbound-ports", "5432"]


@pytest.mark.parametrize(("annotations", "words"), [
    ({"sidecar.istio.io/interceptionMode": "TPROXY"}, ["Pod shop/web", "interceptionMode", "TPROXY is not supported"]),
    ({"sidecar.istio.io/interceptionMode": "NONE"}, ["interceptionMode", "must be REDIRECT"]),
    ({"traffic.sidecar.istio.io/excludeInboundPorts": "80,http"}, ["Pod shop/web", "excludeInboundPorts", "'http'"]),
    ({"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/33"}, ["includeOutboundIPRanges", "CIDR"]),
    ({"status.sidecar.istio.io/port": "99999"}, ["status.sidecar.istio.io/port", "not a port"]),
    ({"proxy.istio.io/config": "[1]"}, ["Pod shop/web", "proxy.istio.io/config", "must be a ProxyConfig object"]),
    ({"proxy.istio.io/config": "proxyMetadata: {ISTIO_DELTA_XDS: false}"},
     ["proxy.istio.io/config", "proxyMetadata.ISTIO_DELTA_XDS", 'quote it: ISTIO_DELTA_XDS: "false"']),
    ({"proxy.istio.io/config": "proxyMetadata: [a]"}, ["proxyMetadata must be a map"]),
    ({"proxy.istio.io/config": "{"}, ["proxy.istio.io/config", "not YAML or JSON"]),
])
def test_bad_annotations_refuse_the_pod_naming_the_annotation(annotations: dict[str, str], words: list[str]) -> None:
    with pytest.raises(InjectionError) as err:
        inject(make_pod(annotations=annotations), SETTINGS, ENROLLED)
    for word in words:
        assert word in str(err.value)


def test_proxy_metadata_of_the_proxy_config_annotation_becomes_the_sidecars_environment() -> None:
    config = 'proxyMetadata:\n  ISTIO_DELTA_XDS: "false"\n  CA_ADDR: ca.example:15012\nconcurrency: 2\n'
    out = inject(make_pod(annotations={"proxy.istio.io/config": config}), SETTINGS, ENROLLED)
    variables = container(out, PROXY_CONTAINER)["env"]
    names = [e["name"] for e in variables]
    assert len(names) == len(set(names))  # proxyMetadata replaces a variable of the same name
    assert env(out)["ISTIO_DELTA_XDS"] == "false"
    assert env(out)["CA_ADDR"] == "ca.example:15012"
    assert json.loads(env(out)["PROXY_CONFIG"])["proxyMetadata"] == {"ISTIO_DELTA_XDS": "false",
                                                                     "CA_ADDR": "ca.example:15012"}
    plain = inject(make_pod(), SETTINGS, ENROLLED)
    assert "ISTIO_DELTA_XDS" not in env(plain) and "proxyMetadata" not in json.loads(env(plain)["PROXY_CONFIG"])


def test_a_volume_name_the_sidecar_needs_is_refused() -> None:
    pod = make_pod(volumes=[{"name": "istio-envoy", "emptyDir": {}}])
    with pytest.raises(InjectionError, match=r"spec\.volumes: istio-envoy already defined"):
        inject(pod, SETTINGS, ENROLLED)


def test_workload_name_from_the_replica_set_owner() -> None:
    pod = make_pod(labels={"pod-template-hash": "5f9c8"})
    pod["metadata"].pop("name")
    pod["metadata"]["generateName"] = "web-5f9c8-"
    pod["metadata"]["ownerReferences"] = [{"kind": "ReplicaSet", "name": "web-5f9c8", "controller": True}]
    assert workload_name(pod) == "web"
    assert env(inject(pod, SETTINGS, ENROLLED))["ISTIO_META_WORKLOAD_NAME"] == "web"


# ---- probes ------------------------------------------------------------------------------------

def test_probes_are_rewritten_through_the_agent_with_the_original_in_the_env() -> None:
    pod = make_pod()
    web = pod["spec"]["containers"][0]
    web["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "http", "scheme": "HTTPS"}, "timeoutSeconds": 4}
    web["livenessProbe"] = {"tcpSocket": {"port": 8080}, "periodSeconds": 7}
    web["startupProbe"] = {"grpc": {"port": 8080, "service": "health"}}
    out = inject(pod, SETTINGS, ENROLLED)
    got = container(out, "web")
    assert got["readinessProbe"] == {"httpGet": {"path": "/app-health/web/readyz", "port": 15020, "scheme": "HTTP"},
                                     "timeoutSeconds": 4}
    assert got["livenessProbe"] == {"httpGet": {"path": "/app-health/web/livez", "port": 15020, "scheme": "HTTP"},
                                    "periodSeconds": 7}
    assert got["startupProbe"]["httpGet"]["path"] == "/app-health/web/startupz"
    assert "grpc" not in got["startupProbe"]
    assert json.loads(env(out)["ISTIO_KUBE_APP_PROBERS"]) == {
        "/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTPS"}, "timeoutSeconds": 4},
        "/app-health/web/livez": {"tcpSocket": {"port": 8080}},
        "/app-health/web/startupz": {"grpc": {"port": 8080, "service": "health"}},
    }


def test_probes_left_alone_when_disabled_uncaptured_or_unresolvable() -> None:
    probe = {"httpGet": {"path": "/ready", "port": 8080}}
    for notes in ({"sidecar.istio.io/rewriteAppHTTPProbers": "false"},
                  {"traffic.sidecar.istio.io/excludeInboundPorts": "8080"},
                  {"traffic.sidecar.istio.io/includeInboundPorts": "9090"}):
        pod = make_pod(annotations=notes)
        pod["spec"]["containers"][0]["readinessProbe"] = probe
        out = inject(pod, SETTINGS, ENROLLED)
        assert container(out, "web")["readinessProbe"] == probe, notes
        assert "ISTIO_KUBE_APP_PROBERS" not in env(out)
    pod = make_pod()
    pod["spec"]["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/", "port": "no-such-port"}}
    assert container(inject(pod, SETTINGS, ENROLLED), "web")["readinessProbe"]["httpGet"]["port"] == "no-such-port"


def test_rewrite_can_be_turned_off_in_settings_and_back_on_by_annotation() -> None:
    off = InjectSettings(rewrite_app_probes=False)
    pod = make_pod()
    pod["spec"]["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/", "port": 8080}}
    assert container(inject(pod, off, ENROLLED), "web")["readinessProbe"]["httpGet"]["port"] == 8080
    pod["metadata"]["annotations"]["sidecar.istio.io/rewriteAppHTTPProbers"] = "true"
    assert container(inject(pod, off, ENROLLED), "web")["readinessProbe"]["httpGet"]["port"] == 15020


# ---- the patch ---------------------------------------------------------------------------------

def test_patch_applied_to_the_pod_gives_the_injected_pod() -> None:
    pod = make_pod()
    del pod["metadata"]["annotations"]  # the patch must create the map
    out = inject(pod, SETTINGS, ENROLLED)
    ops = pod_patch(pod, out)
    assert ops and all(op["op"] in ("add", "replace", "remove", "move", "copy") for op in ops)
    assert jsonpatch.apply_patch(pod, ops) == out
    assert pod_patch(pod, copy.deepcopy(pod)) == []


# ---- validation --------------------------------------------------------------------------------

INVALID_VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - timeout: abc
    route:
    - destination: {host: reviews}
"""


def review(doc: dict[str, Any], operation: str = "CREATE", namespace: str = "shop",
           **extra: Any) -> dict[str, Any]:
    group = doc["apiVersion"].rpartition("/")[0]
    return {"uid": "1", "operation": operation, "namespace": namespace, "object": doc,
            "kind": {"group": group, "version": "v1", "kind": doc["kind"]}, **extra}


def test_validation_rejects_with_the_file_source_message() -> None:
    doc = yaml.safe_load(INVALID_VS)
    verdict = review_object(review(doc))
    assert not verdict.allowed
    with_ns = INVALID_VS.replace("metadata: {name: reviews}", "metadata: {name: reviews, namespace: shop}")
    file_errors = load_text(with_ns, "vs.yaml").errors
    assert [e.message for e in file_errors] == [verdict.message]
    assert verdict.message == ("VirtualService shop/reviews: spec.http[0].timeout: 'abc' is not a duration "
                               "such as '10s' or '250ms'")


def test_validation_warns_about_deprecated_fields_and_allows() -> None:
    doc = {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule",
           "metadata": {"name": "reviews"},
           "spec": {"host": "reviews", "trafficPolicy": {"outlierDetection": {"consecutiveErrors": 5}}}}
    verdict = review_object(review(doc))
    assert verdict.allowed
    assert verdict.warnings == ("DestinationRule shop/reviews: spec.trafficPolicy.outlierDetection.consecutiveErrors: "
                                "deprecated and ignored; use consecutive5xxErrors or consecutiveGatewayErrors",)


def test_validation_skips_deletes_status_writes_other_groups_and_unserved_kinds() -> None:
    doc = yaml.safe_load(INVALID_VS)
    assert review_object(review(doc, operation="DELETE")).allowed
    assert review_object(review(doc, operation="UPDATE", subResource="status")).allowed
    other = {**doc, "apiVersion": "example.com/v1"}
    assert review_object(review(other)).allowed
    unserved = {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter", "metadata": {"name": "f"},
                "spec": {}}
    verdict = review_object(review(unserved))
    assert verdict.allowed and "not validated" in verdict.warnings[0]


# ---- meshctl kube-inject -----------------------------------------------------------------------

def test_kube_inject_reads_stdin_and_writes_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out.yaml"
    text = yaml.safe_dump(make_pod())
    result = CliRunner().invoke(cli, ["kube-inject", "-f", "-", "-o", str(out)], input=text)
    assert result.exit_code == 0, result.output
    pods = list(yaml.safe_load_all(out.read_text()))
    assert [c["name"] for c in pods[0]["spec"]["containers"]] == ["web", PROXY_CONTAINER]


def test_kube_inject_errors_name_the_file_and_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(make_pod(annotations={"sidecar.istio.io/interceptionMode": "TPROXY"})))
    result = CliRunner().invoke(cli, ["kube-inject", "-f", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: Pod shop/web: annotation sidecar.istio.io/interceptionMode: TPROXY is not supported" \
        in result.output
    bad.write_text("kind: [unclosed")
    result = CliRunner().invoke(cli, ["kube-inject", "-f", str(bad)])
    assert result.exit_code == 1 and "invalid YAML" in result.output
    result = CliRunner().invoke(cli, ["kube-inject", "-f", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "cannot read" in result.output


def test_kube_inject_takes_proxy_metadata_from_a_mesh_config_file_and_the_annotation_wins(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text('defaultConfig:\n  proxyMetadata:\n    ISTIO_DELTA_XDS: "false"\n    MESH_WIDE: "yes"\n')
    pods = [make_pod(), make_pod(annotations={"proxy.istio.io/config": 'proxyMetadata: {ISTIO_DELTA_XDS: "true"}'})]
    result = CliRunner().invoke(cli, ["kube-inject", "-f", "-", "--mesh-config-file", str(mesh)],
                                input=yaml.safe_dump_all(pods))
    assert result.exit_code == 0, result.output
    plain, annotated = list(yaml.safe_load_all(result.stdout))
    assert (env(plain)["ISTIO_DELTA_XDS"], env(plain)["MESH_WIDE"]) == ("false", "yes")
    assert (env(annotated)["ISTIO_DELTA_XDS"], env(annotated)["MESH_WIDE"]) == ("true", "yes")
    assert json.loads(env(annotated)["PROXY_CONFIG"])["proxyMetadata"] == {"ISTIO_DELTA_XDS": "true",
                                                                           "MESH_WIDE": "yes"}
    mesh.write_text("defaultConfig:\n  proxyMetadata:\n    ISTIO_DELTA_XDS: false\n")
    result = CliRunner().invoke(cli, ["kube-inject", "-f", "-", "--mesh-config-file", str(mesh)],
                                input=yaml.safe_dump(make_pod()))
    assert result.exit_code == 1
    assert f"{mesh}: defaultConfig.proxyMetadata.ISTIO_DELTA_XDS: Input should be a valid string" in result.output


# ---- never crash -------------------------------------------------------------------------------

ANNOTATION_KEYS = [f"traffic.sidecar.istio.io/{k}" for k in (
    "includeOutboundIPRanges", "excludeOutboundIPRanges", "includeInboundPorts", "excludeInboundPorts",
    "excludeOutboundPorts")] + [f"sidecar.istio.io/{k}" for k in (
    "interceptionMode", "rewriteAppHTTPProbers", "inject", "proxyCPU")] + ["status.sidecar.istio.io/port"]
VALUES = st.one_of(st.sampled_from(["*", "", "80", "80,443", "10.0.0.0/8", "REDIRECT", "TPROXY", "true", "false",
                                    "0", "65536", "a,b", " 8080 , 9090 "]), st.text(max_size=12))
PORTS = st.one_of(st.integers(-5, 70000), st.sampled_from(["http", "8080", "nope", ""]))
PROBES = st.one_of(st.none(), st.builds(lambda kind, port: {kind: {"port": port, "path": "/"}},
                                        st.sampled_from(["httpGet", "tcpSocket", "grpc", "exec"]), PORTS))


@settings(max_examples=200, deadline=None)
@given(notes=st.dictionaries(st.sampled_from(ANNOTATION_KEYS), VALUES, max_size=5), readiness=PROBES,
       liveness=PROBES)
def test_any_annotations_and_probes_inject_idempotently_or_raise_injection_error(
        notes: dict[str, str], readiness: dict[str, Any] | None, liveness: dict[str, Any] | None) -> None:
    pod = make_pod(annotations=notes)
    for field, probe in (("readinessProbe", readiness), ("livenessProbe", liveness)):
        if probe is not None:
            pod["spec"]["containers"][0][field] = probe
    try:
        out = inject(pod, SETTINGS, ENROLLED)
    except InjectionError as exc:
        assert str(exc).startswith("Pod shop/web: ")
        return
    assert inject(out, SETTINGS, ENROLLED) == out
    assert jsonpatch.apply_patch(pod, pod_patch(pod, out)) == out
