"""List+watch of one Kubernetes resource, objects as plain JSON dicts.

A `Watch` lists the resource (paginated), hands the full set to its handler's `replace`, then
watches from the list's resourceVersion and hands every event to `upsert` / `delete`. It keeps
the resourceVersion of the last event or bookmark it saw, so a watch that ends (the server's
`timeoutSeconds`, a dropped connection, an API server restart) resumes where it stopped, and
nothing is lost: the API server replays every change after that version. When the server no
longer has that version (410 Gone: etcd compacted, or a restarted server whose watch cache
starts later), the watch lists again and delivers the new full set through `replace`, so
objects deleted meanwhile disappear and none is delivered twice as a new object. Handlers must
be idempotent for an object whose resourceVersion they have already seen (a resumed watch may
repeat the last event; a re-list repeats everything). Errors (connection refused while the API
server restarts, 5xx, a handler that raised) cost a retry after an exponential backoff with
jitter, capped at `max_backoff`; a handler failure also forces a re-list, as the handler's view
may be incomplete.

Concurrency: `run` is one task on the event loop; handlers are called on it, synchronously,
one event at a time, in the order the API server sent them. Cost: the watch response is read
in chunks and split into lines as they arrive, so memory holds one event (at most
`MAX_EVENT_BYTES`), never the stream; a list holds one page (`page_size` objects) of raw JSON
at a time, and then the parsed objects of the whole set for `replace`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from kubernetes_asyncio.client import ApiClient

log = logging.getLogger(__name__)

# A Kubernetes object is at most 1.5 MiB in etcd; its JSON event may be a bit larger.
MAX_EVENT_BYTES = 8 * 2**20
# The API server's watch cache sends a bookmark about every minute: a watch silent for this long
# is on a dead connection (a half-open TCP session after a network cut) and is resumed anew.
WATCH_IDLE_S = 180.0


class WatchError(Exception):
    """A list or watch request failed; `status` is the HTTP status (0: no response)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class GoneError(WatchError):
    """The resourceVersion asked for is no longer available (HTTP 410): list again."""


@dataclass(frozen=True)
class Resource:
    """One API resource: where it is served and what its objects are called."""

    group: str  # "" for the core group (Pods, Services, ...)
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None) -> str:
        """The collection URL path, across all namespaces unless `namespace` is given."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace is not None and self.namespaced:
            return f"{base}/namespaces/{namespace}/{self.plural}"
        return f"{base}/{self.plural}"

    def __str__(self) -> str:
        return f"{self.plural}.{self.group or 'core'}/{self.version}"


class WatchHandler(Protocol):
    """What a `Watch` delivers to. Called on the event loop, never concurrently."""

    def replace(self, objects: list[dict[str, Any]]) -> None:
        """The full set after every (re)list: objects not in it are gone."""

    def upsert(self, obj: dict[str, Any]) -> None:
        """An object was added or modified (or is repeated with a resourceVersion already seen)."""

    def delete(self, obj: dict[str, Any]) -> None:
        """An object was deleted (its last state)."""


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (0-based): exponential, capped, jittered.

    Jitter takes a uniform share between half and all of the exponential step, so replicas that
    lost the API server together do not come back in lockstep.
    """
    step = min(cap, base * 2.0 ** min(attempt, 32))
    return step * (rng or random.Random()).uniform(0.5, 1.0)


