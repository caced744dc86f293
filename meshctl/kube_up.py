"""`meshctl up --kubeconfig/--in-cluster`: what the control plane adds on a cluster, beside pilot and the CA.

`KubeControlPlane` is the composition istiod performs on Kubernetes:

- the CA accepts pods' projected service-account tokens (audience `istio-ca`), reviewed by the API
  server (`citadel.tokenreview`, cached);
- the CA's roots come from the control-plane namespace's Secrets (`citadel.kube_store`: `cacerts` if
  present, else `istio-ca-secret`, created by the first replica), so every replica signs under one
  root and adopts the rotation leader's new roots;
- the injection and validation webhooks serve HTTPS on 15017 (`injector.app.serve_webhooks`) with a
  certificate from the mesh CA, renewed on its own;
- the Mutating/ValidatingWebhookConfigurations get the mesh root as `caBundle`
  (`meshctl.cabundle`) at start, after every root change, and every `BUNDLE_CHECK_S` (so a
  configuration installed later, or re-applied without the bundle, is repaired);
- `RootCertPublisher` keeps the `istio-ca-root-cert` ConfigMap (key `root-cert.pem`, Istio's names)
  in every namespace the mesh watches, which injected pods mount to trust the CA and pilot.

The last two are namespace-wide writes that one replica does: they run only while this replica holds
Lease `istio-namespace-controller-election` (Istio's name), through `Pilot.lead`; the others stay
idle and take over on handover (a new leader starts with a fresh watch and a full reconcile).

Concurrency: everything runs on the caller's event loop as guarded tasks (`pilot.tasks.spawn`);
the CA's root-change callback may come from a worker thread (rotation runs in one), so it only
schedules a wake-up on the loop. Cost: two extra watches (Namespaces, and the ConfigMaps of one
name), one GET per webhook configuration per check, and one write per namespace per root change.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from citadel.errors import CAConfigError
from citadel.keys import certs_pem
from citadel.kube_store import KubeCA
from citadel.tokenreview import CachedTokenReview, KubeTokenReviewClient
from injector.app import WEBHOOK_PORT, ca_bundle, dns_names, serve_webhooks
from injector.metrics import WebhookMetrics
from injector.settings import InjectSettings
from meshctl.cabundle import patch_ca_bundles
from meshctl.kubeapply import Applier, KubeApiError
from meshctl.render import INJECTOR_NAME, InstallOptions
from pilot.kube.client import make_client
from pilot.kube.meshconfig import CONFIGMAP_KEY, CONFIGMAP_NAME, MeshConfig
from pilot.kube.watch import Resource, Watch, backoff_delay
from pilot.listen import AddressInUseError
from pilot.tasks import spawn

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

    from meshctl.security import MeshSecurity
    from pilot.app import Pilot
    from pilot.settings import PilotSettings

log = logging.getLogger(__name__)

ROOT_CERT_KEY = "root-cert.pem"  # Istio's key in istio-ca-root-cert
MANAGED_LABEL = {"istio.io/config": "true"}  # Istio's label on the ConfigMaps it publishes
# Namespaces Istio never publishes into (system namespaces), besides the injector's ignored ones.
SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease", "local-path-storage"})
BUNDLE_CHECK_S = 60.0  # caBundle re-check while every configuration is found
BUNDLE_MISSING_CHECK_S = 5.0  # ... while one is not installed yet
NAMESPACE_LEASE = "istio-namespace-controller-election"  # Istio's lock for its namespace controller
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")


class KubeUpSettings(BaseSettings):
    """Names of the webhook configurations istiod keeps the caBundle of (Istio's
    INJECTION_WEBHOOK_CONFIG_NAME / VALIDATION_WEBHOOK_CONFIG_NAME). MESHCTL_KUBE_* override."""

    model_config = SettingsConfigDict(env_prefix="MESHCTL_KUBE_", frozen=True)

    injection_webhook_config_name: str = Field(INJECTOR_NAME, description="MutatingWebhookConfiguration to patch")
    validation_webhook_config_name: str = Field(
        "", description="ValidatingWebhookConfiguration to patch (empty: istio-validator-<mesh namespace>)")

    def validator(self, mesh_namespace: str) -> str:
        return self.validation_webhook_config_name or InstallOptions(namespace=mesh_namespace).validator_name


def _mesh_metadata(pilot: Pilot) -> Mapping[str, str]:
    """The mesh config's `defaultConfig.proxyMetadata` in force (none without a cluster source)."""
    return pilot.kube.mesh.default_config.proxy_metadata if pilot.kube is not None else {}


