"""pilot.kube.source against a real API server: kubectl-applied Istio objects in the ConfigStore,
the file source's error messages, discovery selectors, the mesh config map, and `meshctl up --kubeconfig`."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from click.testing import CliRunner
from google.protobuf.json_format import MessageToDict
from kubernetes_asyncio.client import ApiClient

from meshctl.cli import cli
from meshctl.localmesh import free_port
from pilot.config.store import ConfigStore
from pilot.config.yaml_text import load_text
from pilot.kube.client import client_from_kubeconfig
from pilot.kube.meshconfig import MeshConfigError, NamespaceSelector, parse_mesh_config
from pilot.kube.namespaces import NamespaceFilter, selected
from pilot.kube.secrets import SecretIndex
from pilot.kube.source import SOURCE_ID, KubeSource
from pilot.testing.ads_client import AdsClient, make_node
from pilot.xds.typeurls import LISTENER, ROUTE
from tests.k8s.cluster import KubeCluster

FAST: dict[str, Any] = {"min_backoff": 0.05, "max_backoff": 1.0, "request_timeout": 10.0}
NETWORKING = ("networking.istio.io", ("v1", "v1beta1", "v1alpha3"),
              ("VirtualService", "DestinationRule", "Gateway", "ServiceEntry", "WorkloadEntry", "Sidecar"))
SECURITY = ("security.istio.io", ("v1", "v1beta1"),
            ("PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication"))


def _plural(kind: str) -> str:
    lower = kind.lower()
    if lower.endswith("y") and lower[-2:-1] not in ("a", "e", "i", "o", "u"):  # policy -> policies
        return lower[:-1] + "ies"
    return lower + "s"  # gateway -> gateways


def minimal_crds() -> list[dict[str, Any]]:
    """A CRD per mesh kind that accepts any spec (validation is pilot's job here), v1 stored, with
    the status subresource."""
    out = []
    for group, versions, kinds in (NETWORKING, SECURITY):
        for kind in kinds:
            schema = {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}}
            out.append({
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": f"{_plural(kind)}.{group}"},
                "spec": {"group": group, "scope": "Namespaced",
                         "names": {"plural": _plural(kind), "singular": kind.lower(), "kind": kind,
                                   "listKind": f"{kind}List"},
                         # With the status subresource, as Istio's CRDs: whichever test installs the
                         # CRDs first, pilot's status writes (PATCH .../status) find it.
                         "versions": [{"name": v, "served": True, "storage": v == "v1", "schema": schema,
                                       "subresources": {"status": {}}} for v in versions]},
            })
    return out


@pytest.fixture(scope="module")
def mesh_crds(kube_cluster: KubeCluster) -> None:
    """Every mesh kind served. CRDs another test installed (manifests/, with full schemas) are kept."""
    kube_cluster.ensure_crds(minimal_crds())


async def until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def kubectl(cluster: KubeCluster, *args: str, stdin: str | None = None) -> str:
    return (await asyncio.to_thread(cluster.kubectl, *args, stdin=stdin)).stdout


def virtual_service(ns: str, name: str, host: str, *, version: str = "v1", match: Any = None) -> str:
    route: dict[str, Any] = {"route": [{"destination": {"host": host}}]}
    if match is not None:
        route["match"] = match
    return yaml.safe_dump({"apiVersion": f"networking.istio.io/{version}", "kind": "VirtualService",
                           "metadata": {"name": name, "namespace": ns},
                           "spec": {"hosts": [host], "http": [route]}}, sort_keys=False)


class Namespaces:
    """Namespaces a test makes; all deleted at the end, also on failure."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        self.made: list[str] = []

    def make(self, prefix: str, labels: dict[str, str] | None = None) -> str:
        ns = f"{prefix}-{secrets.token_hex(4)}"
        self.cluster.kubectl("create", "namespace", ns)
        self.made.append(ns)
        if labels:
            self.cluster.kubectl("label", "namespace", ns, *(f"{k}={v}" for k, v in labels.items()))
        return ns


@pytest.fixture
def namespaces(kube_cluster: KubeCluster) -> Iterator[Namespaces]:
    made = Namespaces(kube_cluster)
    yield made
    for ns in made.made:
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture
async def client(kube_cluster: KubeCluster) -> AsyncIterator[ApiClient]:
    api = await client_from_kubeconfig(kube_cluster.kubeconfig)
    try:
        yield api
    finally:
        await api.close()


class Running:
    def __init__(self, store: ConfigStore, source: KubeSource) -> None:
        self.store, self.source = store, source

    def hosts(self, ns: str, name: str) -> list[str] | None:
        obj = self.store.get("VirtualService", ns, name)
        return None if obj is None else list(obj.to_dict()["spec"]["hosts"])

    def rejected(self, ns: str, name: str) -> list[dict[str, Any]]:
        return [r for r in self.store.debug_dump()["rejected"] if (r["namespace"], r["name"]) == (ns, name)]


@pytest.fixture
async def running(mesh_crds: None, client: ApiClient, namespaces: Namespaces) -> AsyncIterator[Running]:
    """A KubeSource on a fresh store, its mesh config map in a namespace of its own."""
    store = ConfigStore()
    source = KubeSource(store, client, mesh_namespace=namespaces.make("mesh"), discovery_interval=1.0,
                        watch_options=FAST)
    task = asyncio.create_task(source.run())
    try:
        assert await source.wait_synced(60), "the source did not sync"
        yield Running(store, source)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# Pure parts: the mesh config and selectors.

def test_mesh_config_fields_defaults_and_errors() -> None:
    config = parse_mesh_config(
        "trustDomain: example.org\nrootNamespace: mesh-root\nenableTracing: true\n"
        "discoverySelectors:\n- matchLabels: {team: a}\n- matchExpressions:\n"
        "  - {key: env, operator: In, values: [prod]}\n")
    assert (config.trust_domain, config.root_namespace) == ("example.org", "mesh-root")
    team_a, prod = config.discovery_selectors
    assert team_a.match_labels == {"team": "a"} and prod.match_expressions[0].values == ("prod",)
    assert selected({"team": "a"}, config.discovery_selectors)
    assert selected({"env": "prod"}, config.discovery_selectors)
    assert not selected({"team": "b", "env": "dev"}, config.discovery_selectors)
    assert selected({"anything": "x"}, ())  # no selector: every namespace
    assert NamespaceSelector().matches({})  # an empty selector matches everything, as Kubernetes
    default = parse_mesh_config("", root_namespace="cp")
    assert (default.trust_domain, default.root_namespace, default.discovery_selectors) == ("cluster.local", "cp", ())
    with pytest.raises(MeshConfigError, match=r"discoverySelectors\.0\.matchExpressions\.0.*In needs values"):
        parse_mesh_config("discoverySelectors:\n- matchExpressions: [{key: env, operator: In}]\n")
    with pytest.raises(MeshConfigError, match="invalid YAML"):
        parse_mesh_config("trustDomain: [")


def test_namespace_filter_reports_only_membership_changes() -> None:
    def ns(name: str, **labels: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "labels": labels}}

    seen: list[tuple[list[str], list[str]]] = []
    filt = NamespaceFilter()
    filt.subscribe(lambda added, removed: seen.append((sorted(added), sorted(removed))))
    filt.replace([ns("a", team="x"), ns("b")])
    assert filt.allows("a") and filt.allows("b") and filt.allows("not-seen-yet")  # no selector: all
    assert seen == []
    filt.set_selectors([NamespaceSelector(match_labels={"team": "x"})])
    assert seen == [([], ["b"])] and not filt.allows("not-seen-yet")
    filt.upsert(ns("b", team="x"))
    filt.upsert(ns("b", team="x", other="y"))  # still selected: no news
    filt.delete(ns("a"))
    assert seen[1:] == [(["b"], []), ([], ["a"])]
    filt.set_selectors([])
    assert seen[3:] == []  # no known namespace changes: b was in already
    assert filt.allows("a")


