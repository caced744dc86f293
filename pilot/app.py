"""Pilot wiring: builds every part once from PilotSettings, starts and stops them in order.

Start order: config store and sources, the first mesh build, the ADS server, then the debug
API, so that a proxy connecting at once gets config. Stop is the reverse. Everything runs on
the caller's event loop; background work is guarded (pilot.tasks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from pilot.config.files import FileSource
from pilot.config.store import ConfigStore
from pilot.credentials import CredentialIndex, with_credential_warnings
from pilot.debounce import ENDPOINT_KINDS
from pilot.debug import DebugApi
from pilot.fastpath import RoutesFastPath
from pilot.gcpolicy import release_when_quiet
from pilot.jwks import JwksFetcher
from pilot.listen import check_free
from pilot.loopwatch import LoopWatch
from pilot.metrics import PushMetrics
from pilot.model.build import build_mesh
from pilot.model.conversions import Conversions
from pilot.model.diff import endpoints_only, http_routes_only
from pilot.model.mesh import MeshSnapshot
from pilot.push import Generate, Pusher
from pilot.settings import PilotSettings
from pilot.tasks import TaskFailures, spawn
from pilot.tracing import ChangeTracker, ObservedStore, tracer_provider
from pilot.translate import generate, generate_endpoints, generate_parts, generate_routes
from pilot.translate.prepare import prepare_shared
from pilot.translate.vhds import vhds_parts
from pilot.xds.cache import SnapshotCache
from pilot.xds.secrets import SecretServer
from pilot.xds.server import AdsServer, SecureServing
from pilot.xds.status import StatusRegistry, XdsMetrics

if TYPE_CHECKING:  # the Kubernetes client is imported only by a pilot that uses it
    from kubernetes_asyncio.client import ApiClient
    from opentelemetry.sdk.trace import SpanProcessor

    from pilot.kube.leader import LeaderElection
    from pilot.kube.registry_source import KubeRegistry
    from pilot.kube.source import KubeSource

log = logging.getLogger(__name__)


def _ended(mesh: MeshSnapshot, conversions: Conversions) -> MeshSnapshot:
    """`mesh`, once `conversions` let go of what the build did not use (removed config's memory)."""
    conversions.end_build()
    return mesh


class Pilot:
    """One pilot instance. `async with Pilot(settings) as pilot:` runs it."""

    def __init__(self, settings: PilotSettings, generator: Generate = generate,
                 secure: SecureServing | None = None, *, span_processor: SpanProcessor | None = None) -> None:
        """`generator` is the translation stage; tests may wrap the real one (e.g. to make Envoy NACK).
        `secure` (from the composition root, e.g. `meshctl up` with Citadel) adds authenticated xDS on
        `settings.xds_tls_host:xds_tls_port`; without it only plaintext xDS is served. `span_processor`
        receives the traces of config changes too (tests: an in-memory exporter; see `pilot.tracing`)."""
        self.settings = settings
        self.secure = secure
        self.registry = CollectorRegistry()
        self.failures = TaskFailures(self.registry)
        xds_metrics, push_metrics = XdsMetrics(self.registry), PushMetrics(self.registry)
        # Each config change followed from ingest to the proxies: ids, traces, /debug/push_status.
        self.changes = ChangeTracker(tracer_provider(settings.otlp_endpoint, span_processor),
                                     xds_metrics=xds_metrics.istio)
        self.store: ConfigStore = ObservedStore(self.changes, push_metrics.istio, ENDPOINT_KINDS)
        self.cache = SnapshotCache()
        self.status = StatusRegistry(xds_metrics)
        self.jwks = JwksFetcher(self.store, self.registry)  # RequestAuthentication jwksUri keys, inlined
        # Gateway credentialName secrets that exist (the composition root sets `credentials.root`).
        self.credentials = CredentialIndex(self.store)
        self.secrets: SecretServer | None = None  # pilot serves them over ADS (Kubernetes with authenticated xDS)
        self.pusher = self._pusher(generator, push_metrics)
        self.ads = AdsServer(self.cache, self.status, send_timeout=settings.send_timeout_ms / 1000 or None,
                             max_connection_age=settings.max_connection_age_ms / 1000 or None,
                             write_budget=settings.write_budget_mb * 1024 * 1024 or None,
                             ack_hold=settings.ack_hold_ms / 1000 or None, vhds=settings.vhds,
                             quiet=self.pusher.quiet)  # the release waits for the writes to settle too
        self.ads.changes = self.changes
        self.files = (
            FileSource(self.store, settings.config_dir, interval=settings.file_poll_ms / 1000,
                       watch=settings.file_watch, rescan=settings.file_rescan_ms / 1000,
                       settle=settings.file_settle_ms / 1000, max_total_bytes=settings.file_max_total_mb * 2**20,
                       busy=self.pusher.quiet.busy)  # its safety sweep waits while pushes are written
            if settings.config_dir else None
        )
        self._tasks: list[asyncio.Task[None]] = []
        # A stall of the one loop everything is served from is logged with what held it (`pilot.loopwatch`).
        self.loop_watch = (LoopWatch(self.registry, threshold=settings.loop_stall_ms / 1000)
                           if settings.loop_stall_ms else None)
        self.kube: KubeSource | None = None  # mesh config from a cluster (settings.kubeconfig / kube_in_cluster)
        self._kube_registry: tuple[KubeRegistry, ApiClient] | None = None
        self._duties: dict[str, dict[str, Callable[[], Awaitable[None]]]] = {}  # lease -> name -> duty
        self.elections: dict[str, LeaderElection] = {}  # lease -> this replica's candidacy (with a cluster)
        self._web: web.AppRunner | None = None
        self.ads_port = 0
        self.xds_tls_port = 0
        self.debug_port = 0

    def _pusher(self, generator: Generate, metrics: PushMetrics) -> Pusher:
        """The pusher over this pilot's store and cache, with the fast paths when `generator` is the
        real one (they rely on how it shares parts between classes)."""
        settings = self.settings
        conversions = Conversions()  # per-object conversions reused from one build to the next
        carry = Conversions()  # generated messages reused from one mesh version to the next
        real = generator is generate
        return Pusher(
            self.store, self.cache,
            build_mesh=lambda objects: self._with_credentials(_ended(
                build_mesh(objects, settings.cluster_domain, conversions, carry, jwks=self.jwks.current(),
                           trust_domain=settings.trust_domain, root_namespace=self.root_namespace()),
                conversions)),
            # The real generator hands shared parts over as shared objects (serialized once per mesh).
            generate=generate_parts if real else generator,
            metrics=metrics,
            debounce=settings.debounce_ms / 1000,
            debounce_max=settings.debounce_max_ms / 1000,
            endpoint_debounce=settings.endpoint_debounce_ms / 1000,
            endpoints_only=endpoints_only,
            generate_endpoints=generate_endpoints,
            routes=RoutesFastPath(http_routes_only, generate_routes, vhds_parts) if real else None,
            prepare=prepare_shared if real else None,  # a full push's shared parts, off the event loop
            release_memory=release_when_quiet,
            carry=carry,
            changes=self.changes,
        )

    def root_namespace(self) -> str:
        """Istio's config root namespace: the cluster's mesh ConfigMap `rootNamespace` when pilot
        watches a cluster, else the setting (istio-system)."""
        if self.kube is not None:
            return self.kube.mesh.root_namespace
        return self.settings.root_namespace

    async def start(self) -> None:
        """Start everything; raises AddressInUseError at once, before loading config, if an address is taken."""
        s = self.settings
        check_free("xDS", s.ads_host, s.ads_port)
        if self.secure is not None:
            check_free("authenticated xDS", s.xds_tls_host, s.xds_tls_port)
        check_free("the debug API", s.debug_host, s.debug_port)
        try:
            await self._start()
        except BaseException:
            await self.stop()  # a half-started pilot leaves no listener or task behind
            raise

    async def _start(self) -> None:
        if self.files is not None:
            # On the loop: the store wakes asyncio waiters. At 1,000 files this holds the loop ~2 s,
            # before anything is served; a worker thread instead made glibc malloc keep more after
            # config spikes (session 47, reverted), so the watchdog starts after it rather than
            # report every large start as a stall.
            self.files.sync()
            self._tasks.append(spawn("config-files", self.files.run, self.failures))
        if self.loop_watch is not None:
            self.loop_watch.start()
        if self.settings.kubeconfig is not None or self.settings.kube_in_cluster:
            await self._start_kube_source()
        if self.kube is not None and self._kube_registry is None:  # the same cluster's Services and Pods
            from pilot.kube.registry_source import KubeRegistry

            self.use_kube_registry(KubeRegistry(self.store, domain=self.settings.cluster_domain,
                                                namespaces=self.kube.namespaces), self.kube.api_client)
        if self._kube_registry is not None:
            await self._start_kube_registry(*self._kube_registry)
        self._tasks.append(spawn("pusher", self.pusher.run, self.failures))
        self._start_duties()
        self._tasks.append(spawn("jwks", self.jwks.run, self.failures))
        self._tasks.append(spawn("credentials", self.credentials.run, self.failures))
        await self.pusher.ready.wait()
        s = self.settings
        self.ads_port = await self.ads.start(s.ads_host, s.ads_port)
        if self.secure is not None:
            self.xds_tls_port = await self.ads.start_secure(
                s.xds_tls_host, s.xds_tls_port, context=self.secure.context, peer_identity=self.secure.peer_identity,
                workload_account=self._workload_account, extra_handlers=self.secure.extra_handlers)
        debug = DebugApi(self.status, self.pusher, self.store, self.registry)
        self._web, self.debug_port = await debug.serve(s.debug_host, s.debug_port)
        log.info("pilot serving xDS on %s:%d, debug on %s:%d", s.ads_host, self.ads_port, s.debug_host,
                 self.debug_port)

    def use_kube_registry(self, registry: KubeRegistry, api_client: ApiClient) -> None:
        """Serve the Services and Pods of `api_client`'s cluster (`pilot.kube.registry_source`; the
        registry writes `self.store`): its watches start with pilot, which waits for their first
        lists before its first push, and connecting sidecars are matched to their Pods (and follow
        their Pod's labels while connected). Call before `start`."""
        self._kube_registry = (registry, api_client)
        self.ads.classify = registry.classify
        self.ads.pods.enabled = True
        registry.pod_listeners.append(self.ads.pod_changed)  # a relabelled Pod moves its proxies' class

    async def _start_kube_registry(self, registry: KubeRegistry, client: ApiClient) -> None:
        """Run the registry's watches; the first push waits (up to `kube_sync_timeout_ms`) for their
        first lists, so it holds the cluster's Services (Istio waits for its caches to sync too)."""
        self._tasks.append(spawn("kube-registry", lambda: registry.run(client), self.failures))
        timeout = self.settings.kube_sync_timeout_ms / 1000
        try:
            async with asyncio.timeout(timeout):
                await registry.synced.wait()
        except TimeoutError:
            log.warning("kubernetes service registry: not synced after %.0f s; serving what is known", timeout)

    async def _start_kube_source(self) -> None:
        """Mesh config from the cluster's API server (`pilot.kube.source`), beside any file source;
        the first push waits (up to `kube_sync_timeout_ms`) for its first lists, as Istio waits for sync."""
        from pilot.kube.secrets import SecretIndex, SubjectAccessReviews
        from pilot.kube.source import KubeSource

        s = self.settings
        self.kube = await KubeSource.connect(self.store, kubeconfig=s.kubeconfig, in_cluster=s.kube_in_cluster,
                                             mesh_namespace=s.kube_mesh_namespace)
        self._tasks.append(spawn("config-kubernetes", self.kube.run, self.failures))
        # Gateway credentialName secrets: warnings, and (with authenticated xDS) served to gateways over ADS.
        self.secrets = None if self.secure is None else SecretServer(SubjectAccessReviews(self.kube.api_client))
        self.ads.secrets = self.secrets
        self.credentials = SecretIndex(self.store, self.kube.api_client, self.secrets)
        if not await self.kube.wait_synced(s.kube_sync_timeout_ms / 1000):
            log.warning("kubernetes source: not synced after %d ms; serving what is known", s.kube_sync_timeout_ms)

    def _with_credentials(self, mesh: MeshSnapshot) -> MeshSnapshot:
        """`mesh` with the missing-secret warnings, and told whether pilot serves gateway certificates."""
        mesh = with_credential_warnings(mesh, self.credentials.current())
        return dataclasses.replace(mesh, credentials_over_ads=True) if self.secrets is not None else mesh

    def lead(self, lease: str, name: str, duty: Callable[[], Awaitable[None]]) -> None:
        """Run `duty` (a guarded task) only while this replica holds `lease` in the control-plane
        namespace (`pilot.kube.leader`); without a cluster (one pilot) or with `leader_election`
        off it always runs. Call before `start`."""
        self._duties.setdefault(lease, {})[name] = duty

    def _start_duties(self) -> None:
        """With a cluster: the status writer, then one election per lease that has duties."""
        if self.kube is None and not self._duties:
            return
        from pilot.kube import leader
        from pilot.kube.status import StatusMetrics, StatusWriter

        s = self.settings
        if self.kube is not None and s.kube_status:
            writer = StatusWriter(self.kube.api_client, self.kube, self.pusher, StatusMetrics(self.registry),
                                  qps=s.status_qps, burst=s.status_burst)
            self.lead(leader.STATUS_LEASE, "status", writer.run)
        timing = leader.LeaseTiming(s.lease_duration_ms / 1000, s.lease_renew_deadline_ms / 1000,
                                    s.lease_retry_period_ms / 1000)
        metrics = leader.LeaderMetrics(self.registry)
        identity = leader.holder_identity(s.pod_name, socket.gethostname())
        for lease, duties in sorted(self._duties.items()):
            group = leader.Duties(duties, self.failures)
            if self.kube is None or not s.leader_election:
                self._tasks.append(spawn(f"duties {lease}", group.run_always, self.failures))
                continue
            election = leader.LeaderElection(self.kube.api_client, s.kube_mesh_namespace, lease, identity,
                                             timing=timing, metrics=metrics)
            self.elections[lease] = election
            self._tasks.append(spawn(f"leader-election {lease}", leader.campaign(election, group), self.failures))

    def _workload_account(self, namespace: str, name: str) -> str | None:
        """The service account a WorkloadEntry runs as ("default" when unset); None if there is none."""
        mesh = self.pusher.mesh
        found = mesh.workload(namespace, name) if mesh is not None else None
        return None if found is None else (found.service_account or "default")

    async def stop(self) -> None:
        await self.ads.stop(grace=0.5)
        if self._web is not None:
            await self._web.cleanup()
            self._web = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.pusher.quiet.close()  # no release once stopped (ending calls still report)
        self._tasks.clear()
        if self.kube is not None:
            await self.kube.close()
            self.kube = None
        provider = self.changes.close()
        if provider is not None:  # the last change's trace, flushed to the collector
            await asyncio.to_thread(provider.shutdown)
        if self.loop_watch is not None:
            self.loop_watch.stop()

    async def __aenter__(self) -> Pilot:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def ads_address(self) -> str:
        return f"{self.settings.ads_host}:{self.ads_port}"

    @property
    def xds_tls_address(self) -> str:
        return f"{self.settings.xds_tls_host}:{self.xds_tls_port}"

    @property
    def debug_address(self) -> str:
        return f"{self.settings.debug_host}:{self.debug_port}"

