"""Pilot's HTTP monitoring and debug API (aiohttp), port 15014 by Istio convention.

Read-only views of live state: `/debug/syncz` (per-proxy xDS status and Envoy admin address),
`/debug/adsz` (Istio's: subscriptions and versions per proxy), `/debug/push_status` (the last push,
`pilot.tracing`), `/debug/version`, `/debug/configz`
(accepted and rejected config), `/debug/workload/{ns}/{name}`, `/debug/config_dump`,
`/metrics` (Prometheus, Istio's names: `pilot.metrics`) and `/ready`; `/debug/` lists them. A request missing a required
parameter gets 400 naming it. Handlers only read; they run on pilot's event loop.
"""

from __future__ import annotations

import errno
import gc
import importlib.metadata
import os
import sys
import tracemalloc
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from google.protobuf import any_pb2, json_format
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pilot import distribution, gcpolicy
from pilot.bootstrap import ADMIN_PORT
from pilot.listen import AddressInUseError, check_free
from pilot.metrics import exposition
from pilot.model.proxy import META_BIND_ADDRESS
from pilot.push import Pusher
from pilot.xds import typeurls
from pilot.xds.status import StatusRegistry


class DebugApi:
    def __init__(self, status: StatusRegistry, pusher: Pusher, store: Any, registry: CollectorRegistry) -> None:
        self.status = status
        self.pusher = pusher
        self.store = store
        self.registry = registry

    def endpoints(self) -> list[tuple[str, Any, str]]:
        """(path, handler, one line on what it shows): the routes, and the `/debug/` index."""
        return [
            ("/debug/syncz", self.syncz, "every connected proxy and its xDS state per type (SYNCED/STALE/NACKED)"),
            ("/debug/adsz", self.adsz, "connected proxies (Istio's adsz): subscriptions and versions per type"),
            ("/debug/push_status", self.push_status,
             "the last push: change id, trigger, kinds, durations, classes, proxies, responses per type"),
            ("/debug/configz", self.configz, "config objects in force, rejected documents and why, mesh warnings"),
            ("/debug/config_dump?proxy=ID", self.config_dump, "the xDS resources pilot serves to one connected proxy"),
            ("/debug/config_distribution?kind=K&namespace=NS&name=N", self.config_distribution,
             "one config object's revision and which affected proxies ACKed it (meshctl wait)"),
            ("/debug/workload/NAMESPACE/NAME", self.workload, "one WorkloadEntry as the mesh sees it"),
            ("/debug/version", self.version, "pilot's version, Python and Envoy API versions (meshctl version)"),
            ("/debug/memz?top=N&trim=1", self.memz, "where pilot's memory is; trim=1 hands free memory back first"),
            ("/metrics", self.metrics, "Prometheus metrics"),
            ("/ready", self.ready, "200 once the first mesh is built"),
        ]

    def app(self) -> web.Application:
        app = web.Application()
        for path, handler, _ in self.endpoints():
            route = path.split("?")[0].replace("NAMESPACE", "{namespace}").replace("NAME", "{name}")
            app.router.add_get(route, handler)
        app.router.add_get("/debug", self.index)
        app.router.add_get("/debug/", self.index)
        app.router.add_get("/debug/{unknown:.*}", self.unknown)
        return app

    async def serve(self, host: str, port: int) -> tuple[web.AppRunner, int]:
        """Listen on host:port alone (0 = any free port); returns the runner and the bound port.

        Raises AddressInUseError, leaving nothing running, when another process has the address.
        """
        what = "the debug API"
        check_free(what, host, port)
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_port=False).start()
        except OSError as exc:
            await runner.cleanup()
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUseError(what, host, port) from None
            raise
        return runner, int(runner.addresses[0][1])

    async def index(self, request: web.Request) -> web.Response:
        """What each debug endpoint shows, one line each."""
        return web.Response(text=self._index_text())

    async def unknown(self, request: web.Request) -> web.Response:
        raise web.HTTPNotFound(text=f"no debug endpoint {request.path}; these exist:\n{self._index_text()}")

    def _index_text(self) -> str:
        rows = [(path, text) for path, _, text in self.endpoints()]
        width = max(len(path) for path, _ in rows)
        return "".join(f"{path:<{width}}  {text}\n" for path, text in rows)

    async def syncz(self, request: web.Request) -> web.Response:
        """Each row also names the proxy's Envoy admin (`admin`, host:port) when its node metadata
        says where it binds (local-mesh sidecars), so `meshctl proxy-config` can find it; else null."""
        admins = {s.identity.node_id: _admin_address(s.identity.metadata) for s in self.status.streams()}
        rows = self.status.syncz()
        for row in rows:
            row["admin"] = admins.get(row["proxy"])
        return web.json_response(rows)

    async def adsz(self, request: web.Request) -> web.Response:
        """Istio's `/debug/adsz` shape: `totalClients` and `clients`, each with its connection id, node,
        address, connect time, metadata and, per type it subscribed to, the names, versions and nonce."""
        clients = []
        for st in sorted(self.status.streams(), key=lambda s: (s.identity.node_id, s.stream_id)):
            watches = {}
            for type_url, ts in sorted(st.types.items()):
                watches[type_url] = {
                    "type": typeurls.short_name(type_url),
                    "resourceNames": _subscribed(st.session, type_url),
                    "versionSent": ts.sent_version, "versionAcked": ts.acked_version, "nonceSent": ts.sent_nonce,
                    "state": ts.state().value,
                }
            clients.append({
                "connectionId": f"{st.identity.node_id}-{st.stream_id}", "node": st.identity.node_id,
                "address": st.peer, "protocol": st.protocol, "connectedAt": st.connected_at,
                "proxyClass": st.identity.proxy_class.describe(),
                "metadata": {k: v for k, v in st.identity.metadata.items() if isinstance(v, str | int | float | bool)},
                "watches": watches,
            })
        return web.json_response({"totalClients": len(clients), "clients": clients})

    async def push_status(self, request: web.Request) -> web.Response:
        """The last push (or the one under way): see `pilot.tracing.ChangeTracker.push_status`."""
        return web.json_response(self.pusher.changes.push_status())

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"component": "pilot", "version": _pilot_version(),
                                  "python": sys.version.split()[0], "xds_api": "v3"})

    async def configz(self, request: web.Request) -> web.Response:
        mesh = self.pusher.mesh
        body = {
            **self.store.debug_dump(),
            "mesh_warnings": list(getattr(mesh, "warnings", ())),
            "generate_errors": {k.describe(): v for k, v in sorted(self.pusher.errors.items())},
        }
        return web.json_response(body)

    async def config_distribution(self, request: web.Request) -> web.Response:
        """One object as pilot holds it (revision, generation, content hash, or why it was rejected)
        and, per affected proxy, whether it ACKed config including it (see `pilot.distribution`)."""
        missing = [p for p in ("kind", "name") if not request.query.get(p)]
        if missing:
            raise web.HTTPBadRequest(text=f"missing query parameter {missing[0]!r}: as in "
                                          "/debug/config_distribution?kind=VirtualService&namespace=default&name=N\n")
        key = (request.query["kind"], request.query.get("namespace") or "default", request.query["name"])
        return web.json_response(distribution_report(self.store, self.pusher, self.status, key))

    async def workload(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        found = self.pusher.mesh.workload(ns, name) if self.pusher.mesh is not None else None
        if found is None:
            raise web.HTTPNotFound(text=f"no WorkloadEntry {ns}/{name} in the mesh config\n")
        return web.json_response({
            "namespace": ns,
            "name": name,
            "address": found.address,
            "labels": dict(found.labels),
            "service_account": found.service_account,
            "ports": dict(found.ports),
        })

    async def config_dump(self, request: web.Request) -> web.Response:
        """The xDS resources pilot serves to one connected proxy (`?proxy=<node id>`)."""
        proxy = request.query.get("proxy", "")
        if not proxy:
            raise web.HTTPBadRequest(text="missing query parameter 'proxy': the node id of a connected proxy, "
                                          f"as in /debug/config_dump?proxy=ID; {self._connected()}\n")
        streams = [s for s in self.status.streams() if s.identity.node_id == proxy]
        if not streams:
            raise web.HTTPNotFound(text=f"proxy {proxy!r} is not connected; {self._connected()}\n")
        snapshot = self.pusher.cache.get(streams[0].identity.proxy_class)
        if snapshot is None:
            raise web.HTTPNotFound(text=f"no config generated yet for {proxy!r}\n")
        dump: dict[str, Any] = {}
        for type_url in typeurls.PUSH_ORDER:
            ts = snapshot.of(type_url)
            dump[typeurls.short_name(type_url)] = {
                "version": ts.version,
                "resources": [_json(r.type_url, r.value) for r in ts.values()],
            }
        return web.json_response(dump)

    async def memz(self, request: web.Request) -> web.Response:
        """Where pilot's memory is: the top allocation sites when started with PYTHONTRACEMALLOC=N,
        else live objects counted by type (a full gc walk: slow on a big heap, for debugging only)."""
        top = request.query.get("top", "25")
        if not (top.isascii() and top.isdigit()):
            raise web.HTTPBadRequest(text=f"query parameter 'top' must be a whole number, not {top!r}\n")
        allocator = gcpolicy.allocator_in_use(os.environ)
        trimmed = release_free_memory(allocator) if request.query.get("trim") else ""
        return web.Response(text=f"allocator: {allocator}\n" + trimmed + memory_report(int(top)))

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=exposition(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def ready(self, request: web.Request) -> web.Response:
        if not self.pusher.ready.is_set():
            raise web.HTTPServiceUnavailable(text="mesh not built yet\n")
        return web.Response(text="ready\n")

    def _connected(self, most: int = 20) -> str:
        """The node ids a request may name, for error messages (at most `most` of them)."""
        ids = sorted({s.identity.node_id for s in self.status.streams()})
        if not ids:
            return "no proxy is connected"
        more = f" and {len(ids) - most} more (see /debug/syncz)" if len(ids) > most else ""
        return "connected: " + ", ".join(ids[:most]) + more


def distribution_report(store: Any, pusher: Pusher, status: StatusRegistry,
                        key: tuple[str, str, str]) -> dict[str, Any]:
    """`/debug/config_distribution` for one store key: `found`, `not found`, `rejected` (no
    version of it serves) or `deleted` (removed at `revision`), with the distribution of the
    version that serves, or of the removal."""
    kind, namespace, name = key
    body: dict[str, Any] = {"kind": kind, "namespace": namespace, "name": name}
    rejected = store.rejection(key)
    if rejected is not None:
        body["rejected"] = rejected[0]
    obj, arrival = store.get(*key), store.arrival(key)
    if obj is not None and arrival is not None:
        meta = obj.metadata
        body.update(status="found", revision=arrival[0], arrived_at=arrival[1], generation=meta.generation,
                    resource_version=meta.resource_version, content_hash=distribution.content_hash(obj))
        change = arrival
    else:
        removed = store.removal(key) if obj is None else None
        if removed is None:
            body["status"] = "rejected" if rejected is not None else "not found"
            return body
        # Gone: its removal is distributed as an arrival is (the proxies it affected ACK it).
        body.update(status="deleted", revision=removed[0], removed_at=removed[1])
        change = removed
    body.update(distribution.distribution(change[0], change[1], pusher.built_revision, status.streams(),
                                          status.departed, pusher.class_changes, pusher.errors))
    return body


def _subscribed(session: Any, type_url: str) -> list[str] | str:
    """The names a stream subscribed to of a type, or "*" for a wildcard subscription."""
    state = getattr(session, "types", {}).get(type_url)
    names = getattr(state, "names", None)
    if names is None or (getattr(state, "wildcard", False) and not names):
        return "*"
    return sorted(names)


def _admin_address(metadata: Mapping[str, Any]) -> str | None:
    """Where a proxy's Envoy admin listens: its bind address (local mesh) on the admin port."""
    bind = metadata.get(META_BIND_ADDRESS)
    if not bind:
        return None
    return f"[{bind}]:{ADMIN_PORT}" if ":" in str(bind) else f"{bind}:{ADMIN_PORT}"


def _pilot_version() -> str:
    try:
        return importlib.metadata.version("meshctl")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _json(type_url: str, value: bytes) -> dict[str, Any]:
    msg = any_pb2.Any(type_url=type_url, value=value)
    out: dict[str, Any] = json_format.MessageToDict(msg)
    return out


def memory_report(top: int) -> str:
    """Python heap by allocation site (tracemalloc) or by object type; C allocations are not seen."""
    if tracemalloc.is_tracing():
        snap = tracemalloc.take_snapshot()
        stats = snap.statistics("traceback")
        total = sum(s.size for s in stats)
        lines = [f"tracemalloc: {total / 2**20:.1f} MiB in {sum(s.count for s in stats)} blocks"]
        for stat in stats[:top]:
            lines.append(f"{stat.size / 2**20:9.2f} MiB {stat.count:9d} blocks")
            lines += [f"    {frame.filename}:{frame.lineno}" for frame in stat.traceback[:8]]
        return "\n".join(lines) + "\n"
    counts: dict[str, list[int]] = {}
    for obj in gc.get_objects():
        entry = counts.setdefault(type(obj).__qualname__, [0, 0])
        entry[0] += 1
        entry[1] += sys.getsizeof(obj)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1][1])[:top]
    lines = ["objects tracked by gc, by type (shallow sizes; start pilot with PYTHONTRACEMALLOC=8 for sites)"]
    lines += [f"{size / 2**20:9.2f} MiB {count:9d} {name}" for name, (count, size) in ranked]
    return "\n".join(lines) + "\n"


def release_free_memory(allocator: str) -> str:
    """Return free heap pages to the OS now (see `pilot.gcpolicy.release_free_memory`); a debug aid.
    `allocator` is `gcpolicy.allocator_in_use`'s answer, which names the release in the report."""
    before = _rss_mb()
    if not gcpolicy.release_free_memory():
        return "no release: neither jemalloc nor glibc is the allocator\n"
    how = "jemalloc purge" if allocator == "jemalloc" else "malloc_trim"
    return f"{how}: RSS {before:.0f} MB -> {_rss_mb():.0f} MB\n"


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