def test_meshctl_up_needs_a_config_source() -> None:
    result = CliRunner().invoke(cli, ["up", "--plaintext-only"])
    assert result.exit_code == 2
    assert "give --config-dir, --kubeconfig or --in-cluster" in result.output


# Against the API server.

@pytest.mark.e2e
async def test_kinds_are_watched_at_the_preferred_served_version(running: Running) -> None:
    watches = running.source.watches
    for _group, _versions, kinds in (NETWORKING, SECURITY):
        for kind in kinds:
            assert watches[kind].resource.version == "v1", kind
    assert watches["AuthorizationPolicy"].resource.plural == "authorizationpolicies"


@pytest.mark.e2e
async def test_applied_edited_and_deleted_objects_follow_in_the_store(
        kube_cluster: KubeCluster, running: Running, namespaces: Namespaces) -> None:
    ns = namespaces.make("vs")
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=virtual_service(ns, "reviews", "reviews"))
    await until("the VirtualService", lambda: running.hosts(ns, "reviews") == ["reviews"])
    [entry] = [o for o in running.store.debug_dump()["objects"] if (o["namespace"], o["name"]) == (ns, "reviews")]
    assert entry["source"] == SOURCE_ID and entry["kind"] == "VirtualService"
    # Applied at another served version: the API server serves it at v1, the store has it once.
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=virtual_service(ns, "reviews", "ratings", version="v1beta1"))
    await until("the edit", lambda: running.hosts(ns, "reviews") == ["ratings"])
    policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "deny-all", "namespace": ns}, "spec": {}}
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=json.dumps(policy))
    await until("the AuthorizationPolicy", lambda: running.store.get("AuthorizationPolicy", ns, "deny-all") is not None)
    await kubectl(kube_cluster, "-n", ns, "delete", "virtualservice", "reviews")
    await until("the delete", lambda: running.hosts(ns, "reviews") is None)
    assert running.store.get("AuthorizationPolicy", ns, "deny-all") is not None


