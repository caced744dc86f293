"""The service registry's I/O edge: three watches (Services, EndpointSlices, Pods) kept as the
current objects, turned into `KubeService` and `ServiceEndpoints` (pure, `pilot.kube.registry`)
and written to the same `ConfigStore` the file and CRD sources write to.

Concurrency: one event loop. The three `pilot.kube.watch.Watch` tasks call the handlers here
synchronously, one event at a time; handlers update the indexes and rewrite the store objects of
the services the event touches, so the store is always in step with what was seen. Nothing is
written before all three watches have listed once (an EndpointSlice seen before its Pods would
publish endpoints without labels or identity, then correct them); then the first full set goes
in with one `replace_source`, as does the full set after any re-list (410 Gone, reconnect).

Cost: an event re-converts the services it touches, O(their endpoints); a Pod event touches
only the services whose slices name that Pod (or its IP), and none at all when the fields the
registry reads (labels, service account, IPs) are unchanged, as they are for most status
updates. An object equal to the one in the store is not written again, so the store revision,
and with it every push, moves only when a service or its ready endpoints really changed;
endpoint-only changes touch only `ServiceEndpoints` (an `ENDPOINT_KINDS` kind: EDS fast path).
Memory: the Services and EndpointSlices as JSON, and a few fields of each Pod.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubernetes_asyncio.client import ApiClient

from pilot.api import ApiObject
from pilot.config.store import ConfigStore
from pilot.kube.namespaces import NamespaceFilter
from pilot.kube.registry import (
    ENDPOINTS_KIND,
    SERVICE_KIND,
    PodFacts,
    RegistryError,
    agreed_target_ports,
    kube_service,
    pod_facts,
    service_endpoints,
    service_name_of_slice,
)
from pilot.kube.watch import Resource, Watch
from pilot.model.proxy import ProxyIdentity, identity_from_node, pod_of_node, with_pod

log = logging.getLogger(__name__)

SOURCE_ID = "kubernetes-registry"
SERVICES = Resource("", "v1", "services", "Service")
ENDPOINT_SLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
PODS = Resource("", "v1", "pods", "Pod")
# Slices of a Service (not the multi-cluster services API's own, which Istio skips too).
SLICE_SELECTOR = "kubernetes.io/service-name,!multicluster.kubernetes.io/service-name"

Key = tuple[str, str]  # (namespace, name)


def _key(obj: Mapping[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _service_of(endpoint_slice: Mapping[str, Any]) -> Key:
    return (_key(endpoint_slice)[0], service_name_of_slice(endpoint_slice))


class KubeRegistry:
    """Services, EndpointSlices and Pods in; `KubeService` / `ServiceEndpoints` in the store out."""

    def __init__(
        self, store: ConfigStore, *, domain: str = "cluster.local", source_id: str = SOURCE_ID,
        namespaces: NamespaceFilter | None = None, watch_options: Mapping[str, Any] | None = None,
    ) -> None:
        """`namespaces`: the mesh's discovery selectors (the config source's filter, shared), so
        only Services of selected namespaces are published, and (de)selecting a namespace brings
        its Services in or out without a re-list; None: every namespace. `watch_options` go to
        every `Watch` (tests shorten timeouts and backoff)."""
        self.store = store
        self.domain = domain
        self.source_id = source_id
        self.namespaces = namespaces
        self.watch_options = dict(watch_options or {})
        if namespaces is not None:
            namespaces.subscribe(self._namespaces_changed)
        self.synced = asyncio.Event()  # set once the three watches listed and the store holds their view
        self.errors: dict[Key, str] = {}  # Services that could not be converted (their last good version serves)
        self._services: dict[Key, dict[str, Any]] = {}
        self._slices: dict[Key, dict[str, Any]] = {}
        self._slices_of: dict[Key, set[Key]] = {}  # service -> its slices
        self._pods: dict[Key, PodFacts] = {}
        self._pods_by_ip: dict[tuple[str, str], set[str]] = {}  # (namespace, ip) -> pod names
        # Which slices stand for a Pod: ("pod", namespace, name) by targetRef, ("ip", namespace, ip) otherwise.
        self._readers: dict[tuple[str, str, str], set[Key]] = {}
        self._objects: dict[tuple[str, str, str], ApiObject] = {}  # what this source holds in the store
        # Called with (namespace, name) when a known Pod's labels change: its proxies' class moves
        # (`pilot.xds.server.AdsServer.pod_changed`).
        self.pod_listeners: list[Callable[[str, str], None]] = []
        self._listed: set[str] = set()
        self.services = _Handler(self, "services", self._replace_services, self._upsert_service, self._delete_service)
        self.endpoint_slices = _Handler(self, "slices", self._replace_slices, self._upsert_slice, self._delete_slice)
        self.pods = _Handler(self, "pods", self._replace_pods, self._upsert_pod, self._delete_pod)

    # -- lookups (also for matching a proxy's Node to its Pod) ------------------------------------

    def pod(self, namespace: str, name: str) -> PodFacts | None:
        return self._pods.get((namespace, name))

    def pod_by_ip(self, namespace: str, ip: str) -> PodFacts | None:
        """A Pod of `namespace` with `ip` (for hostNetwork pods sharing it: the first by name)."""
        names = self._pods_by_ip.get((namespace, ip))
        return self._pods[(namespace, min(names))] if names else None

    def classify(self, node: Any) -> ProxyIdentity:
        """Who a connecting proxy is: its Node read as usual, then corrected by its Pod (labels,
        service account; the IP must match), see `pilot.model.proxy.with_pod`. For `AdsServer`."""
        identity = identity_from_node(node)
        ref = pod_of_node(identity.node_id)
        return with_pod(identity, self.pod(*ref) if ref else None)

    # -- running ----------------------------------------------------------------------------------

    def watches(self, api_client: ApiClient, namespace: str | None = None) -> list[Watch]:
        """The three watches feeding this registry (all namespaces unless `namespace`)."""
        options = self.watch_options
        return [
            Watch(api_client, SERVICES, self.services, namespace=namespace, **options),
            Watch(api_client, ENDPOINT_SLICES, self.endpoint_slices, namespace=namespace,
                  label_selector=SLICE_SELECTOR, **options),
            Watch(api_client, PODS, self.pods, namespace=namespace, **options),
        ]

    async def run(self, api_client: ApiClient, namespace: str | None = None) -> None:
        """Run the three watches until cancelled (each retries on its own; see `Watch.run`)."""
        tasks = [asyncio.create_task(w.run(), name=f"registry {w.resource}")
                 for w in self.watches(api_client, namespace)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- services ---------------------------------------------------------------------------------

    def _replace_services(self, objects: list[dict[str, Any]]) -> None:
        self._services = {_key(o): o for o in objects}

    def _upsert_service(self, obj: dict[str, Any]) -> set[Key]:
        self._services[_key(obj)] = obj
        return {_key(obj)}

    def _delete_service(self, obj: dict[str, Any]) -> set[Key]:
        self._services.pop(_key(obj), None)
        return {_key(obj)}

    # -- endpoint slices --------------------------------------------------------------------------

    def _replace_slices(self, objects: list[dict[str, Any]]) -> None:
        self._slices, self._slices_of, self._readers = {}, {}, {}
        for obj in objects:
            self._upsert_slice(obj)

    def _upsert_slice(self, obj: dict[str, Any]) -> set[Key]:
        touched = self._delete_slice(obj)
        service = _service_of(obj)
        if not service[1]:
            return touched
        self._slices[_key(obj)] = obj
        self._slices_of.setdefault(service, set()).add(_key(obj))
        for reader in self._reads(obj):
            self._readers.setdefault(reader, set()).add(_key(obj))
        return touched | {service}

    def _delete_slice(self, obj: dict[str, Any]) -> set[Key]:
        old = self._slices.pop(_key(obj), None)
        if old is None:
            return set()
        service = _service_of(old)
        self._slices_of.get(service, set()).discard(_key(old))
        if not self._slices_of.get(service):
            self._slices_of.pop(service, None)
        for reader in self._reads(old):
            slices = self._readers.get(reader, set())
            slices.discard(_key(old))
            if not slices:
                self._readers.pop(reader, None)
        return {service}

    @staticmethod
    def _reads(endpoint_slice: Mapping[str, Any]) -> set[tuple[str, str, str]]:
        """The Pods a slice's endpoints stand for: ("pod", ns, name) by targetRef, else ("ip", ns, address)."""
        namespace = _key(endpoint_slice)[0]
        found: set[tuple[str, str, str]] = set()
        for endpoint in endpoint_slice.get("endpoints") or ():
            ref = endpoint.get("targetRef") or {}
            if ref.get("kind") == "Pod":
                found.add(("pod", str(ref.get("namespace") or namespace), str(ref.get("name") or "")))
            else:
                found.update(("ip", namespace, str(a)) for a in endpoint.get("addresses") or ())
        return found

    # -- pods -------------------------------------------------------------------------------------

    def _replace_pods(self, objects: list[dict[str, Any]]) -> None:
        before = self._pods
        self._pods, self._pods_by_ip = {}, {}
        for obj in objects:
            self._upsert_pod(obj)
        for facts in self._pods.values():  # a re-list after a watch gap: labels changed meanwhile
            self._relabelled(before.get((facts.namespace, facts.name)), facts)

    def _upsert_pod(self, obj: dict[str, Any]) -> set[Key]:
        facts = pod_facts(obj)
        old = self._pods.get(_key(obj))
        if old == facts:
            return set()  # a status update the registry does not read
        touched = self._delete_pod(obj)
        self._pods[_key(obj)] = facts
        for ip in facts.ips:
            self._pods_by_ip.setdefault((facts.namespace, ip), set()).add(facts.name)
        self._relabelled(old, facts)
        return touched | self._readers_of(facts)

    def _relabelled(self, old: PodFacts | None, facts: PodFacts) -> None:
        """Tell `pod_listeners` when a known Pod's labels changed."""
        if old is not None and old.labels != facts.labels:
            for listener in self.pod_listeners:
                listener(facts.namespace, facts.name)

    def _delete_pod(self, obj: dict[str, Any]) -> set[Key]:
        old = self._pods.pop(_key(obj), None)
        if old is None:
            return set()
        for ip in old.ips:
            names = self._pods_by_ip.get((old.namespace, ip), set())
            names.discard(old.name)
            if not names:
                self._pods_by_ip.pop((old.namespace, ip), None)
        return self._readers_of(old)

    def _readers_of(self, pod: PodFacts) -> set[Key]:
        """The services whose slices stand for `pod` (by name, or by one of its IPs)."""
        readers = [("pod", pod.namespace, pod.name), *(("ip", pod.namespace, ip) for ip in pod.ips)]
        return {_service_of(self._slices[k]) for r in readers for k in self._readers.get(r, ())}

    # -- output -----------------------------------------------------------------------------------

    def listed(self, which: str) -> None:
        """A watch delivered a full set: once all three have, publish everything."""
        self._listed.add(which)
        if len(self._listed) == 3:
            self.publish_all()

    def publish_all(self) -> None:
        """Convert every service and make the result the source's whole content (one revision)."""
        objects: dict[tuple[str, str, str], ApiObject] = {}
        for key in sorted(self._services):
            objects.update(self._convert(key))
        self._objects = objects
        self.store.replace_source(self.source_id, objects)
        self.synced.set()

    def publish(self, services: Iterable[Key]) -> None:
        """Rewrite the store objects of `services` (no-op before the first full set)."""
        if not self.synced.is_set():
            return
        for key in sorted(set(services)):
            new = self._convert(key)
            for kind in (SERVICE_KIND, ENDPOINTS_KIND):
                store_key = (kind, *key)
                obj = new.get(store_key)
                if obj is None:
                    if self._objects.pop(store_key, None) is not None:
                        self.store.delete(kind, key[0], key[1], self.source_id)
                elif obj is not self._objects.get(store_key):
                    self._objects[store_key] = obj
                    self.store.apply(obj, self.source_id)

    def _namespaces_changed(self, added: frozenset[str], removed: frozenset[str]) -> None:
        self.publish(key for key in self._services if key[0] in added or key[0] in removed)

    def _convert(self, key: Key) -> dict[tuple[str, str, str], ApiObject]:
        """The store objects of one service, reusing the current instances of equal objects (a
        rewrite that changes nothing keeps identities, so nothing downstream is redone)."""
        service = self._services.get(key)
        if service is None or (self.namespaces is not None and not self.namespaces.allows(key[0])):
            self.errors.pop(key, None)
            return {}
        slices = [self._slices[k] for k in sorted(self._slices_of.get(key, ()))]
        try:
            found: list[ApiObject] = [kube_service(service, self.domain, agreed_target_ports(slices)),
                                      service_endpoints(service, slices, self.pod, self.pod_by_ip)]
        except RegistryError as exc:
            self.errors[key] = str(exc)
            log.warning("service registry: %s; its last good version (if any) keeps serving", exc)
            return {k: self._objects[k] for k in ((SERVICE_KIND, *key), (ENDPOINTS_KIND, *key)) if k in self._objects}
        self.errors.pop(key, None)
        out: dict[tuple[str, str, str], ApiObject] = {}
        for obj in found:
            current = self._objects.get(obj.key)
            out[obj.key] = current if current is not None and current == obj else obj
        return out


class _Handler:
    """One watch's `WatchHandler`: updates the registry's indexes, then republishes what it touched."""

    def __init__(
        self, registry: KubeRegistry, which: str, replace: Callable[[list[dict[str, Any]]], None],
        upsert: Callable[[dict[str, Any]], set[Key]], delete: Callable[[dict[str, Any]], set[Key]],
    ) -> None:
        self._registry, self._which = registry, which
        self._replace, self._upsert, self._delete = replace, upsert, delete

    def replace(self, objects: list[dict[str, Any]]) -> None:
        self._replace(objects)
        if self._registry.synced.is_set():
            self._registry.publish_all()  # a re-list: what vanished meanwhile goes, in one revision
        else:
            self._registry.listed(self._which)

    def upsert(self, obj: dict[str, Any]) -> None:
        self._registry.publish(self._upsert(obj))

    def delete(self, obj: dict[str, Any]) -> None:
        self._registry.publish(self._delete(obj))
