"""The admission webhooks over real HTTPS: a real aiohttp server with a certificate from a real mesh
CA, clients that verify it against the CA's root, and AdmissionReview v1 JSON as the API server
sends it. The API server's own calls are covered by tests/k8s/test_webhooks.py."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from citadel.authority import CertificateAuthority
from citadel.ca import WorkloadCertPolicy
from injector.app import WebhookServer, ca_bundle, serve_webhooks
from injector.metrics import WebhookMetrics
from injector.settings import InjectSettings
from pilot.metrics import exposition

SETTINGS = InjectSettings(proxy_image="meshctl/proxy:test")
NAMESPACES = {"enrolled": {"istio-injection": "enabled"}, "plain": {}}


async def labels_of(namespace: str) -> Mapping[str, str]:
    return NAMESPACES[namespace]


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.self_signed(tmp_path / "ca", WorkloadCertPolicy(), trust_domain="cluster.local")


@pytest.fixture
async def server(ca: CertificateAuthority) -> AsyncIterator[WebhookServer]:
    async with serve_webhooks(ca, SETTINGS, host="127.0.0.1", port=0, namespace_labels=labels_of) as srv:
        yield srv


def client_context(ca: CertificateAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=ca_bundle(ca).decode())


async def post(ca: CertificateAuthority, port: int, path: str, body: Any) -> tuple[int, Any]:
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as session, \
            session.post(f"https://127.0.0.1:{port}{path}", data=json.dumps(body),
                         headers={"Content-Type": "application/json"}) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if resp.content_type == "application/json" else text


def pod_review(namespace: str, **metadata: Any) -> dict[str, Any]:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "web-", **metadata},
           "spec": {"containers": [{"name": "web", "image": "example/web:1"}]}}
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "7f0b2c4e-1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"}, "operation": "CREATE",
        "namespace": namespace, "object": pod, "userInfo": {"username": "admin"}, "dryRun": False}}


async def test_inject_returns_a_json_patch_that_injects_the_pod(ca: CertificateAuthority,
                                                                server: WebhookServer) -> None:
    body = pod_review("enrolled")
    status, review = await post(ca, server.port, "/inject", body)
    assert status == 200
    assert review["apiVersion"] == "admission.k8s.io/v1" and review["kind"] == "AdmissionReview"
    response = review["response"]
    assert response["uid"] == "7f0b2c4e-1" and response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(body["request"]["object"], json.loads(base64.b64decode(response["patch"])))
    assert [c["name"] for c in patched["spec"]["containers"]] == ["web", "istio-proxy"]
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["istio-init"]
    assert "namespace" not in patched["metadata"]  # the patch adds only what injection adds


async def test_pods_not_to_inject_are_allowed_unchanged(ca: CertificateAuthority, server: WebhookServer) -> None:
    for body in (pod_review("plain"),
                 pod_review("enrolled", annotations={"sidecar.istio.io/inject": "false"})):
        status, review = await post(ca, server.port, "/inject", body)
        assert status == 200
        assert review["response"] == {"uid": "7f0b2c4e-1", "allowed": True}


async def test_an_unsupported_annotation_is_refused_with_its_reason(ca: CertificateAuthority,
                                                                    server: WebhookServer) -> None:
    body = pod_review("enrolled", annotations={"sidecar.istio.io/interceptionMode": "TPROXY"})
    _, review = await post(ca, server.port, "/inject", body)
    response = review["response"]
    assert response["allowed"] is False and response["status"]["code"] == 400
    assert response["status"]["message"].startswith(
        "Pod enrolled/web-*: annotation sidecar.istio.io/interceptionMode: TPROXY is not supported")


async def test_validate_rejects_invalid_and_warns_on_deprecated(ca: CertificateAuthority,
                                                                server: WebhookServer) -> None:
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews"},
          "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}, "weight": -1}]}]}}
    dr = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews"},
          "spec": {"host": "reviews", "trafficPolicy": {"outlierDetection": {"consecutiveErrors": 3}}}}

    def review(obj: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "v-1", "kind": {"group": "networking.istio.io", "version": "v1", "kind": obj["kind"]},
            "operation": "CREATE", "namespace": "shop", "object": obj}}

    _, bad = await post(ca, server.port, "/validate", review(vs))
    assert bad["response"]["allowed"] is False
    assert bad["response"]["status"]["message"] == \
        "VirtualService shop/reviews: spec.http[0].route[0].weight: must be between 0 and 2147483647"
    _, warned = await post(ca, server.port, "/validate", review(dr))
    assert warned["response"]["allowed"] is True
    assert warned["response"]["warnings"] == [
        "DestinationRule shop/reviews: spec.trafficPolicy.outlierDetection.consecutiveErrors: deprecated and "
        "ignored; use consecutive5xxErrors or consecutiveGatewayErrors"]


async def test_malformed_reviews_get_400(ca: CertificateAuthority, server: WebhookServer) -> None:
    status, text = await post(ca, server.port, "/inject", {"kind": "Pod"})
    assert status == 400 and "not an AdmissionReview" in text
    status, text = await post(ca, server.port, "/validate", {"apiVersion": "admission.k8s.io/v1beta1",
                                                             "kind": "AdmissionReview", "request": {"uid": "x"}})
    assert status == 400 and "admission.k8s.io/v1" in text


async def peer_certificate(ca: CertificateAuthority, port: int, server_hostname: str | None) -> x509.Certificate:
    """The server's leaf as a verifying client sees it (no SNI when `server_hostname` is None)."""
    ctx = client_context(ca)
    if server_hostname is None:
        ctx.check_hostname = False  # an IP literal: checked against the IP SAN below instead
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_hostname or "")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    await writer.wait_closed()
    return x509.load_der_x509_certificate(der)


