"""The JWKS fetcher against a real HTTP server: it fetches what RequestAuthentication rules name
(jwksUri, or OpenID discovery of the issuer), touches the store when keys change, keeps the last
good keys when a refresh fails, and forgets URIs no rule names any more."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from google.protobuf import json_format

from pilot.api import parse_object
from pilot.config.store import ConfigStore
from pilot.jwks import JwksFetcher
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate
from pilot.xds import typeurls

KEYS_V1 = json.dumps({"keys": [{"kty": "oct", "kid": "1", "k": "YQ"}]})
KEYS_V2 = json.dumps({"keys": [{"kty": "oct", "kid": "2", "k": "Yg"}]})


@dataclass
class Idp:
    """A tiny identity provider: /keys serves `keys` (or `status`), /.well-known/... points at it."""

    base: str = ""
    keys: str = KEYS_V1
    status: int = 200
    hits: list[str] = field(default_factory=list)


@pytest.fixture
async def idp() -> AsyncIterator[Idp]:
    state = Idp()

    async def keys(request: web.Request) -> web.Response:
        state.hits.append(request.path)
        return web.Response(text=state.keys, status=state.status)

    async def discovery(request: web.Request) -> web.Response:
        state.hits.append(request.path)
        return web.json_response({"issuer": state.base, "jwks_uri": f"{state.base}/keys"})

    app = web.Application()
    app.router.add_get("/keys", keys)
    app.router.add_get("/.well-known/openid-configuration", discovery)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.base = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


def rule_doc(name: str, rule: dict[str, object]) -> object:
    return parse_object({"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
                         "metadata": {"name": name, "namespace": "default"}, "spec": {"jwtRules": [rule]}})


async def test_fetches_jwks_uri_and_openid_discovery_and_touches_the_store(idp: Idp) -> None:
    store = ConfigStore()
    store.apply(rule_doc("by-uri", {"issuer": "x", "jwksUri": f"{idp.base}/keys"}))  # type: ignore[arg-type]
    store.apply(rule_doc("by-issuer", {"issuer": idp.base}))  # type: ignore[arg-type]
    store.apply(rule_doc("inline", {"issuer": "y", "jwks": KEYS_V2}))  # type: ignore[arg-type]
    fetcher = JwksFetcher(store)
    async with aiohttp.ClientSession() as session:
        assert await fetcher.sync(session) is True
        assert dict(fetcher.current()) == {f"{idp.base}/keys": KEYS_V1, f"openid:{idp.base}": KEYS_V1}
        assert sorted(idp.hits) == ["/.well-known/openid-configuration", "/keys", "/keys"]
        # Nothing is due before the refresh interval: no request, no change.
        assert await fetcher.sync(session) is False and len(idp.hits) == 3


async def test_the_mesh_inlines_fetched_keys(idp: Idp) -> None:
    store = ConfigStore()
    store.apply(rule_doc("by-uri", {"issuer": "x", "jwksUri": f"{idp.base}/keys"}))  # type: ignore[arg-type]
    service = parse_object({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                            "metadata": {"name": "a", "namespace": "default"},
                            "spec": {"hosts": ["a.example"], "resolution": "STATIC", "location": "MESH_INTERNAL",
                                     "ports": [{"number": 80, "name": "http"}],
                                     "workloadSelector": {"labels": {"app": "a"}}}})
    store.apply(service)
    fetcher = JwksFetcher(store)
    async with aiohttp.ClientSession() as session:
        await fetcher.sync(session)
    mesh = build_mesh(store.objects(), jwks=fetcher.current())
    listeners = generate(mesh, ProxyClass(ProxyKind.SIDECAR, "default", (("app", "a"),)))[typeurls.LISTENER]
    listener = json.loads(json_format.MessageToJson(listeners["0.0.0.0_80"]))
    jwt = listener["filterChains"][0]["filters"][0]["typedConfig"]["httpFilters"][0]["typedConfig"]
    assert jwt["providers"]["origins-0"]["localJwks"]["inlineString"] == KEYS_V1


async def test_a_failed_refresh_keeps_the_last_good_keys_and_a_new_key_set_replaces_them(idp: Idp) -> None:
    store = ConfigStore()
    store.apply(rule_doc("by-uri", {"issuer": "x", "jwksUri": f"{idp.base}/keys"}))  # type: ignore[arg-type]
    fetcher = JwksFetcher(store, refresh=0, retry=0)
    uri = f"{idp.base}/keys"
    async with aiohttp.ClientSession() as session:
        await fetcher.sync(session)
        idp.status = 503
        assert await fetcher.sync(session) is False
        assert fetcher.current()[uri] == KEYS_V1
        idp.status, idp.keys = 200, "not a key set"
        assert await fetcher.sync(session) is False and fetcher.current()[uri] == KEYS_V1
        idp.keys = KEYS_V2
        assert await fetcher.sync(session) is True and fetcher.current()[uri] == KEYS_V2
    assert fetcher.failures._value.get() == 2


async def test_an_unreachable_uri_has_no_keys_and_removed_rules_are_forgotten(idp: Idp) -> None:
    store = ConfigStore()
    store.apply(rule_doc("gone", {"issuer": "x", "jwksUri": "http://127.0.0.1:9/keys"}))  # type: ignore[arg-type]
    store.apply(rule_doc("ok", {"issuer": "y", "jwksUri": f"{idp.base}/keys"}))  # type: ignore[arg-type]
    fetcher = JwksFetcher(store, timeout=2)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        await fetcher.sync(session)
        assert list(fetcher.current()) == [f"{idp.base}/keys"]
        store.delete("RequestAuthentication", "default", "ok")
        assert await fetcher.sync(session) is True and dict(fetcher.current()) == {}


async def test_run_touches_the_store_once_keys_arrive(idp: Idp) -> None:
    store = ConfigStore()
    store.apply(rule_doc("by-uri", {"issuer": "x", "jwksUri": f"{idp.base}/keys"}))  # type: ignore[arg-type]
    before = store.revision
    fetcher = JwksFetcher(store)

    task = asyncio.create_task(fetcher.run())
    try:
        await asyncio.wait_for(store.wait_for_change(before), timeout=10)
    finally:
        task.cancel()
    assert fetcher.current()[f"{idp.base}/keys"] == KEYS_V1


async def test_a_store_change_at_the_moment_of_cancellation_does_not_swallow_it() -> None:
    # Python 3.11's asyncio.wait_for returns the inner result when the wait is cancelled in the
    # same loop step as the inner wait completes, dropping the cancellation: the fetcher then
    # slept again, and a pilot stopping right after a config change hung (CI, session 38).
    store = ConfigStore()
    fetcher = JwksFetcher(store)  # no rules: it only waits for the store
    task = asyncio.create_task(fetcher.run())
    for _ in range(20):  # into `_sleep_until_due`
        await asyncio.sleep(0)
    store.touch()  # wakes the store's waiter ...
    task.cancel()  # ... in the same step as the cancellation
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done == {task} and task.cancelled()
