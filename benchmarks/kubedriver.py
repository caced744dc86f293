"""The `kube_load` benchmark's hands on the API server: bulk creation and the measured changes.

Everything goes through kubernetes_asyncio (the client pilot uses) on an event loop of its own
thread, so the synchronous coordinator of `benchmarks.runner` can call it (`KubeDriver.call`).
Bulk creation runs `concurrency` requests at a time over one connection pool: on 2 cores the
API server and etcd, not the client, are the limit. The driver also plays the Node's kubelet
where the benchmark needs one (the Node is Ready and its Lease renewed every 10 s, so
kube-controller-manager's node lifecycle controller never marks the Pods not Ready); it runs
no pods and never lists them (a kubelet-like sync of 5,000 Pods every second would load the
machine more than pilot does).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from kubernetes_asyncio.client import ApiClient

from benchmarks import kubeobjects as ko
from pilot.kube.client import make_client
from pilot.kube.leader import KubeRequestError, api_request

T = TypeVar("T")
NS = f"/api/v1/namespaces/{ko.NAMESPACE}"
ISTIO = f"/apis/networking.istio.io/v1/namespaces/{ko.NAMESPACE}"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
SLICES = (f"/apis/discovery.k8s.io/v1/namespaces/{ko.NAMESPACE}/endpointslices"
          f"?labelSelector=endpointslice.kubernetes.io%2Fmanaged-by%3D{ko.MANAGED_BY}")
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
LEASE_RENEW_S = 10.0


class DriverError(RuntimeError):
    """A request of the benchmark failed: names the object and the API server's reason."""