def webhook_address(given: tuple[str, int] | None, in_cluster: bool) -> tuple[str, int]:
    """Where the webhooks listen: as given, else every address in a pod (the API server comes
    through the istiod Service) and loopback from a workstation."""
    if given is not None:
        return given
    return ("0.0.0.0" if in_cluster else "127.0.0.1", WEBHOOK_PORT)


def root_cert_configmap(namespace: str, name: str, pem: str,
                        current: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ConfigMap to write: `current` (if any) with our key and label set, other keys kept."""
    meta = dict((current or {}).get("metadata") or {})
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": {**(meta.get("labels") or {}), **MANAGED_LABEL}},
        "data": {**((current or {}).get("data") or {}), ROOT_CERT_KEY: pem},
    }
    if meta.get("resourceVersion"):
        body["metadata"]["resourceVersion"] = meta["resourceVersion"]
    return body


def trust_domain_conflict(mesh: MeshConfig, trust_domain: str, where: str) -> str | None:
    """Why the mesh config's `trustDomain` (only when it sets one) cannot go with the CA's, else None.

    The CA signs `spiffe://<--trust-domain>/...` while policies and peers written for the mesh
    config's domain would expect the other: every mutual-TLS identity check would fail at run time.
    `meshctl up` therefore refuses to start (Istio takes its CA's domain from the mesh config; here
    the flag names it, so the two must agree)."""
    if "trust_domain" not in mesh.model_fields_set or mesh.trust_domain == trust_domain:
        return None
    return (f"{where}: trustDomain {mesh.trust_domain!r} differs from --trust-domain {trust_domain!r} "
            f"(workload certificates would carry spiffe://{trust_domain}/...); make them the same")


class _Index:
    """A `WatchHandler` keeping objects by namespace (or name, for Namespaces) and reporting changes."""

    def __init__(self, key: Callable[[Mapping[str, Any]], str], changed: Callable[[str], None]) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self._key, self._changed = key, changed

    def replace(self, objects: list[dict[str, Any]]) -> None:
        gone = set(self.objects)
        self.objects = {self._key(o): o for o in objects}
        for key in gone | set(self.objects):
            self._changed(key)

    def upsert(self, obj: dict[str, Any]) -> None:
        self.objects[self._key(obj)] = obj
        self._changed(self._key(obj))

    def delete(self, obj: dict[str, Any]) -> None:
        self.objects.pop(self._key(obj), None)
        self._changed(self._key(obj))


class _Raced(Exception):
    """A write lost a race (404/409): the watch brings the current state, then we try again."""


class RootCertPublisher:
    """Keeps ConfigMap `name` (key root-cert.pem = `pem()`) in every namespace `allows` says is in the mesh.

    Like Istio's namespace controller: system and terminating namespaces are skipped, a ConfigMap
    edited or deleted by someone is written back, other keys and labels on it are kept, and
    nothing is deleted (another control plane may own it). Writes are create/update (the verbs the
    rendered ClusterRole grants); a failed one is retried with backoff.
    """

    def __init__(self, api: ApiClient, pem: Callable[[], str], *, name: str = "istio-ca-root-cert",
                 allows: Callable[[str], bool] = lambda _ns: True,
                 skip: frozenset[str] = SYSTEM_NAMESPACES, **watch_options: Any) -> None:
        self.name, self._pem, self.allows, self.skip = name, pem, allows, skip
        self._api = Applier(api, "meshctl-istiod")
        self.namespaces = _Index(lambda o: str(o["metadata"]["name"]), self.mark)
        self.configmaps = _Index(lambda o: str(o["metadata"]["namespace"]), self.mark)
        self._watches = (Watch(api, NAMESPACES, self.namespaces, **watch_options),
                         Watch(api, CONFIGMAPS, self.configmaps, field_selector=f"metadata.name={name}",
                               **watch_options))
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self.writes = 0  # ConfigMaps created or updated, for tests and logs
        self.synced = asyncio.Event()

    def mark(self, namespace: str) -> None:
        """Look at `namespace` again soon (called on the loop)."""
        self._dirty.add(namespace)
        self._wake.set()

    def mark_all(self) -> None:
        """Every namespace again, e.g. after the root changed or the discovery selectors did."""
        for namespace in self.namespaces.objects:
            self.mark(namespace)

    def wanted(self, namespace: str) -> bool:
        obj = self.namespaces.objects.get(namespace)
        if obj is None or namespace in self.skip or not self.allows(namespace):
            return False
        return (obj.get("status") or {}).get("phase") != "Terminating" and not obj["metadata"].get("deletionTimestamp")

    async def run(self) -> None:
        """Watch, then reconcile dirty namespaces until cancelled."""
        async with asyncio.TaskGroup() as group:
            for watch in self._watches:
                group.create_task(watch.run())
            for watch in self._watches:
                await watch.synced.wait()
            self.synced.set()
            group.create_task(self._reconcile_forever())

    async def _reconcile_forever(self) -> None:
        attempt = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._dirty = sorted(self._dirty), set()
            failed = False
            for namespace in batch:
                try:
                    await self._reconcile(namespace)
                except _Raced as exc:  # the watch has not caught up yet: look again after a pause
                    log.debug("ConfigMap %s/%s: %s", namespace, self.name, exc)
                    self._dirty.add(namespace)
                    failed = True
                except KubeApiError as exc:
                    log.warning("ConfigMap %s/%s: %s (retrying)", namespace, self.name, exc)
                    self._dirty.add(namespace)
                    failed = True
            if failed:
                await asyncio.sleep(backoff_delay(attempt, 0.5, 30.0))
                attempt += 1
                self._wake.set()
            else:
                attempt = 0

    async def _reconcile(self, namespace: str) -> None:
        if not self.wanted(namespace):
            return
        pem, current = self._pem(), self.configmaps.objects.get(namespace)
        if current is not None and (current.get("data") or {}).get(ROOT_CERT_KEY) == pem:
            return
        body = root_cert_configmap(namespace, self.name, pem, current)
        collection = f"/api/v1/namespaces/{namespace}/configmaps"
        method, path = ("POST", collection) if current is None else ("PUT", f"{collection}/{self.name}")
        status, data = await self._api.request(method, path, body=body)
        if status in (404, 409):  # raced with another writer or a deletion: the watch tells us the rest
            raise _Raced(f"{method}: {status} {data.get('message', '')}")
        if status == 403 and "being terminated" in str(data.get("message", "")):
            return
        if not 200 <= status < 300:
            raise KubeApiError(f"{method} refused: {data.get('message', status)}", status)
        self.configmaps.objects[namespace] = data  # the watch event follows; no second write meanwhile
        self.writes += 1
        log.info("ConfigMap %s/%s: mesh root %s", namespace, self.name, "published" if current is None else "updated")


class KubeControlPlane:
    """The Kubernetes duties of `meshctl up` (see the module docstring): `open`, `start(pilot)`, `close`."""

    def __init__(self, api: ApiClient, security: MeshSecurity, settings: PilotSettings, inject: InjectSettings,
                 names: KubeUpSettings, webhooks: tuple[str, int], kube_ca: KubeCA) -> None:
        self.api, self.security, self.settings, self.inject = api, security, settings, inject
        self.names, self.webhooks_address, self.kube_ca = names, webhooks, kube_ca
        self.publisher: RootCertPublisher | None = None  # while this replica leads the namespace duties
        self._closed = False
        self._led = False  # `lead` registered the namespace duties with pilot
        self.webhooks_port = 0
        self._root_changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, security: MeshSecurity, settings: PilotSettings, *, trust_domain: str,
                   webhooks: tuple[str, int] | None = None) -> KubeControlPlane:
        """Connect to the cluster, load the CA's roots from its Secrets and make the CA trust its
        service-account tokens (before the CA starts)."""
        api = await make_client(settings.kubeconfig, in_cluster=settings.kube_in_cluster)
        try:
            citadel = security.citadel
            kube_ca = await KubeCA.open(api, settings.kube_mesh_namespace, citadel.ca,
                                        algorithm=citadel.settings.key_algorithm, root_ttl=citadel.settings.root_ttl,
                                        fallback_dir=citadel.settings.ca_dir)
        except BaseException:
            await api.close()
            raise
        citadel.use_token_review(CachedTokenReview(KubeTokenReviewClient(api)))
        inject = InjectSettings(trust_domain=trust_domain)  # sidecars must verify the CA's own trust domain
        plane = cls(api, security, settings, inject, KubeUpSettings(),
                    webhook_address(webhooks, settings.kube_in_cluster), kube_ca)
        citadel.ca.on_change(plane._root_callback)
        return plane

    def lead(self, pilot: Pilot) -> None:
        """Register the namespace duties (root ConfigMaps, caBundles) under `NAMESPACE_LEASE`; before `pilot.start`."""
        pilot.lead(NAMESPACE_LEASE, "root-cert-configmaps", lambda: self._publish(pilot))
        pilot.lead(NAMESPACE_LEASE, "webhook-ca-bundles", self._keep_ca_bundles)
        self._led = True

    async def _publish(self, pilot: Pilot) -> None:
        """The root ConfigMap publisher, for one term of leadership (a fresh watch and full reconcile)."""
        namespaces = pilot.kube.namespaces if pilot.kube is not None else None
        publisher = RootCertPublisher(self.api, lambda: certs_pem(self.security.citadel.ca.trust_bundle()),
                                      name=self.inject.root_cert_configmap,
                                      allows=namespaces.allows if namespaces is not None else lambda _ns: True,
                                      skip=SYSTEM_NAMESPACES | frozenset(self.inject.ignored_namespaces))
        self.publisher = publisher
        try:
            await publisher.run()
        finally:
            if self.publisher is publisher:
                self.publisher = None

    async def start(self, pilot: Pilot) -> None:
        """Serve the webhooks and follow the CA's Secret (guarded task); the namespace duties run
        under their Lease if `lead` registered them, else here, unconditionally."""
        if pilot.kube is not None:  # synced by now: the mesh config in force
            where = f"ConfigMap {self.settings.kube_mesh_namespace}/{CONFIGMAP_NAME} key {CONFIGMAP_KEY}"
            conflict = trust_domain_conflict(pilot.kube.mesh, self.inject.trust_domain, where)
            if conflict is not None:
                raise CAConfigError(conflict)
        ca = self.security.citadel.ca
        host, port = self.webhooks_address
        ips = ("127.0.0.1",) if host in ("0.0.0.0", "127.0.0.1") else ("127.0.0.1", host)  # the certificate's IP SANs
        try:
            server = await self._stack.enter_async_context(serve_webhooks(
                ca, self.inject, host=host, port=port, names=dns_names(self.settings.kube_mesh_namespace), ips=ips,
                metrics=WebhookMetrics(pilot.registry), mesh_metadata=lambda: _mesh_metadata(pilot)))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUseError("webhooks", host, port) from None
            raise
        self.webhooks_port = server.port
        namespaces = pilot.kube.namespaces if pilot.kube is not None else None
        if namespaces is not None:  # a discovery-selector change brings namespaces in
            namespaces.subscribe(self._selected)
        self._tasks = [spawn("ca-secret", self.kube_ca.run, pilot.failures)]
        if not self._led:  # a single control plane that did not `lead` (an embedding, a test): always
            self._tasks += [spawn("root-cert-configmaps", lambda: self._publish(pilot), pilot.failures),
                            spawn("webhook-ca-bundles", self._keep_ca_bundles, pilot.failures)]
        log.info("webhooks (injection, validation) on https://%s:%d; while leading %s: caBundle of %s and %s kept, "
                 "ConfigMap %s published in the mesh's namespaces", host, server.port, NAMESPACE_LEASE,
                 self.names.injection_webhook_config_name, self.names.validator(self.settings.kube_mesh_namespace),
                 self.inject.root_cert_configmap)

    def _selected(self, added: frozenset[str], _removed: frozenset[str]) -> None:
        for namespace in added:
            if self.publisher is not None:
                self.publisher.mark(namespace)

    def _root_callback(self, _bundle: object) -> None:
        """The CA's change hook (possibly on a rotation worker thread): wake the loop, nothing more."""
        if not self._closed:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._on_root_change)

    def _on_root_change(self) -> None:
        self._root_changed.set()
        if self.publisher is not None:
            self.publisher.mark_all()

    async def _keep_ca_bundles(self) -> None:
        """Patch both configurations now, after every root change and every check interval."""
        attempt = 0
        mutating = (self.names.injection_webhook_config_name,)
        validating = (self.names.validator(self.settings.kube_mesh_namespace),)
        while True:
            wait = BUNDLE_CHECK_S
            try:
                results = await patch_ca_bundles(self.api, ca_bundle(self.security.citadel.ca),
                                                 mutating=mutating, validating=validating)
                attempt = 0
                for result in results:
                    if not result.found:
                        wait = BUNDLE_MISSING_CHECK_S
                        log.debug("%s %s is not installed: no caBundle to patch yet", result.kind, result.name)
                    elif result.patched:
                        log.info("%s %s: caBundle set on %d webhook(s)", result.kind, result.name, result.patched)
            except KubeApiError as exc:
                log.warning("webhook caBundle: %s (retrying)", exc)
                wait = backoff_delay(attempt, 1.0, 30.0)
                attempt += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._root_changed.wait()
            self._root_changed.clear()

    async def close(self) -> None:
        """Stop the tasks and the webhooks, close the API client."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.publisher = None
        try:
            await self._stack.aclose()
        finally:
            await self.api.close()
