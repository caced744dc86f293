"""The Kubernetes config source: Istio objects from the API server into the ConfigStore.

`KubeSource` watches every mesh kind pilot parses (networking.istio.io and security.istio.io,
each at the version API discovery prefers), the Namespaces (for MeshConfig `discoverySelectors`)
and the mesh config map. Each object is parsed by `pilot.api.parse_object`, the function the
file source uses, so an object reads and fails the same from either source; an object that fails
is reported in the store's `rejected` list and, if the store held an earlier valid version of
it, that version keeps serving (the store's rule). Objects of namespaces the selectors leave
out are kept here, unpublished, so labelling a namespace brings them in without a re-list.
Kinds whose CRD is not installed are looked for again every `discovery_interval`.

Concurrency: `run` is one task holding the watches (one task each); every handler runs on the
event loop and writes the store synchronously. Cost: an event parses one object and writes
one store key; a re-list, a namespace membership or selector change, or an event that
changes which objects are rejected rewrites the source's whole content in the store (the
store's `replace_source`: one identity check per object).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes_asyncio.client import ApiClient

from pilot.api import ApiError, ApiObject, parse_object
from pilot.api.parse import GROUP, KINDS, VERSIONS
from pilot.api.security_kinds import SECURITY_GROUP, SECURITY_KINDS, SECURITY_VERSIONS
from pilot.config.documents import DocumentError
from pilot.config.store import SERVING_PREVIOUS, ConfigStore, Key
from pilot.kube.client import make_client
from pilot.kube.discovery import served_kinds
from pilot.kube.meshconfig import CONFIGMAP_NAME, DEFAULT_NAMESPACE, MeshConfig, MeshConfigHandler
from pilot.kube.namespaces import NamespaceFilter
from pilot.kube.watch import Resource, Watch, backoff_delay

log = logging.getLogger(__name__)

SOURCE_ID = "kubernetes"
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
# group -> (kinds pilot parses, versions it accepts)
MESH_GROUPS = {GROUP: (frozenset(KINDS), VERSIONS), SECURITY_GROUP: (frozenset(SECURITY_KINDS), SECURITY_VERSIONS)}


@dataclass(frozen=True)
class _Entry:
    """What one Kubernetes object became: a valid object or the error that rejected it."""

    version: str  # metadata.resourceVersion
    namespace: str
    obj: ApiObject | None
    error: DocumentError | None


def document_name(kind: str, namespace: str, name: str) -> str:
    """How a rejection names the Kubernetes object it came from (the file source names a file)."""
    return f"{SOURCE_ID}:{kind}/{namespace}/{name}"


def convert(doc: dict[str, Any]) -> tuple[ApiObject | None, DocumentError | None]:
    """One Kubernetes object parsed exactly as a file's document; the error names kind/namespace/name."""
    meta = doc.get("metadata") or {}
    kind, namespace, name = str(doc.get("kind")), str(meta.get("namespace", "")), str(meta.get("name", ""))
    try:
        return parse_object(doc), None
    except ApiError as exc:
        return None, DocumentError(document_name(kind, namespace, name), 0, exc.kind, exc.namespace, exc.name,
                                   str(exc))
    except RecursionError:
        return None, DocumentError(document_name(kind, namespace, name), 0, kind, namespace, name,
                                   "document is nested too deeply")