async def test_certificate_is_from_the_mesh_ca_and_follows_a_root_rotation(ca: CertificateAuthority,
                                                                           server: WebhookServer) -> None:
    # By DNS name (SNI sent) and by IP (no SNI, as the API server calling https://127.0.0.1:port).
    named = await peer_certificate(ca, server.port, "istiod.istio-system.svc")
    first = await peer_certificate(ca, server.port, None)
    assert named.serial_number == first.serial_number
    sans = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    old_root = ca.bundle.signing_cert
    assert first.issuer == old_root.subject
    ca.introduce_root()
    ca.activate_root()
    second = await peer_certificate(ca, server.port, None)
    assert second.serial_number != first.serial_number
    assert second.issuer == ca.bundle.signing_cert.subject != old_root.subject


async def test_reviews_are_counted_under_istios_metric_names(ca: CertificateAuthority) -> None:
    """Injection and validation counters as istiod exports them (names, labels, no `_total` added),
    read from the registry's Prometheus text, after real HTTPS reviews of each outcome."""
    registry = CollectorRegistry()
    metrics = WebhookMetrics(registry)

    def validation(obj: dict[str, Any], operation: str = "CREATE", dry_run: bool = False) -> dict[str, Any]:
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "v-2", "kind": {"group": "networking.istio.io", "version": "v1", "kind": obj["kind"]},
            "resource": {"group": "networking.istio.io", "version": "v1", "resource": "virtualservices"},
            "operation": operation, "namespace": "shop", "object": obj, "dryRun": dry_run}}

    good = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]}}
    bad = {**good, "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"},
                                                                      "weight": -1}]}]}}
    async with serve_webhooks(ca, SETTINGS, host="127.0.0.1", port=0, namespace_labels=labels_of,
                              metrics=metrics) as srv:
        for body in (pod_review("enrolled"), pod_review("plain"),
                     pod_review("enrolled", annotations={"sidecar.istio.io/interceptionMode": "TPROXY"}),
                     {"kind": "Pod"}):
            await post(ca, srv.port, "/inject", body)
        for body in (validation(good), validation(good, "UPDATE"), validation(bad), validation(bad, dry_run=True),
                     validation(good, "DELETE"), {"kind": "AdmissionReview"}):
            await post(ca, srv.port, "/validate", body)

    lines = set(exposition(registry).decode().splitlines())
    resource = 'group="networking.istio.io",resource="virtualservices",version="v1"'
    assert {
        "# TYPE sidecar_injection_requests_total counter", "sidecar_injection_requests_total 4.0",
        "sidecar_injection_skip_total 1.0",  # the pod of a namespace not enrolled
        "sidecar_injection_failure_total 2.0",  # the TPROXY annotation, the body that is no review
        "sidecar_injection_success_total 3.0",  # every review answered, as Istio counts it
        'sidecar_injection_time_seconds_bucket{le="0.1"} 4.0',
        "# TYPE galley_validation_passed counter", f"galley_validation_passed{{{resource}}} 2.0",
        'galley_validation_failed{group="networking.istio.io",reason="invalid_resource",resource="virtualservices",'
        'version="v1"} 1.0',  # not the dry run
        'galley_validation_failed{group="networking.istio.io",reason="unsupported_operation",'
        'resource="virtualservices",version="v1"} 1.0',
        'galley_validation_http_error{status="400"} 1.0',
    } <= lines
