"""`pilot.describe` as a pure function of an analysis input, and `meshctl describe`'s exit codes."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from meshctl.cli import cli
from meshctl.localmesh import free_port
from pilot.analysis.inputs import AnalysisInput
from pilot.analysis.load import Collector, add_text
from pilot.describe import TargetNotFound, describe, render
from pilot.describe.words import destinations, duration
from pilot.model.mesh import RouteDestination

SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: shop}
spec: {address: 127.0.0.5, labels: {app: reviews, version: v1}, serviceAccount: reviews}
"""


def load(*texts: str) -> AnalysisInput:
    collector = Collector()
    for i, text in enumerate(texts):
        add_text(collector, text, f"doc{i}.yaml")
    return collector.result()


def doc(kind: str, name: str, namespace: str, spec: dict[str, object], group: str = "networking.istio.io") -> str:
    return "---\n" + yaml.safe_dump({"apiVersion": f"{group}/v1", "kind": kind,
                                     "metadata": {"name": name, "namespace": namespace}, "spec": spec})


def test_duration_and_weight_words() -> None:
    assert [duration(timedelta(seconds=s)) for s in (2, 1.5, 0.25)] == ["2s", "1.5s", "250ms"]
    shares = destinations((RouteDestination("a", "v1", weight=1), RouteDestination("a", "v2", weight=3)))
    assert shares == ("a subset v1: 25%", "a subset v2: 75%")


def test_workload_is_found_with_its_service_and_not_as_a_pod() -> None:
    inp = load(SERVICE)
    found = describe(inp, "workload", "shop", "reviews-v1")
    assert [s.host for s in found.services] == ["reviews.shop.svc.cluster.local"]
    assert found.workload is not None and found.workload.address == "127.0.0.5"
    with pytest.raises(TargetNotFound, match="describe workload shop/reviews-v1"):
        describe(inp, "pod", "shop", "reviews-v1")
    with pytest.raises(TargetNotFound, match="service shop/ratings not found; namespace shop has shop/reviews"):
        describe(inp, "service", "shop", "ratings")


def test_service_by_host_name_lists_endpoints_by_subset() -> None:
    dr = doc("DestinationRule", "reviews", "shop", {"host": "reviews", "subsets": [
        {"name": "v1", "labels": {"version": "v1"}}, {"name": "v9", "labels": {"version": "v9"}}]})
    found = describe(load(SERVICE, dr), "service", "other", "reviews.shop.svc.cluster.local")
    (service,) = found.services
    (endpoint,) = service.endpoints
    assert endpoint.name == "shop/reviews-v1" and endpoint.subsets == ("v1 (DestinationRule shop/reviews)",)
    assert any("subset v9 of DestinationRule shop/reviews selects no instance" in w for w in found.warnings)


def test_workload_peer_authentication_beats_namespace_and_mesh() -> None:
    mesh_pa = doc("PeerAuthentication", "default", "istio-system", {"mtls": {"mode": "STRICT"}}, "security.istio.io")
    ns_pa = doc("PeerAuthentication", "default", "shop", {"mtls": {"mode": "PERMISSIVE"}}, "security.istio.io")
    own = doc("PeerAuthentication", "v1", "shop", {"selector": {"matchLabels": {"version": "v1"}},
                                                    "mtls": {"mode": "DISABLE"}}, "security.istio.io")
    mesh_wide = describe(load(SERVICE, mesh_pa), "workload", "shop", "reviews-v1").mtls
    assert mesh_wide is not None and mesh_wide.source == "PeerAuthentication istio-system/default (mesh-wide)"
    found = describe(load(SERVICE, mesh_pa, ns_pa, own), "workload", "shop", "reviews-v1")
    assert found.mtls is not None and (found.mtls.mode, found.mtls.source) == (
        "DISABLE", "PeerAuthentication shop/v1 (workload)")


def test_route_to_other_subset_is_a_warning_and_weights_are_percent() -> None:
    dr = doc("DestinationRule", "reviews", "shop", {"host": "reviews", "subsets": [
        {"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]})
    vs = doc("VirtualService", "reviews", "shop", {"hosts": ["reviews"], "http": [{"route": [
        {"destination": {"host": "reviews", "subset": "v2"}}]}]})
    found = describe(load(SERVICE, dr, vs), "workload", "shop", "reviews-v1")
    (rule,) = found.services[0].virtual_services
    assert rule.routes[0].reaches_target is False
    assert rule.routes[0].destinations == ("reviews.shop.svc.cluster.local subset v2: 100%",)
    assert "receives no traffic from VirtualService shop/reviews" in render(found)


def test_pod_from_kubernetes_objects_and_deployment_template() -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "app"},
               "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "web-1", "namespace": "app", "labels": {"app": "web"}},
           "spec": {"containers": [{"name": "web"}, {"name": "istio-proxy"}], "serviceAccountName": "web"}}
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "app"},
              "spec": {"template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "web"}]}}}}
    inp = load(yaml.safe_dump_all([service, pod, deploy]))
    found = describe(inp, "pod", "app", "web-1")
    assert found.workload is not None and found.workload.sidecar and found.workload.service_account == "web"
    assert [(s.kind, s.ports) for s in found.services] == [("Service", ("80/HTTP (http)",))]
    template = describe(inp, "workload", "app", "web")
    assert template.workload is not None and template.workload.kind == "Deployment" and not template.workload.sidecar
    assert describe(inp, "service", "app", "web").services[0].endpoints[0].name == "app/web-1"


def test_json_form_is_plain_and_deterministic() -> None:
    inp = load(SERVICE)
    first = json.dumps(describe(inp, "service", "shop", "reviews").to_dict())
    assert first == json.dumps(describe(load(SERVICE), "service", "shop", "reviews").to_dict())
    assert json.loads(first)["services"][0]["endpoints"][0]["address"] == "127.0.0.5"


def test_cli_exit_codes(tmp_path: Path) -> None:
    (tmp_path / "mesh.yaml").write_text(SERVICE)
    runner = CliRunner()
    args = ["-f", str(tmp_path / "mesh.yaml")]
    ok = runner.invoke(cli, ["describe", "workload", "shop/reviews-v1", *args, "-o", "json"])
    assert ok.exit_code == 0 and json.loads(ok.output)["workload"]["name"] == "reviews-v1"
    missing = runner.invoke(cli, ["describe", "pod", "nope", "-n", "shop", *args])
    assert missing.exit_code == 1 and "pod shop/nope not found" in missing.output
    clash = runner.invoke(cli, ["describe", "service", "shop/reviews", "-n", "default", *args])
    assert clash.exit_code == 2
    down = runner.invoke(cli, ["describe", "service", "reviews", "--debug", f"127.0.0.1:{free_port()}"])
    assert down.exit_code == 3 and "cannot reach" in down.output
    unreadable = runner.invoke(cli, ["describe", "service", "reviews", "-f", str(tmp_path / "absent.yaml")])
    assert unreadable.exit_code == 1 and "no such file" in unreadable.output


@pytest.mark.parametrize("path", [(), ("pod",), ("workload",), ("service",)])
def test_help_has_examples(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, ["describe", *path, "--help"])
    assert result.exit_code == 0
    assert "meshctl describe service" in result.output.split("Examples:", 1)[1]