class _KindHandler:
    """`WatchHandler` of one mesh kind: parses objects and hands them to the source."""

    def __init__(self, source: KubeSource, kind: str) -> None:
        self.source, self.kind = source, kind

    def replace(self, objects: list[dict[str, Any]]) -> None:
        entries = self.source.entries
        old = {key: e for key, e in entries.items() if key[0] == self.kind}
        new = {}
        for doc in objects:
            key, version = _identity(self.kind, doc)
            known = old.get(key)
            new[key] = known if known is not None and known.version == version else _entry(version, doc)
        for key in old.keys() - new.keys():
            del entries[key]
        entries.update(new)
        self.source.publish()

    def upsert(self, obj: dict[str, Any]) -> None:
        key, version = _identity(self.kind, obj)
        known = self.source.entries.get(key)
        if known is not None and known.version == version:
            return  # a repeat after a resumed watch: nothing new
        entry = _entry(version, obj)
        self.source.entries[key] = entry
        self.source.publish_key(key, known, entry)

    def delete(self, obj: dict[str, Any]) -> None:
        key, _ = _identity(self.kind, obj)
        known = self.source.entries.pop(key, None)
        if known is not None:
            self.source.publish_key(key, known, None)


def _identity(kind: str, doc: dict[str, Any]) -> tuple[Key, str]:
    meta = doc.get("metadata") or {}
    return (kind, str(meta.get("namespace", "")), str(meta.get("name", ""))), str(meta.get("resourceVersion", ""))


def _entry(version: str, doc: dict[str, Any]) -> _Entry:
    obj, error = convert(doc)
    return _Entry(version, str((doc.get("metadata") or {}).get("namespace", "")), obj, error)