@pytest.mark.e2e
async def test_invalid_update_reads_as_the_file_source_says_and_the_last_good_version_serves(
        kube_cluster: KubeCluster, running: Running, namespaces: Namespaces) -> None:
    ns = namespaces.make("bad")
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=virtual_service(ns, "reviews", "reviews"))
    await until("the valid version", lambda: running.hosts(ns, "reviews") == ["reviews"])
    # A string match with none of exact/prefix/regex: any schema lets it through, Istio's validation does not.
    bad = virtual_service(ns, "reviews", "ratings", match=[{"uri": {}}])
    expected = [e.message for e in load_text(bad).errors]
    assert expected and "spec.http[0].match[0].uri" in expected[0]
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=bad)
    await until("the rejection", lambda: bool(running.rejected(ns, "reviews")))
    [rejection] = running.rejected(ns, "reviews")
    assert rejection["message"] == f"{expected[0]}; serving the previous version"
    assert rejection["kind"] == "VirtualService" and rejection["serving_previous_version"] is True
    assert running.hosts(ns, "reviews") == ["reviews"]  # the last good version
    # Fixed: the new version serves and the rejection is gone.
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=virtual_service(ns, "reviews", "ratings"))
    await until("the fix", lambda: running.hosts(ns, "reviews") == ["ratings"])
    assert running.rejected(ns, "reviews") == []
    # Invalid from the start: reported, nothing served.
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=virtual_service(ns, "other", "x", match=[{"uri": {}}]))
    await until("the second rejection", lambda: bool(running.rejected(ns, "other")))
    assert running.rejected(ns, "other")[0]["serving_previous_version"] is False
    assert running.store.get("VirtualService", ns, "other") is None


