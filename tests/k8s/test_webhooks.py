"""The injection and validation webhooks called by a real kube-apiserver over TLS.

The webhook server runs in this process (its own thread and event loop, so blocking kubectl calls
here never stall it) with a certificate from a real mesh CA. The webhook configurations are the
ones `meshctl install` applies (`meshctl.render`), with the client switched from the istiod
Service to `https://127.0.0.1:<port>` and the CA's root as caBundle. Every webhook is scoped to
this module's namespaces (an extra namespaceSelector term on a label only they carry), so other
tests in the session are never affected, also while this module's server is stopped. The CRDs
come from `manifests/crds.yaml`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from citadel.authority import CertificateAuthority
from citadel.ca import WorkloadCertPolicy
from injector.app import WebhookServer, ca_bundle, namespace_lookup, serving_certificate
from injector.settings import InjectSettings
from injector.webhook import Webhooks
from meshctl.localmesh import free_port
from meshctl.render import InstallOptions, injector_webhook, validator_webhook
from pilot.kube.client import client_from_kubeconfig
from tests.k8s.cluster import KubeCluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CRDS = Path(__file__).parents[2] / "manifests" / "crds.yaml"
SETTINGS = InjectSettings(proxy_image="meshctl/proxy:test")


def until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


class ServerThread:
    """The webhook server on its own event loop thread, restartable on the same port."""

    def __init__(self, ca: CertificateAuthority, kubeconfig: Path, port: int) -> None:
        self.ca, self.kubeconfig, self.port = ca, kubeconfig, port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="webhook-server", daemon=True)
        self.thread.start()
        self._server: WebhookServer | None = None

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _start(self) -> None:
        self.api = await client_from_kubeconfig(self.kubeconfig)  # the real namespace lookup
        server = WebhookServer(Webhooks(SETTINGS, namespace_lookup(self.api, ttl_s=0)), serving_certificate(self.ca))
        await server.start("127.0.0.1", self.port)
        self._server = server

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            await self.api.close()
            self._server = None

    def start(self) -> None:
        self._run(self._start())

    def stop(self) -> None:
        self._run(self._stop())

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@dataclass
class Env:
    cluster: KubeCluster
    server: ServerThread
    enrolled: str  # istio-injection=enabled
    revision: str  # istio.io/rev=default
    plain: str  # no mesh label

    def create_pod(self, namespace: str, name: str, *, labels: dict[str, str] | None = None,
                   annotations: dict[str, str] | None = None, check: bool = True) -> dict[str, Any]:
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": labels or {"app": name}, "annotations": annotations or {}},
               "spec": {"containers": [{"name": "app", "image": "example/app:1",
                                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}}]}}
        return self.create(namespace, pod, check=check)

    def create(self, namespace: str, obj: dict[str, Any], *, check: bool = True) -> dict[str, Any]:
        proc = self.cluster.kubectl("-n", namespace, "create", "-o", "json", "-f", "-", stdin=json.dumps(obj),
                                    check=check)
        return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr}


def without_api_access(container: dict[str, Any]) -> dict[str, Any]:
    """A container without the service-account token mount the API server adds (random name per pod)."""
    mounts = [m for m in container.get("volumeMounts", []) if not m["name"].startswith("kube-api-access-")]
    return {**container, "volumeMounts": mounts}


def names(pod: dict[str, Any], key: str) -> list[str]:
    return [c["name"] for c in pod["spec"].get(key) or []]


def for_test(config: dict[str, Any], url: str, bundle: bytes, scope: tuple[str, str]) -> dict[str, Any]:
    """The installed configuration, calling `url` (the istiod Service's path kept) with `bundle` as
    caBundle, limited to namespaces carrying the `scope` label, under a unique name."""
    config = json.loads(json.dumps(config))
    config["metadata"] = {"name": f"{config['metadata']['name']}-{scope[1]}"}
    for hook in config["webhooks"]:
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {"url": url + path, "caBundle": base64.b64encode(bundle).decode()}
        hook.setdefault("namespaceSelector", {}).setdefault("matchExpressions", []).append(
            {"key": scope[0], "operator": "In", "values": [scope[1]]})
    return config


def install_crds(cluster: KubeCluster) -> list[str]:
    """Apply manifests/crds.yaml (server-side: the objects are large); the names that were new."""
    crds = [d for d in yaml.safe_load_all(CRDS.read_text()) if d]
    existing = set(cluster.kubectl("get", "crd", "-o", "name").stdout.split())
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    for crd in crds:
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd['metadata']['name']}")
    return [c["metadata"]["name"] for c in crds if f"customresourcedefinition.apiextensions.k8s.io/"
            f"{c['metadata']['name']}" not in existing]


@pytest.fixture(scope="module")
def env(kube_cluster: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    token = secrets.token_hex(4)
    scope = ("meshctl-test-webhooks", token)
    ca = CertificateAuthority.self_signed(tmp_path_factory.mktemp("ca") / "ca", WorkloadCertPolicy(),
                                          trust_domain="cluster.local")
    server = ServerThread(ca, kube_cluster.kubeconfig, free_port())
    namespaces = {"enrolled": (f"wh-on-{token}", {"istio-injection": "enabled"}),
                  "revision": (f"wh-rev-{token}", {"istio.io/rev": "default"}),
                  "plain": (f"wh-off-{token}", {})}
    url = f"https://127.0.0.1:{server.port}"
    options = InstallOptions()
    configs = [for_test(config, url, ca_bundle(ca), scope)
               for config in (injector_webhook(options), validator_webhook(options))]
    new_crds: list[str] = []
    try:
        server.start()
        new_crds = install_crds(kube_cluster)
        for name, labels in namespaces.values():
            meta = {"name": name, "labels": {**labels, scope[0]: scope[1]}}
            kube_cluster.kubectl("create", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "Namespace",
                                                                         "metadata": meta}))
        for name, _ in namespaces.values():  # pods need the default ServiceAccount (kube-controller-manager's)
            def has_default_account(n: str = name) -> bool:
                return kube_cluster.kubectl("-n", n, "get", "serviceaccount", "default", check=False).returncode == 0

            until(f"ServiceAccount {name}/default", has_default_account)
        for config in configs:
            kube_cluster.kubectl("create", "-f", "-", stdin=json.dumps(config))
        environment = Env(kube_cluster, server, namespaces["enrolled"][0], namespaces["revision"][0],
                          namespaces["plain"][0])
        # The API server picks up new webhook configurations asynchronously: wait until it calls ours.
        attempt = iter(range(1000))

        def injected() -> bool:
            pod = environment.create_pod(environment.enrolled, f"warmup-{next(attempt)}")
            return "istio-proxy" in names(pod, "containers")

        until("the API server to call the injection webhook", injected)
        yield environment
    finally:
        for config in configs:
            kube_cluster.kubectl("delete", config["kind"].lower(), config["metadata"]["name"],
                                 "--ignore-not-found", check=False)
        for name, _ in namespaces.values():
            kube_cluster.kubectl("delete", "namespace", name, "--ignore-not-found", "--wait=false", check=False)
        for crd in new_crds:
            kube_cluster.kubectl("delete", "crd", crd, "--ignore-not-found", "--wait=false", check=False)
        server.close()


def test_pod_in_enrolled_namespace_comes_back_injected(env: Env) -> None:
    for namespace in (env.enrolled, env.revision):
        pod = env.create_pod(namespace, "web")
        assert names(pod, "containers") == ["app", "istio-proxy"]
        assert names(pod, "initContainers") == ["istio-init"]
        assert "sidecar.istio.io/status" in pod["metadata"]["annotations"]
        assert pod["metadata"]["labels"]["security.istio.io/tlsMode"] == "istio"
        init = pod["spec"]["initContainers"][0]
        assert init["command"][:2] == ["meshctl", "redirect"]
        assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
        token = next(v for v in pod["spec"]["volumes"] if v["name"] == "istio-token")
        assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "istio-ca"
        # The API server's own admission still ran: the service-account token volume is there too.
        assert any(v["name"].startswith("kube-api-access-") for v in pod["spec"]["volumes"])
        app = pod["spec"]["containers"][0]
        assert app["readinessProbe"]["httpGet"] == {"path": "/app-health/app/readyz", "port": 15020,
                                                    "scheme": "HTTP"}


def test_pod_in_unlabeled_namespace_is_left_alone(env: Env) -> None:
    pod = env.create_pod(env.plain, "web")
    assert names(pod, "containers") == ["app"]
    assert "initContainers" not in pod["spec"]
    assert pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] == 8080


def test_pod_label_and_annotation_opt_out_and_label_opt_in(env: Env) -> None:
    by_label = env.create_pod(env.enrolled, "out-label", labels={"sidecar.istio.io/inject": "false"})
    by_annotation = env.create_pod(env.enrolled, "out-annotation", annotations={"sidecar.istio.io/inject": "false"})
    label_wins = env.create_pod(env.enrolled, "label-wins", labels={"sidecar.istio.io/inject": "false"},
                                annotations={"sidecar.istio.io/inject": "true"})
    assert names(by_label, "containers") == names(by_annotation, "containers") == ["app"]
    assert names(label_wins, "containers") == ["app"]
    opted_in = env.create_pod(env.plain, "in-label", labels={"sidecar.istio.io/inject": "true"})
    assert names(opted_in, "containers") == ["app", "istio-proxy"]


def test_reinjection_is_a_no_op(env: Env) -> None:
    first = env.create_pod(env.enrolled, "once")
    again: dict[str, Any] = {"apiVersion": "v1", "kind": "Pod",
             "metadata": {k: first["metadata"][k] for k in ("labels", "annotations")} | {"name": "twice"},
             "spec": {k: v for k, v in first["spec"].items() if k not in ("nodeName",)}}
    again["spec"]["volumes"] = [v for v in again["spec"]["volumes"] if not v["name"].startswith("kube-api-access-")]
    for key in ("containers", "initContainers"):
        again["spec"][key] = [without_api_access(c) for c in again["spec"][key]]
    second = env.create(env.enrolled, again)
    assert names(second, "containers") == ["app", "istio-proxy"]
    assert names(second, "initContainers") == ["istio-init"]
    for key in ("containers", "initContainers"):
        assert [without_api_access(c) for c in second["spec"][key]] == \
            [without_api_access(c) for c in first["spec"][key]]
    assert second["metadata"]["annotations"] == first["metadata"]["annotations"]


def test_a_tproxy_pod_is_refused_with_the_reason(env: Env) -> None:
    got = env.create_pod(env.enrolled, "tproxy", annotations={"sidecar.istio.io/interceptionMode": "TPROXY"},
                         check=False)
    assert "error" in got
    assert f"Pod {env.enrolled}/tproxy: annotation sidecar.istio.io/interceptionMode: TPROXY is not supported" \
        in got["error"]


VIRTUAL_SERVICE = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - timeout: {timeout}
    route:
    - destination: {{host: reviews}}
"""

DESTINATION_RULE = """apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    outlierDetection:
      consecutiveErrors: 5
"""


def test_kubectl_apply_of_an_invalid_virtual_service_is_rejected_with_its_field(env: Env) -> None:
    proc = env.cluster.kubectl("-n", env.plain, "apply", "-f", "-", stdin=VIRTUAL_SERVICE.format(timeout="abc"),
                               check=False)
    assert proc.returncode != 0
    assert 'validation.istio.io" denied the request: ' \
        f"VirtualService {env.plain}/reviews: spec.http[0].timeout: 'abc' is not a duration such as '10s' " \
        "or '250ms'" in proc.stderr
    missing = env.cluster.kubectl("-n", env.plain, "get", "virtualservice", "reviews", check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr
    ok = env.cluster.kubectl("-n", env.plain, "apply", "-f", "-", stdin=VIRTUAL_SERVICE.format(timeout="5s"))
    assert "virtualservice.networking.istio.io/reviews created" in ok.stdout
    assert "Warning" not in ok.stderr


def test_kubectl_prints_warnings_for_deprecated_fields(env: Env) -> None:
    proc = env.cluster.kubectl("-n", env.plain, "apply", "-f", "-", stdin=DESTINATION_RULE)
    assert "destinationrule.networking.istio.io/reviews created" in proc.stdout
    assert (f"Warning: DestinationRule {env.plain}/reviews: spec.trafficPolicy.outlierDetection.consecutiveErrors: "
            "deprecated and ignored; use consecutive5xxErrors or consecutiveGatewayErrors") in proc.stderr


def test_with_the_webhook_down_only_enrolled_namespaces_are_blocked(env: Env) -> None:
    env.server.stop()
    try:
        plain = env.create_pod(env.plain, "while-down")
        assert names(plain, "containers") == ["app"]
        opted_out = env.create_pod(env.enrolled, "down-opted-out", labels={"sidecar.istio.io/inject": "false"})
        assert names(opted_out, "containers") == ["app"]
        refused = env.create_pod(env.enrolled, "while-down", check=False)
        assert "failed calling webhook" in refused.get("error", ""), refused
    finally:
        env.server.start()
    until("the webhook to answer again",
          lambda: "istio-proxy" in names(env.create_pod(env.enrolled, f"back-{secrets.token_hex(3)}"), "containers"))


def test_kube_inject_output_is_accepted_by_the_api_server(env: Env) -> None:
    """Every golden `meshctl kube-inject` output passes the API server's own validation (server dry run)."""
    goldens = sorted((Path(__file__).parents[1] / "golden" / "inject").glob("*.golden.yaml"))
    assert goldens
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "bookinfo-reviews"}}
    env.cluster.kubectl("-n", env.plain, "apply", "-f", "-", stdin=json.dumps(account))  # a golden pod's
    for golden in goldens:
        docs = [d for d in yaml.safe_load_all(golden.read_text()) if d]
        for doc in docs:
            for obj in doc.get("items", [doc]):
                obj["metadata"]["namespace"] = env.plain
        proc = env.cluster.kubectl("create", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(docs),
                                   check=False)
        assert proc.returncode == 0, f"{golden.name}: {proc.stderr}"