class KubeSource:
    """Mesh objects of one cluster, kept in `store` under `source_id` (see the module docstring)."""

    def __init__(
        self,
        store: ConfigStore,
        api_client: ApiClient,
        *,
        source_id: str = SOURCE_ID,
        mesh_namespace: str = DEFAULT_NAMESPACE,
        mesh_configmap: str = CONFIGMAP_NAME,
        discovery_interval: float = 5.0,
        watch_options: Mapping[str, Any] | None = None,
        on_mesh_change: Callable[[MeshConfig], None] | None = None,
    ) -> None:
        """`watch_options` are passed to every `Watch` (timeouts, backoff: tests shorten them);
        `on_mesh_change` is called after the mesh config changed and the objects were re-filtered."""
        self.store = store
        self.api_client = api_client
        self.source_id = source_id
        self.discovery_interval = discovery_interval
        self.watch_options = dict(watch_options or {})
        self.on_mesh_change = on_mesh_change
        self.entries: dict[Key, _Entry] = {}  # every object watched, selected namespace or not
        self.namespaces = NamespaceFilter()  # shared with the service registry
        self.namespaces.subscribe(lambda added, removed: self.publish())
        self.mesh_handler = MeshConfigHandler(self._mesh_changed, namespace=mesh_namespace, name=mesh_configmap)
        self.watches: dict[str, Watch] = {}
        self.synced = asyncio.Event()  # namespaces, mesh config and every kind found at first discovery listed
        self._ready = False  # publish nothing until namespaces and the mesh config are known
        self._published_errors: dict[Key, DocumentError] = {}

    @classmethod
    async def connect(cls, store: ConfigStore, *, kubeconfig: Path | None = None, in_cluster: bool = False,
                      **options: Any) -> KubeSource:
        """A source with its own API client (`pilot.kube.client.make_client`); `close` closes it."""
        return cls(store, await make_client(kubeconfig, in_cluster=in_cluster), **options)

    async def close(self) -> None:
        """Close the API client (after the `run` task ended)."""
        await self.api_client.close()

    async def wait_synced(self, timeout: float) -> bool:
        """Wait until the first lists are in the store (see `synced`); False if `timeout` passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self.synced.wait()
        except TimeoutError:
            return False
        return True

    @property
    def mesh(self) -> MeshConfig:
        """The mesh config now in force (defaults until the ConfigMap is read)."""
        return self.mesh_handler.current

    def _watch(self, resource: Resource, handler: Any, **kwargs: Any) -> Watch:
        return Watch(self.api_client, resource, handler, **kwargs, **self.watch_options)

    async def run(self) -> None:
        """Watch until cancelled (every watch retries by itself; see `pilot.kube.watch`)."""
        ns_watch = self._watch(NAMESPACES, self.namespaces)
        mesh_watch = self._watch(CONFIGMAPS, self.mesh_handler, namespace=self.mesh_handler.namespace,
                                 field_selector=f"metadata.name={self.mesh_handler.name}")
        self.watches.update({"Namespace": ns_watch, "MeshConfig": mesh_watch})
        async with asyncio.TaskGroup() as group:
            group.create_task(ns_watch.run())
            group.create_task(mesh_watch.run())
            await ns_watch.synced.wait()
            await mesh_watch.synced.wait()
            self._ready = True
            self.publish()
            await self._discover(group)

    async def _discover(self, group: asyncio.TaskGroup) -> None:
        """Start a watch for each mesh kind as the API server begins to serve it; then stop looking."""
        missing = {g: set(kinds) for g, (kinds, _) in MESH_GROUPS.items()}
        attempt = 0
        while any(missing.values()):
            started: list[Watch] = []
            try:
                for api_group, kinds in missing.items():
                    found = await served_kinds(self.api_client, api_group, kinds, MESH_GROUPS[api_group][1])
                    for kind, resource in sorted(found.items()):
                        watch = self._watch(resource, _KindHandler(self, kind))
                        self.watches[kind] = watch
                        started.append(watch)
                        group.create_task(watch.run())
                    kinds.difference_update(found)
                attempt = 0
            except Exception as exc:  # the API server is away: try again with backoff
                log.warning("kubernetes source: API discovery failed: %s", exc)
                attempt += 1
            if not self.synced.is_set():
                await asyncio.gather(*(w.synced.wait() for w in started))
                if attempt == 0:
                    self.synced.set()
                    absent = sorted(k for kinds in missing.values() for k in kinds)
                    if absent:
                        log.warning("kubernetes source: kinds not served (CRD not installed?), looked for again "
                                    "every %.0f s: %s", self.discovery_interval, ", ".join(absent))
            if any(missing.values()):
                await asyncio.sleep(self.discovery_interval if attempt == 0 else
                                    backoff_delay(attempt, 0.5, self.discovery_interval))

    def _mesh_changed(self, config: MeshConfig) -> None:
        log.info("kubernetes source: mesh config now %s", config.model_dump(by_alias=True))
        self.namespaces.set_selectors(config.discovery_selectors)  # re-publishes if membership changed
        if self.on_mesh_change is not None:
            self.on_mesh_change(config)

    def publish_key(self, key: Key, old: _Entry | None, new: _Entry | None) -> None:
        """One object changed: write just its key, unless rejections change (then everything)."""
        if not self._ready:
            return
        if (old is not None and old.error is not None) or (new is not None and new.error is not None):
            self.publish()
            return
        if not self.namespaces.allows(key[1]):
            return
        if new is not None and new.obj is not None:
            self.store.apply(new.obj, self.source_id)
        else:
            self.store.delete(*key, source_id=self.source_id)

    def publish(self) -> None:
        """Make the store's content for this source exactly the selected objects and rejections."""
        if not self._ready:
            return
        objects: dict[Key, ApiObject] = {}
        errors: list[DocumentError] = []
        allows = self.namespaces.allows
        for key, entry in self.entries.items():
            if not allows(entry.namespace):
                continue
            if entry.obj is not None:
                objects[key] = entry.obj
            elif entry.error is not None:
                errors.append(entry.error)
        errors.sort()
        self.store.replace_source(self.source_id, objects, errors)
        self._report(errors)

    def _report(self, errors: Iterable[DocumentError]) -> None:
        """Log each new rejection once, saying whether the previous version keeps serving."""
        now = {err.key or (err.file, "", ""): err for err in errors}
        previous = self.store.serving_previous(self.source_id)
        for key, err in now.items():
            if self._published_errors.get(key) != err:
                kept = err.key is not None and previous.get(err.key) == err
                log.warning("kubernetes source: rejected %s%s", err.message, f"; {SERVING_PREVIOUS}" if kept else "")
        self._published_errors = now
