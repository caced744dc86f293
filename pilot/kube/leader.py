"""Leader election through a `coordination.k8s.io/v1` Lease, for pilot's singleton duties.

Several pilot replicas serve xDS side by side; a few duties must run in one of them only (status
writes, CA root rotation). Each duty group has a Lease in the control-plane namespace (Istio's
names: `istio-status-leader` for status); the replica whose identity is the Lease's
`holderIdentity` leads. The protocol is client-go's, with Istio's timing (a 30 s lease, renewed
within 15 s, tried every 7.5 s):

- A candidate reads the Lease every `retry_period` (with up to 20 % jitter). It takes the Lease
  when there is none (create), when its holder is empty (released), or when the record has not
  changed for `leaseDurationSeconds` as timed by the candidate's own monotonic clock (never by
  the timestamps another replica wrote, so clock skew between machines does not matter).
- Every write carries the `resourceVersion` last read (optimistic concurrency): of two
  candidates racing for a free Lease, the API server accepts one and answers 409 to the other.
- The leader renews every `retry_period`. If no renewal succeeded for `renew_deadline` (the API
  server is away) or it sees another holder, it stops its duties and competes again. Since
  `renew_deadline` < `lease_duration`, its duties stop before anyone else may take over.
- On a clean shutdown the leader stops its duties, then releases the Lease (empty holder, one
  second duration), so a successor takes over at its next try instead of after the lease
  duration. A killed leader is replaced once its Lease expires.

Concurrency: `run` is one task on the event loop; it awaits `on_started` / `on_stopped`, so a
duty is fully stopped before the Lease is released or given up. Cost: one GET and at most one
write per candidate per `retry_period`, one write per renewal (the leader writes from its cached
record, reading again only after a conflict).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient
from prometheus_client import CollectorRegistry, Counter, Gauge

from pilot.kube.retry import RETRIES, call_api
from pilot.tasks import TaskFailures, spawn

log = logging.getLogger(__name__)

STATUS_LEASE = "istio-status-leader"  # Istio's lock for writing status to mesh objects
# Istio's self-signed root rotator has no lock (it updates istio-ca-secret with resourceVersion checks);
# meshctl's CA keeps its roots per replica, so one replica, the holder of this Lease, rotates.
ROOT_ROTATION_LEASE = "meshctl-ca-root-rotation"
JITTER = 1.2  # client-go's jitter factor on the retry period
Callback = Callable[[], Awaitable[None]]


class KubeRequestError(Exception):
    """A request to the API server failed: names the method, path and the server's answer."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


async def api_request(api_client: ApiClient, method: str, path: str, body: Mapping[str, Any] | None = None, *,
                      content_type: str = "application/json", timeout: float = 10.0,
                      retries: int = RETRIES) -> tuple[int, Any]:
    """One JSON request through `api_client` (its credentials); (status, decoded body). Never raises
    for an HTTP status: callers decide what 404 or 409 mean; `KubeRequestError` for no answer.

    An answer asking to be tried again (429, or 5xx with Retry-After: API Priority and Fairness
    shedding load, storage initializing) is sent again after the time it names, capped, at most
    `retries` more times, as client-go does (`pilot.kube.retry`); the last answer is returned. The
    writes that go through here carry a resourceVersion (or create), so one that did apply before
    an error answer comes back as 409, never as a second write. Callers bound the total with their
    own timeouts (the leader's renewals: `asyncio.timeout`)."""
    try:
        status, raw = await call_api(api_client, method, path, body=dict(body) if body is not None else None,
                                     content_type=content_type, timeout=timeout, retries=retries)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise KubeRequestError(f"{method} {path}: no answer from the API server: {exc!r}") from exc
    try:
        decoded = json.loads(raw) if raw else None
    except ValueError:
        decoded = raw[:300].decode(errors="replace")
    return status, decoded


@dataclass(frozen=True)
class LeaseTiming:
    """client-go's three durations, in seconds (defaults: Istio's 30 s TTL, TTL/2, TTL/4)."""

    duration: float = 30.0
    renew_deadline: float = 15.0
    retry_period: float = 7.5

    def __post_init__(self) -> None:
        if not self.duration > self.renew_deadline > self.retry_period * JITTER > 0:
            raise ValueError(f"lease timing: need duration ({self.duration} s) > renew_deadline "
                             f"({self.renew_deadline} s) > {JITTER} x retry_period ({self.retry_period} s) > 0")