class Watch:
    """List+watch of `resource`, delivered to `handler` (see the module docstring)."""

    def __init__(
        self,
        api_client: ApiClient,
        resource: Resource,
        handler: WatchHandler,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        resource_version: str | None = None,
        page_size: int = 500,
        watch_timeout: float = 300.0,
        request_timeout: float = 60.0,
        min_backoff: float = 0.2,
        max_backoff: float = 30.0,
    ) -> None:
        """`resource_version` resumes a watch from a version seen earlier, skipping the first list
        (if the server no longer has it, the watch lists as usual). `watch_timeout` is the
        server-side length of one watch request (randomized up to twice as long, as client-go
        does, so many watches do not restart together); the client gives up on a request
        `request_timeout` after the server should have ended it."""
        self.api_client = api_client
        self.resource = resource
        self.handler = handler
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.page_size = page_size
        self.watch_timeout = watch_timeout
        self.request_timeout = request_timeout
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.synced = asyncio.Event()
        self.resource_version = resource_version or None  # of the last list, event or bookmark seen
        # Counters, for tests and the debug page.
        self.lists = 0
        self.watches = 0
        self.events = 0
        self.errors = 0
        self._rng = random.Random()

    def __repr__(self) -> str:
        where = f" in {self.namespace}" if self.namespace else ""
        return f"Watch({self.resource}{where})"

    async def run(self) -> None:
        """List, then watch, until cancelled; every failure is logged, counted and retried."""
        attempt = 0
        while True:
            listed = False
            try:
                if self.resource_version is None:
                    await self._list()
                    attempt, listed = 0, True
                if await self._watch(self.resource_version or ""):
                    attempt = 0
                    continue
                # The server ended a watch without a line (not even a bookmark): not a success to
                # retry at once, or a misbehaving server or proxy would be asked in a tight loop.
            except GoneError as exc:
                self.resource_version = None
                if not listed:  # the usual case: list again at once
                    log.info("%r: %s; listing again", self, exc)
                    continue
                # Gone right after a list (a server whose watch cache is still catching up): back off.
                self.errors += 1
                log.warning("%r: %s right after a list (error %d)", self, exc, self.errors)
            except asyncio.CancelledError:
                raise
            except WatchError as exc:
                self.errors += 1
                log.warning("%r: %s (error %d)", self, exc, self.errors)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.errors += 1
                log.warning("%r: %s: %s (error %d)", self, type(exc).__name__, exc, self.errors)
            except Exception:
                # Most likely a handler bug: its view may now be incomplete, so list again.
                self.errors += 1
                self.resource_version = None
                log.exception("%r: failed (error %d); listing again", self, self.errors)
            delay = backoff_delay(attempt, self.min_backoff, self.max_backoff, self._rng)
            attempt += 1
            await asyncio.sleep(delay)

    def _query(self) -> list[tuple[str, str]]:
        query = []
        if self.label_selector:
            query.append(("labelSelector", self.label_selector))
        if self.field_selector:
            query.append(("fieldSelector", self.field_selector))
        return query

    async def _list(self) -> None:
        """One consistent, paginated list; hands the full set to `replace`."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        version = ""
        while True:
            query = [*self._query(), ("limit", str(self.page_size))]
            if token:
                query.append(("continue", token))
            async with self._request(query, aiohttp.ClientTimeout(total=self.request_timeout)) as resp:
                await _check(resp, "list")
                page = json.loads(await resp.read())
            meta = page.get("metadata") or {}
            version = meta.get("resourceVersion") or version
            items += [self._complete(item) for item in page.get("items") or ()]
            token = meta.get("continue")
            if not token:
                break
        self.lists += 1
        self.handler.replace(items)
        self.resource_version = version
        self.synced.set()

    async def _watch(self, version: str) -> bool:
        """One watch request from `version`; True if it delivered at least one event or bookmark."""
        server_timeout = int(self.watch_timeout * self._rng.uniform(1.0, 2.0))
        query = [*self._query(), ("watch", "true"), ("resourceVersion", version),
                 ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(server_timeout))]
        timeout = aiohttp.ClientTimeout(total=server_timeout + self.request_timeout,
                                        sock_connect=self.request_timeout, sock_read=WATCH_IDLE_S)
        async with self._request(query, timeout) as resp:
            await _check(resp, "watch")
            self.watches += 1
            self.synced.set()  # for a watch resumed from `resource_version` without a list
            delivered = False
            async for line in _lines(resp):
                self._event(json.loads(line))
                delivered = True
        return delivered

    def _event(self, event: Mapping[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            message = f"watch error {code}: {obj.get('message', '')}"
            raise GoneError(message, code) if code == 410 else WatchError(message, code)
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if kind in ("ADDED", "MODIFIED"):
            self.handler.upsert(self._complete(obj))
        elif kind == "DELETED":
            self.handler.delete(self._complete(obj))
        elif kind != "BOOKMARK":
            log.warning("%r: unknown event type %r ignored", self, kind)
            return
        self.events += kind != "BOOKMARK"
        if version:
            self.resource_version = version

    def _complete(self, obj: dict[str, Any]) -> dict[str, Any]:
        """List items of some resources lack apiVersion and kind: fill them in."""
        obj.setdefault("apiVersion", self.resource.api_version)
        obj.setdefault("kind", self.resource.kind)
        return obj

    def _request(self, query: list[tuple[str, str]],
                 timeout: aiohttp.ClientTimeout) -> _Response:
        return _Response(self.api_client, self.resource.path(self.namespace), query, timeout)


class _Response:
    """`async with`: one GET through the ApiClient (its auth, TLS and pool), unread, released at the end."""

    def __init__(self, api_client: ApiClient, path: str, query: list[tuple[str, str]],
                 timeout: aiohttp.ClientTimeout) -> None:
        self.api_client, self.path, self.query, self.timeout = api_client, path, query, timeout
        self.resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        resp: aiohttp.ClientResponse = await self.api_client.call_api(
            self.path, "GET", query_params=self.query, header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"], _preload_content=False, _request_timeout=self.timeout)
        self.resp = resp  # unread: the caller streams it
        return resp

    async def __aexit__(self, *exc: object) -> None:
        if self.resp is not None:
            self.resp.release()
            if exc[0] is not None:
                self.resp.close()  # an abandoned stream: drop the connection, never reuse it


async def _check(resp: aiohttp.ClientResponse, what: str) -> None:
    if 200 <= resp.status < 300:
        return
    body = (await resp.content.read(4096)).decode(errors="replace")
    try:
        message = json.loads(body).get("message", body)
    except ValueError:
        message = body
    cls = GoneError if resp.status == 410 else WatchError
    raise cls(f"{what} answered {resp.status}: {message.strip()[:500]}", resp.status)


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The response's complete, non-empty lines as they arrive (one JSON watch event each)."""
    buffer = bytearray()
    for_newline = 0  # bytes before this offset hold no newline: not searched again
    async for chunk in resp.content.iter_any():
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", for_newline)) != -1:
            line = bytes(buffer[start:end])
            start = for_newline = end + 1
            if line.strip():
                yield line
        del buffer[:start]
        for_newline = len(buffer)
        if len(buffer) > MAX_EVENT_BYTES:
            raise WatchError(f"a watch event over {MAX_EVENT_BYTES} bytes")
    # A partial last line (the connection dropped mid-event) is not delivered: the resumed
    # watch starts before it and the server sends it again.
