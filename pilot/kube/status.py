"""Status of mesh objects in the cluster: what pilot made of each, written by the leader only.

After each mesh build the status leader (the replica holding `istio-status-leader`, see
`pilot.kube.leader`) writes, through the status subresource, Istio's `IstioStatus` shape on every
mesh object the Kubernetes source holds:

    status:
      conditions:
      - {type: Reconciled, status: "True", reason: Accepted, message: ..., lastTransitionTime: ...}
      validationMessages:            # only when there is a problem Istio has an analysis code for
      - {type: {code: IST0101, name: ReferencedResourceNotFound}, level: ERROR, documentationUrl: ...}
      observedGeneration: 3

`Reconciled` is True when the object is in the mesh pilot serves with no problem reported; False
with the reason and message otherwise: the validation error of a rejected object (IST0106
SchemaValidationError; "serving the previous version" when an earlier valid one still serves)
or the mesh warnings that name it (a missing gateway: IST0101 ReferencedResourceNotFound). Unlike
Istio's distribution reporter, `Reconciled` does not count the proxies that took the change
(`meshctl proxy-status` shows that).

What to write is a pure function of the source's objects and the mesh warnings (`reports`,
`status_body`); `StatusWriter` is the thin I/O edge. It writes only on change: a report already
written (or found on the object) is not written again; the first time it sees an object (e.g.
after taking the lease over) it reads the object and writes only if its status differs. Writes
are rate-limited (Istio's PILOT_STATUS_QPS / PILOT_STATUS_BURST: 100/s, bursts of 500) and carry
the object's `resourceVersion`, so a status judged on an older version of the object is refused
(409) and judged again after the next build.

Concurrency: `StatusWriter.run` is one task (a leader duty, cancelled when the lease is lost);
it reads the source's entries and the pusher's mesh on the event loop between awaits. Cost: per
build, one comparison per mesh object; per changed report one GET and one PATCH. A status write
changes the object's resourceVersion, so every replica's watch sees it and rebuilds once
(identical output: no xDS push).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from kubernetes_asyncio.client import ApiClient
from prometheus_client import CollectorRegistry, Counter

from pilot.config.store import SERVING_PREVIOUS, Key
from pilot.kube.leader import KubeRequestError, api_request

log = logging.getLogger(__name__)

RECONCILED = "Reconciled"
DOCS = "https://istio.io/latest/docs/reference/config/analysis/"
# Istio analysis message types pilot's problems correspond to: (code, name)
REFERENCE_NOT_FOUND = ("IST0101", "ReferencedResourceNotFound")
SCHEMA_INVALID = ("IST0106", "SchemaValidationError")
_NAMED = re.compile(r"^(?P<kind>[A-Z][A-Za-z]+) (?P<ns>[^/\s]+)/(?P<name>[^:\s]+): (?P<message>.+)$", re.S)
_NOT_FOUND = re.compile(r"does not exist|not found|no delegate")


@dataclass(frozen=True)
class Report:
    """What pilot says about one object: Reconciled or not, why, and Istio analysis codes."""

    reconciled: bool
    reason: str
    message: str
    codes: tuple[tuple[str, str], ...] = ()


ACCEPTED = Report(True, "Accepted", "in the mesh config pilot serves")


def warnings_by_object(warnings: Iterable[str]) -> dict[Key, list[str]]:
    """Mesh warnings that name an object ("Kind namespace/name: ..."), grouped by its key."""
    out: dict[Key, list[str]] = {}
    for warning in warnings:
        found = _NAMED.match(warning)
        if found is not None:
            out.setdefault((found["kind"], found["ns"], found["name"]), []).append(found["message"])
    return out


def report_for(error: str | None, serving_previous: bool, warnings: Iterable[str]) -> Report:
    """The report of one object from its validation error (None: valid) and the warnings naming it."""
    if error is not None:
        note = f" ({SERVING_PREVIOUS})" if serving_previous else ""
        return Report(False, "Invalid", f"{error}{note}", (SCHEMA_INVALID,))
    problems = sorted(set(warnings))
    if not problems:
        return ACCEPTED
    codes = (REFERENCE_NOT_FOUND,) if any(_NOT_FOUND.search(p) for p in problems) else ()
    return Report(False, REFERENCE_NOT_FOUND[1] if codes else "MeshWarning", "; ".join(problems), codes)


def reports(objects: Iterable[tuple[Key, str | None]], warnings: Iterable[str],
            serving_previous: Iterable[Key] = ()) -> dict[Key, Report]:
    """Key -> report for every object the source holds, given its error (None: valid)."""
    named = warnings_by_object(warnings)
    previous = set(serving_previous)
    return {key: report_for(error, key in previous, named.get(key, ())) for key, error in objects}


def status_body(report: Report, generation: int | None, now: datetime,
                current: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `status` to write; the condition keeps its lastTransitionTime while its status holds."""
    flag = "True" if report.reconciled else "False"
    before = next((c for c in (current or {}).get("conditions") or () if isinstance(c, Mapping)
                   and c.get("type") == RECONCILED), None)
    since = before.get("lastTransitionTime") if before is not None and before.get("status") == flag else None
    condition = {"type": RECONCILED, "status": flag, "reason": report.reason, "message": report.message,
                 "lastTransitionTime": since or now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    body: dict[str, Any] = {"conditions": [condition], "validationMessages": [
        {"type": {"code": code, "name": name}, "level": "ERROR", "documentationUrl": f"{DOCS}{code.lower()}/"}
        for code, name in report.codes] or None}
    if generation is not None:
        body["observedGeneration"] = generation
    return body


def same_status(current: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
    """Whether `current` already says what `wanted` says (timestamps and absent lists aside)."""
    def norm(status: Mapping[str, Any] | None) -> dict[str, Any]:
        s = dict(status or {})
        s["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                           for c in s.get("conditions") or () if isinstance(c, Mapping)]
        s["validationMessages"] = s.get("validationMessages") or None
        return s
    return norm(current) == norm(wanted)


class StatusMetrics:
    """`pilot_status_writes_total{result}`: status PATCHes by result (written, conflict, error)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.writes = Counter("pilot_status_writes", "status subresource writes on mesh objects", ["result"],
                              registry=registry)


class TokenBucket:
    """`rate` operations per second, up to `burst` at once (client-go's QPS/Burst)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self._tokens = float(burst)
        self._at: float | None = None

    async def take(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            await asyncio.sleep((1 - self._tokens) / self.rate)
            self._tokens, self._at = 1.0, loop.time()
        self._tokens -= 1


class Source(Protocol):
    """What the writer needs of `pilot.kube.source.KubeSource`."""

    source_id: str
    entries: dict[Key, Any]
    watches: dict[str, Any]
    namespaces: Any
    store: Any


class Built(Protocol):
    """What the writer needs of `pilot.push.Pusher`."""

    mesh: Any
    built_revision: int

    async def wait_built(self, revision: int) -> None: ...


class StatusWriter:
    """The status leader's duty (see the module docstring); `run` until cancelled."""

    def __init__(self, api_client: ApiClient, source: Source, pusher: Built, metrics: StatusMetrics, *,
                 qps: float = 100.0, burst: int = 500, retry: float = 2.0,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.api_client, self.source, self.pusher, self.metrics = api_client, source, pusher, metrics
        self.qps, self.burst, self.retry, self.clock = qps, burst, retry, clock

    def current_reports(self) -> dict[Key, Report]:
        """The report of every object of the source in a namespace the mesh watches."""
        allows = self.source.namespaces.allows
        objects = [(key, None if e.error is None else str(e.error.message))
                   for key, e in self.source.entries.items() if allows(e.namespace)]
        previous = self.source.store.serving_previous(self.source.source_id)
        return reports(objects, getattr(self.pusher.mesh, "warnings", ()), previous)

    async def run(self) -> None:
        known: dict[Key, Report] = {}  # written, or found on the object, since this replica leads
        bucket = TokenBucket(self.qps, self.burst)
        seen, pending = -1, False
        while True:
            wait = self.pusher.wait_built(seen + 1)
            if pending:  # retry failed writes without waiting for a change
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.retry):
                        await wait
            else:
                await wait
            seen = self.pusher.built_revision
            if self.source.store.revision != seen:
                pending = True
                continue  # another build follows: judge on that one
            wanted = self.current_reports()
            for key in known.keys() - wanted.keys():
                del known[key]
            pending = False
            for key, report in sorted(wanted.items()):
                if known.get(key) == report:
                    continue
                await bucket.take()
                if await self._write(key, report):
                    known[key] = report
                else:
                    pending = True

    async def _write(self, key: Key, report: Report) -> bool:
        """Make the object's status say `report`; True when it does (or the object is gone)."""
        watch = self.source.watches.get(key[0])
        entry = self.source.entries.get(key)
        if watch is None or entry is None:
            return True
        path = f"{watch.resource.path(key[1])}/{key[2]}"
        try:
            status, obj = await api_request(self.api_client, "GET", path)
            if status == 404:
                return True
            if status != 200 or not isinstance(obj, dict):
                raise KubeRequestError(f"GET {path} answered {status}: {obj}", status)
            meta = obj.get("metadata") or {}
            if meta.get("resourceVersion") != entry.version:
                return False  # changed since pilot judged it: judged again after the next build
            body = status_body(report, meta.get("generation"), self.clock(), obj.get("status"))
            if same_status(obj.get("status"), body):
                return True
            patch = {"metadata": {"resourceVersion": meta.get("resourceVersion")}, "status": body}
            status, answer = await api_request(self.api_client, "PATCH", f"{path}/status", patch,
                                               content_type="application/merge-patch+json")
        except KubeRequestError as exc:
            self.metrics.writes.labels("error").inc()
            log.warning("status: %s %s/%s: %s", key[0], key[1], key[2], exc)
            return False
        if status == 200:
            self.metrics.writes.labels("written").inc()
            log.info("status: %s %s/%s Reconciled=%s (%s)", *key, report.reconciled, report.reason)
            return True
        self.metrics.writes.labels("conflict" if status == 409 else "error").inc()
        if status != 409:
            log.warning("status: PATCH %s/status answered %s: %s", path, status, answer)
        return status == 404