@pytest.mark.e2e
async def test_discovery_selectors_pick_namespaces_and_follow_labels_and_mesh_config(
        kube_cluster: KubeCluster, running: Running, namespaces: Namespaces) -> None:
    token = secrets.token_hex(4)
    outside = namespaces.make("outside")
    inside = namespaces.make("inside", {"meshctl-test-mesh": token})
    for ns in (outside, inside):
        await kubectl(kube_cluster, "apply", "-f", "-", stdin=virtual_service(ns, "reviews", f"reviews.{ns}"))
    await until("both objects (no selectors yet)",
                lambda: running.hosts(outside, "reviews") is not None and running.hosts(inside, "reviews") is not None)
    mesh = {"trustDomain": "example.org",
            "discoverySelectors": [{"matchLabels": {"meshctl-test-mesh": token}}]}
    configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": "istio", "namespace": running.source.mesh_handler.namespace},
                 "data": {"mesh": yaml.safe_dump(mesh)}}
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=json.dumps(configmap))
    await until("the unselected namespace's object to leave", lambda: running.hosts(outside, "reviews") is None)
    assert running.hosts(inside, "reviews") == [f"reviews.{inside}"]
    assert running.source.mesh.trust_domain == "example.org"
    # Labelling the namespace brings its objects in; unlabelling takes them out again.
    await kubectl(kube_cluster, "label", "namespace", outside, f"meshctl-test-mesh={token}")
    await until("the labelled namespace's object", lambda: running.hosts(outside, "reviews") == [f"reviews.{outside}"])
    await kubectl(kube_cluster, "label", "namespace", outside, "meshctl-test-mesh-")
    await until("the unlabelled namespace's object to leave", lambda: running.hosts(outside, "reviews") is None)
    # An object created in an unselected namespace is held back too.
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=virtual_service(outside, "late", "late"))
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=virtual_service(inside, "late", "late"))
    await until("the selected one", lambda: running.store.get("VirtualService", inside, "late") is not None)
    assert running.store.get("VirtualService", outside, "late") is None
    # An invalid mesh config keeps the last good one.
    configmap["data"] = {"mesh": "discoverySelectors: [{matchExpressions: [{key: a, operator: Bogus}]}]"}
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=json.dumps(configmap))
    await until("the mesh config's rejection", lambda: running.source.mesh_handler.error is not None)
    assert "operator" in (running.source.mesh_handler.error or "")
    assert running.store.get("VirtualService", outside, "late") is None
    # Selectors removed: every namespace again.
    configmap["data"] = {"mesh": "trustDomain: example.org\n"}
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=json.dumps(configmap))
    await until("every namespace again", lambda: running.store.get("VirtualService", outside, "late") is not None)
    assert running.hosts(outside, "reviews") == [f"reviews.{outside}"]


# `meshctl up --kubeconfig`: the user's path.

async def _configz(debug: str) -> dict[str, Any] | None:
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://{debug}/debug/configz") as resp:
            body: dict[str, Any] = await resp.json()
            return body
    except aiohttp.ClientError:
        return None


def _find(value: Any, key: str) -> list[Any]:
    """Every value of `key` anywhere in a JSON document."""
    if isinstance(value, dict):
        return [v for k, v in value.items() if k == key] + [x for v in value.values() for x in _find(v, key)]
    if isinstance(value, list):
        return [x for v in value for x in _find(v, key)]
    return []