def holder_identity(pod_name: str, hostname: str, token: str | None = None) -> str:
    """Who this replica is in the Lease: its pod name (unique in the namespace), else the host
    name plus a random suffix (two pilots on one host must differ)."""
    return pod_name or f"{hostname or 'pilot'}-{token or secrets.token_hex(4)}"


def micro_time(now: datetime) -> str:
    """A Lease timestamp (Kubernetes MicroTime: RFC 3339, microseconds, UTC)."""
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderMetrics:
    """`pilot_leader{lease}` (1 while leading) and `pilot_leader_changes_total{lease}` on pilot's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.leading = Gauge("pilot_leader", "1 while this replica holds the lease", ["lease"], registry=registry)
        self.changes = Counter("pilot_leader_changes", "times this replica started or stopped leading", ["lease"],
                               registry=registry)
        self.errors = Counter("pilot_leader_errors", "failed lease reads or writes", ["lease"], registry=registry)


class LeaderElection:
    """One Lease, competed for by this replica (see the module docstring)."""

    def __init__(self, api_client: ApiClient, namespace: str, name: str, identity: str, *,
                 timing: LeaseTiming | None = None, metrics: LeaderMetrics | None = None,
                 wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.api_client = api_client
        self.namespace, self.name, self.identity = namespace, name, identity
        self.timing = timing or LeaseTiming()
        self.metrics = metrics
        self.wall_clock = wall_clock
        self.is_leader = False
        self._lease: dict[str, Any] | None = None  # the record last read or written
        self._observed_at = 0.0  # monotonic time the record last changed, as seen here
        self._last_problem: str | None = None

    @property
    def path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"

    @property
    def holder(self) -> str:
        """The holder identity in the record last seen ("" when free or unknown)."""
        return str(((self._lease or {}).get("spec") or {}).get("holderIdentity") or "")

    async def run(self, on_started: Callback, on_stopped: Callback) -> None:
        """Compete for the Lease until cancelled: `on_started` when it is won, `on_stopped` when it
        is lost or the task is cancelled (then the Lease is released)."""
        try:
            while True:
                await self._acquire()
                self._lead(True)
                try:
                    await on_started()
                    await self._hold()
                finally:
                    self._lead(False)
                    await on_stopped()
        finally:
            await self._release()

    def _lead(self, leading: bool) -> None:
        if leading != self.is_leader:
            log.info("leader election: %s %s lease %s/%s", self.identity, "took" if leading else "gave up",
                     self.namespace, self.name)
            if self.metrics is not None:
                self.metrics.leading.labels(self.name).set(1 if leading else 0)
                self.metrics.changes.labels(self.name).inc()
        self.is_leader = leading

    async def _acquire(self) -> None:
        """Return once this replica holds the Lease."""
        while True:
            if await self._attempt(self.timing.renew_deadline):
                return
            await asyncio.sleep(self.timing.retry_period * (1 + random.random() * (JITTER - 1)))

    async def _hold(self) -> None:
        """Renew until a renewal has failed for `renew_deadline` or another holder appears."""
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(self.timing.retry_period)
            left = renewed + self.timing.renew_deadline - loop.time()
            if left > 0 and await self._attempt(left):
                renewed = loop.time()
            elif self.holder not in ("", self.identity):
                log.warning("leader election: lease %s/%s taken by %s", self.namespace, self.name, self.holder)
                return
            elif loop.time() - renewed >= self.timing.renew_deadline:
                log.warning("leader election: could not renew lease %s/%s for %.1f s", self.namespace, self.name,
                            self.timing.renew_deadline)
                return

    async def _attempt(self, timeout: float) -> bool:
        """One try to take or renew the Lease within `timeout` seconds; True if held now."""
        try:
            async with asyncio.timeout(timeout):
                held = await self._try_acquire_or_renew()
        except (KubeRequestError, TimeoutError) as exc:
            if self.metrics is not None:
                self.metrics.errors.labels(self.name).inc()
            problem = str(exc) or "timed out"
            # Logged when it changes (a missing namespace would otherwise log every retry period).
            level = logging.WARNING if problem != self._last_problem else logging.DEBUG
            log.log(level, "leader election: lease %s/%s: %s", self.namespace, self.name, problem)
            self._last_problem = problem
            return False
        self._last_problem = None
        return held

    async def _try_acquire_or_renew(self) -> bool:
        now = self.wall_clock()
        if self.is_leader and self._lease is not None:  # fast path: renew from the cached record
            status, body = await self._write("PUT", self._record(self._lease, now))
            if status == 200:
                self._observe(body)
                return True
        status, body = await api_request(self.api_client, "GET", self.path)
        if status == 404:
            status, body = await self._write("POST", self._record(None, now))
            if status == 201:
                self._observe(body)
                return True
            return False  # 409: another candidate created it first
        if status != 200:
            raise KubeRequestError(f"GET {self.path} answered {status}: {body}", status)
        self._observe(body)
        if self.holder not in ("", self.identity) and not self._expired():
            return False
        status, body = await self._write("PUT", self._record(self._lease, now))
        if status == 200:
            self._observe(body)
            return True
        return False

    async def _write(self, method: str, lease: dict[str, Any]) -> tuple[int, Any]:
        path = self.path if method == "PUT" else self.path.rsplit("/", 1)[0]
        status, body = await api_request(self.api_client, method, path, lease)
        if status not in (200, 201, 409):
            raise KubeRequestError(f"{method} {path} answered {status}: {body}", status)
        return status, body

    def _observe(self, lease: Any) -> None:
        """Remember the record; restart the expiry clock when its content changed."""
        if not isinstance(lease, dict):
            return
        if self._lease is None or self._lease.get("spec") != lease.get("spec"):
            self._observed_at = asyncio.get_running_loop().time()
        self._lease = lease

    def _expired(self) -> bool:
        seconds = ((self._lease or {}).get("spec") or {}).get("leaseDurationSeconds") or 0
        return asyncio.get_running_loop().time() >= self._observed_at + float(seconds)

    def _record(self, old: Mapping[str, Any] | None, now: datetime) -> dict[str, Any]:
        """The Lease this replica writes to hold it: acquire time and transitions kept while it held it."""
        spec = dict((old or {}).get("spec") or {})
        stamp = micro_time(now)
        if spec.get("holderIdentity") != self.identity:
            spec["acquireTime"] = stamp
            if old is not None:
                spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        spec.update(holderIdentity=self.identity, leaseDurationSeconds=max(1, round(self.timing.duration)),
                    renewTime=stamp)
        spec.setdefault("leaseTransitions", 0)
        return self._lease_object(old, spec)

    def _lease_object(self, old: Mapping[str, Any] | None, spec: dict[str, Any]) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        version = ((old or {}).get("metadata") or {}).get("resourceVersion")
        if version:
            metadata["resourceVersion"] = version  # optimistic concurrency: 409 if it changed meanwhile
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": spec}

    async def _release(self) -> None:
        """Give the Lease up if this replica holds it (clean shutdown), so a successor need not wait."""
        if self._lease is None or self.holder != self.identity:
            return
        spec = dict(self._lease.get("spec") or {})
        stamp = micro_time(self.wall_clock())
        spec.update(holderIdentity=None, leaseDurationSeconds=1, acquireTime=stamp, renewTime=stamp)
        try:
            async with asyncio.timeout(self.timing.retry_period):
                status, _ = await api_request(self.api_client, "PUT", self.path, self._lease_object(self._lease, spec))
        except (KubeRequestError, TimeoutError) as exc:
            log.warning("leader election: could not release lease %s/%s: %s", self.namespace, self.name, exc)
            return
        if status == 200:
            log.info("leader election: %s released lease %s/%s", self.identity, self.namespace, self.name)
        self._lease = None


async def every(interval: float, step: Callable[[], object], name: str, failures: TaskFailures) -> None:
    """Run the blocking `step` in a worker thread every `interval` seconds until cancelled; a failed
    round is recorded under `name` and the next one runs anyway (a duty such as root rotation)."""
    while True:
        try:
            await asyncio.to_thread(step)
        except Exception as exc:
            failures.record(name, exc)
        await asyncio.sleep(interval)


def campaign(election: LeaderElection, duties: Duties) -> Callback:
    """The task factory that runs `duties` under `election` (for `pilot.tasks.spawn`)."""
    return lambda: election.run(duties.on_started, duties.on_stopped)


class Duties:
    """The duties of one Lease: guarded tasks started when it is won, cancelled when it is lost.
    `on_started` / `on_stopped` are the callbacks for `LeaderElection.run`."""

    def __init__(self, duties: Mapping[str, Callback], failures: TaskFailures) -> None:
        self.duties = dict(duties)
        self.failures = failures
        self._tasks: list[asyncio.Task[None]] = []

    async def on_started(self) -> None:
        self._tasks = [spawn(name, factory, self.failures) for name, factory in sorted(self.duties.items())]

    async def on_stopped(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def run_always(self) -> None:
        """No election (one replica, or no cluster): the duties run until cancelled."""
        await self.on_started()
        try:
            await asyncio.Event().wait()
        finally:
            await self.on_stopped()
