"""Fetching the JSON Web Key Sets that RequestAuthentication rules name by ``jwksUri``.

Istio's default: istiod fetches the keys and inlines them into the proxies' JWT filter, so
sidecars need no route to the identity provider. Here a `JwksFetcher` does the fetching: it
watches the config store for the URIs that rules name (and, for rules with neither ``jwks`` nor
``jwksUri``, the issuer's OpenID discovery document), fetches what it lacks, refreshes what it
has every `refresh` seconds (20 minutes, Istio's default), and retries failures every `retry`
seconds. When a key set appears or changes it touches the store, so the mesh is rebuilt with
`current()` as ``build_mesh(..., jwks=...)``; the generators stay pure.

A failed refresh keeps the last good key set; a URI never fetched has none, and the generator
inlines keys nothing verifies against (fail closed). Concurrency: one task on the event loop
owns the state; `current()` hands out an immutable mapping that is replaced, never mutated, so
the mesh build may read it from its worker thread. Cost: one HTTP GET per URI per refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from pilot.api.request_authentication import RequestAuthentication, jwks_problem
from pilot.model.authz import jwks_sources

log = logging.getLogger(__name__)
OPENID_PREFIX = "openid:"
OPENID_SUFFIX = "/.well-known/openid-configuration"


class JwksError(Exception):
    """A key set could not be fetched or is not a key set."""


class JwksFetcher:
    """Keeps the key sets of every ``jwksUri`` (and OpenID issuer) the store's rules name."""

    def __init__(
        self,
        store: Any,
        registry: CollectorRegistry | None = None,
        refresh: float = 20 * 60,
        retry: float = 60,
        timeout: float = 5,
    ) -> None:
        self.store = store
        self.refresh = refresh
        self.retry = retry
        self.timeout = timeout
        self._keys: Mapping[str, str] = MappingProxyType({})
        self._due: dict[str, float] = {}  # source -> monotonic time of its next fetch
        self.failures = Counter(
            "pilot_jwks_fetch_failures", "JWKS fetches that failed (the last good keys keep serving)",
            registry=registry)

    def current(self) -> Mapping[str, str]:
        """Source (jwksUri or ``openid:<issuer>``) -> key set text, for ``build_mesh(jwks=...)``."""
        return self._keys

    async def run(self) -> None:
        """Fetch until cancelled; touches the store whenever the key sets change."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session:
            revision = -1
            while True:
                if await self.sync(session):
                    self.store.touch()
                revision = self.store.revision
                await self._sleep_until_due(revision)

    async def sync(self, session: aiohttp.ClientSession) -> bool:
        """Fetch every source that is due; whether any key set changed."""
        wanted = jwks_sources(o for o in self.store.objects(RequestAuthentication.KIND)
                              if isinstance(o, RequestAuthentication))
        keys = {k: v for k, v in self._keys.items() if k in wanted}
        self._due = {k: t for k, t in self._due.items() if k in wanted}
        now = time.monotonic()
        due = sorted(s for s in wanted if self._due.get(s, 0.0) <= now)
        results = await asyncio.gather(*(self._fetch(session, s) for s in due), return_exceptions=True)
        for source, result in zip(due, results, strict=True):
            if isinstance(result, str):
                keys[source] = result
                self._due[source] = now + self.refresh
            else:
                self.failures.inc()
                then = "keeping the last good keys" if source in keys else "its tokens are rejected until it loads"
                log.warning("JWKS %s: %s; %s", source, result, then)
                self._due[source] = now + self.retry
        changed = keys != dict(self._keys)
        self._keys = MappingProxyType(dict(sorted(keys.items())))
        return changed

    async def _sleep_until_due(self, revision: int) -> None:
        wait = min(self._due.values(), default=time.monotonic() + self.refresh) - time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(wait, 0.0)):
                await self.store.wait_for_change(revision)

    async def _fetch(self, session: aiohttp.ClientSession, source: str) -> str:
        uri = source
        if source.startswith(OPENID_PREFIX):
            discovery = await self._get(session, source[len(OPENID_PREFIX):].rstrip("/") + OPENID_SUFFIX)
            try:
                found = json.loads(discovery)["jwks_uri"]
            except (ValueError, KeyError, TypeError) as exc:
                raise JwksError(f"OpenID discovery document has no jwks_uri ({exc})") from None
            if not isinstance(found, str):
                raise JwksError("OpenID discovery document's jwks_uri is not a string")
            uri = found
        text = await self._get(session, uri)
        problem = jwks_problem(text)
        if problem is not None:
            raise JwksError(f"{uri}: {problem}")
        return text

    async def _get(self, session: aiohttp.ClientSession, uri: str) -> str:
        try:
            async with session.get(uri) as resp:
                if resp.status != 200:
                    raise JwksError(f"GET {uri}: HTTP {resp.status}")
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise JwksError(f"GET {uri}: {exc or type(exc).__name__}") from None