@pytest.mark.e2e
@pytest.mark.timeout(240)
async def test_meshctl_up_with_a_kubeconfig_serves_a_kubectl_applied_route(
        kube_cluster: KubeCluster, mesh_crds: None, namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.make("up")
    # Files for mesh-external entries, beside the cluster's objects.
    external = {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": "external", "namespace": ns},
                "spec": {"hosts": ["api.example.com"], "location": "MESH_EXTERNAL", "resolution": "DNS",
                         "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}]}}
    (tmp_path / "external.yaml").write_text(yaml.safe_dump(external))
    host = f"reviews.{ns}.svc.cluster.local"
    service_entry = {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                     "metadata": {"name": "reviews", "namespace": ns},
                     "spec": {"hosts": [host], "location": "MESH_INTERNAL", "resolution": "STATIC",
                              "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
                              "workloadSelector": {"labels": {"app": "reviews"}}}}
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=json.dumps(service_entry))
    ads, debug = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshctl.cli", "up", "--plaintext-only", "--kubeconfig", str(kube_cluster.kubeconfig),
        "--config-dir", str(tmp_path), "--ads", ads, "--debug", debug, "--log-level", "warning",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        # Applied after pilot started: it must arrive through the watch.
        canary = virtual_service(ns, "reviews", host, match=[{"headers": {"x-meshctl-canary": {"exact": ns}}}])
        await kubectl(kube_cluster, "apply", "-f", "-", stdin=canary)

        async def in_configz() -> bool:
            body = await _configz(debug)
            return body is not None and any(
                (o["kind"], o["namespace"], o["name"], o["source"]) == ("VirtualService", ns, "reviews", SOURCE_ID)
                for o in body["objects"])
        for _ in range(600):
            if proc.returncode is not None or await in_configz():
                break
            await asyncio.sleep(0.1)
        assert proc.returncode is None, (await proc.stderr.read()).decode() if proc.stderr else ""
        assert await in_configz(), "the VirtualService never reached /debug/configz"
        sources = {(o["kind"], o["name"]): o["source"] for o in (await _configz(debug) or {})["objects"]
                   if o["namespace"] == ns}
        assert sources == {("ServiceEntry", "external"): f"file:{tmp_path}", ("ServiceEntry", "reviews"): SOURCE_ID,
                           ("VirtualService", "reviews"): SOURCE_ID}

        node = make_node(f"sidecar~127.0.9.9~client.{ns}~{ns}.svc.cluster.local", namespace=ns,
                         labels={"app": "client"}, workload="client")
        async with AdsClient(ads, node) as xds:
            xds.send(LISTENER)
            listeners = await xds.recv(30)
            xds.ack(listeners)
            names = sorted({n for res in listeners.resources for n in _find(MessageToDict(res), "routeConfigName")})
            assert names, "no listener refers to a route configuration"
            xds.send(ROUTE, names)
            routes = await xds.recv(30)
            matches = [m for res in routes.resources for m in _find(MessageToDict(res), "headers")]
            assert any(h.get("name") == "x-meshctl-canary" for hs in matches for h in hs), matches
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.mark.e2e
async def test_secret_index_names_credentials_by_istio_key_names(
        kube_cluster: KubeCluster, client: ApiClient, namespaces: Namespaces) -> None:
    ns = namespaces.make("secrets")
    store = ConfigStore()
    index = SecretIndex(store, client, **FAST)
    task = asyncio.create_task(index.run())
    try:
        await asyncio.wait_for(index.watch.synced.wait(), 30)

        def mine() -> list[tuple[str, str, str]]:
            return sorted(a for a in (index.current() or ()) if a[0] == ns)
        assert mine() == []
        before = store.revision
        await kubectl(kube_cluster, "-n", ns, "create", "secret", "generic", "web",
                      "--from-literal=tls.crt=C", "--from-literal=tls.key=K")
        await kubectl(kube_cluster, "-n", ns, "create", "secret", "generic", "web-cacert", "--from-literal=cacert=A")
        await kubectl(kube_cluster, "-n", ns, "create", "secret", "generic", "half", "--from-literal=cert=C")
        await until("both secrets", lambda: len(mine()) == 2)
        assert mine() == [(ns, "web", "cert"), (ns, "web-cacert", "ca")]  # "half" has no key: no certificate
        assert store.revision > before  # the mesh is rebuilt with the new warnings
        await kubectl(kube_cluster, "-n", ns, "delete", "secret", "web")
        await until("the deleted secret to go", lambda: mine() == [(ns, "web-cacert", "ca")])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.e2e
@pytest.mark.timeout(300)
async def test_source_keeps_every_change_across_an_api_server_restart(
        kube_cluster: KubeCluster, running: Running, namespaces: Namespaces) -> None:
    ns = namespaces.make("restart")
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=virtual_service(ns, "a", "a"))
    await until("a", lambda: running.hosts(ns, "a") == ["a"])
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=virtual_service(ns, "a", "a2"))  # just before the stop
    await asyncio.to_thread(kube_cluster.restart_apiserver, 1.0)
    await kubectl(kube_cluster, "apply", "-f", "-", stdin=virtual_service(ns, "b", "b"))  # right after the start
    await kubectl(kube_cluster, "-n", ns, "delete", "virtualservice", "a")
    await until("every change made around the restart",
                lambda: running.hosts(ns, "a") is None and running.hosts(ns, "b") == ["b"])
    assert sum(w.watches for w in running.source.watches.values()) > len(running.source.watches)  # reconnected