class KubeDriver:
    """An API client on its own loop thread; `close()` stops both (use `with KubeDriver(...)`)."""

    def __init__(self, kubeconfig: Path, concurrency: int = 32) -> None:
        self.concurrency = concurrency
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-driver", daemon=True)
        self._thread.start()
        self._lease: asyncio.Task[None] | None = None
        self.api: ApiClient = self.call(make_client(kubeconfig))

    def __enter__(self) -> KubeDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 900.0) -> T:
        """Run `coro` on the driver's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        async def shutdown() -> None:
            if self._lease is not None:
                self._lease.cancel()
                await asyncio.gather(self._lease, return_exceptions=True)
            await self.api.close()

        with contextlib.suppress(Exception):
            self.call(shutdown(), timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def request(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                      content_type: str = "application/json") -> Any:
        """One request as the cluster admin; a failure names method, path and the server's answer."""
        try:
            status, answer = await api_request(self.api, method, path, body, content_type=content_type,
                                               timeout=120.0)
        except KubeRequestError as exc:
            raise DriverError(str(exc)) from None
        if not 200 <= status < 300:
            message = answer.get("message", answer) if isinstance(answer, dict) else answer
            raise DriverError(f"{method} {path}: {status} {str(message)[:300]}")
        return answer

    # -- setup ------------------------------------------------------------------------------------

    def prepare(self, timeout: float = 60.0) -> None:
        """The namespace (once its `default` ServiceAccount exists) and the Ready Node with its Lease."""
        self.call(self._prepare(timeout))

    async def _prepare(self, timeout: float) -> None:
        await self.request("POST", "/api/v1/namespaces", ko.namespace())
        await self.request("POST", "/api/v1/nodes", ko.node())
        await self.request("PATCH", f"/api/v1/nodes/{ko.NODE}/status", ko.node_status(), STRATEGIC_PATCH)
        await self.request("POST", LEASES, ko.node_lease())
        self._lease = asyncio.create_task(self._renew())
        deadline = time.monotonic() + timeout
        while True:  # kube-controller-manager creates it; Pods cannot be admitted before
            try:
                await self.request("GET", f"{NS}/serviceaccounts/default")
                return
            except DriverError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.2)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            with contextlib.suppress(DriverError):  # the next renewal retries; 40 s of grace
                await self.request("PATCH", f"{LEASES}/{ko.NODE}", ko.lease_renewal(), MERGE_PATCH)

    # -- bulk -------------------------------------------------------------------------------------

    def create_cluster(self, services: int, pods: Sequence[ko.PodRef], spares: Sequence[ko.PodRef],
                       log: Callable[[str], None]) -> dict[str, float]:
        """Pods (then their status), DestinationRules and VirtualServices, then the Services, so
        kube-controller-manager writes each Service's EndpointSlice once, with its Pods already
        Ready. Returns seconds per step and in total."""
        steps: dict[str, float] = {}
        started = time.monotonic()

        def step(name: str, count: int, factory: Callable[[Any], Awaitable[object]], items: Iterable[Any]) -> None:
            t0 = time.monotonic()
            self.call(self._bulk(factory, items))
            steps[name] = time.monotonic() - t0
            log(f"  created {count} {name} in {steps[name]:.1f} s ({count / max(steps[name], 1e-9):.0f}/s)")

        every, unready = [*pods, *spares], set(spares)
        step("pods", len(every), lambda ref: self.request("POST", f"{NS}/pods", ko.pod(ref)), every)
        step("pod statuses", len(every), lambda ref: self.request(
            "PATCH", f"{NS}/pods/{ref.name}/status", ko.pod_status(ref, ref not in unready), STRATEGIC_PATCH), every)
        step("destination rules", services,
             lambda i: self.request("POST", f"{ISTIO}/destinationrules", ko.destination_rule(i)), range(services))
        step("virtual services", services,
             lambda i: self.request("POST", f"{ISTIO}/virtualservices", ko.virtual_service(i)), range(services))
        step("services", services, lambda i: self.request("POST", f"{NS}/services", ko.service(i)), range(services))
        steps["total"] = time.monotonic() - started
        return steps

    async def _bulk(self, factory: Callable[[Any], Awaitable[object]], items: Iterable[Any]) -> None:
        """`factory(item)` for every item, `concurrency` at a time; the first failure is raised."""
        gate = asyncio.Semaphore(self.concurrency)

        async def one(item: Any) -> None:
            async with gate:
                await factory(item)

        try:
            async with asyncio.TaskGroup() as group:
                for item in items:
                    group.create_task(one(item))
        except ExceptionGroup as exc:
            raise exc.exceptions[0] from None

    def ready_slices(self, expected: Mapping[str, int]) -> int:
        """How many services' EndpointSlices (made by kube-controller-manager) hold at least
        `expected[service]` ready endpoints."""
        body = self.call(self.request("GET", SLICES))
        ready: dict[str, int] = {}
        for item in body.get("items") or ():
            svc = (item.get("metadata", {}).get("labels") or {}).get("kubernetes.io/service-name", "")
            count = sum(1 for e in item.get("endpoints") or () if (e.get("conditions") or {}).get("ready", True))
            ready[svc] = ready.get(svc, 0) + count
        return sum(1 for svc, want in expected.items() if ready.get(svc, 0) >= want)

    # -- the measured changes ---------------------------------------------------------------------

    def patch_route(self, index: int, weights: tuple[int, int]) -> float:
        """Merge-patch the VirtualService's `spec.http`; returns the monotonic time the request left."""
        patch = {"spec": {"http": ko.http_routes(index, weights)}}
        return self.call(self._timed(
            lambda: self.request("PATCH", f"{ISTIO}/virtualservices/{ko.service_name(index)}", patch, MERGE_PATCH)))

    def set_ready(self, ref: ko.PodRef, ready: bool) -> float:
        """Report the Pod (not) Ready, as its kubelet would; returns the time the request left."""
        return self.call(self._timed(
            lambda: self.request("PATCH", f"{NS}/pods/{ref.name}/status", ko.pod_status(ref, ready), STRATEGIC_PATCH)))

    @staticmethod
    async def _timed(request: Callable[[], Awaitable[object]]) -> float:
        t0 = time.monotonic()
        await request()
        return t0
