"""AuthorizationPolicy on an ingress gateway, with real Envoy and real requests.

The gateway harness of `tests.e2e.test_gateway` (a router Envoy in istio-system selected by
``istio: ingressgateway``, backends api and web behind their sidecars). The test adds policies
selecting the gateway workload, as Istio applies them to ingress gateways, and checks the
answers through the gateway's HTTP and HTTPS servers; removing them restores the old answers.
"""

from __future__ import annotations

import ssl

import aiohttp
import pytest

from tests.e2e.test_gateway import HTTP_PORT, HTTPS_PORT, Ingress, ingress  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

HOST = "shop.example.com"


def policies(block: str) -> str:
    head = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    selector = "  selector: {matchLabels: {istio: ingressgateway}}\n"
    return (
        f"---\n{head}metadata: {{name: gateway-allow, namespace: istio-system}}\nspec:\n{selector}"
        "  action: ALLOW\n"
        "  rules:\n"
        "  - to: [{operation: {paths: ['/api/*']}}]\n"
        "  - when: [{key: 'request.headers[x-ticket]', values: [valid]}]\n"
        f"---\n{head}metadata: {{name: gateway-deny, namespace: istio-system}}\nspec:\n{selector}"
        "  action: DENY\n"
        "  rules:\n"
        "  - to: [{operation: {paths: ['/api/admin*']}}]\n"
        f"  - from: [{{source: {{remoteIpBlocks: [{block}.66]}}}}]\n"
        # Same selector, other namespace: selects workloads of `default` only, never this gateway.
        f"---\n{head}metadata: {{name: not-here, namespace: default}}\nspec:\n{selector}"
        "  action: DENY\n  rules: [{}]\n"
    )


async def status(url: str, source: str | None = None, tls: ssl.SSLContext | None = None, **headers: str) -> int:
    """GET ``url`` with Host shop.example.com on a new connection (from ``source`` when given)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0) if source else None, force_close=True)
    sent = {"Host": HOST, **{k.replace("_", "-"): v for k, v in headers.items()}}
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10),
                              trust_env=False) as session,
        session.get(url, headers=sent, allow_redirects=False, ssl=tls or True,
                    server_hostname=HOST if tls is not None else None) as resp,
    ):
        return resp.status


async def test_policies_selecting_the_gateway_decide_its_answers(ingress: Ingress) -> None:  # noqa: F811
    block = ingress.address.rsplit(".", 1)[0]
    http = ingress.url(HTTP_PORT, "/api/admin/x")
    assert await status(http) == 200  # no policy yet: routed to api

    mesh = ingress.mesh
    assert mesh.settings.config_dir is not None
    extra = mesh.settings.config_dir / "gateway-authz.yaml"
    revision = mesh.pilot.store.revision
    extra.write_text(policies(block))
    await mesh.wait_applied(revision)

    got = {
        "/api/items": await status(ingress.url(HTTP_PORT, "/api/items")),
        "/api/admin/x": await status(http),  # DENY beats the ALLOW of /api/*
        "/web": await status(ingress.url(HTTP_PORT, "/web")),  # no ALLOW rule
        "/web ticket": await status(ingress.url(HTTP_PORT, "/web"), x_ticket="valid"),
        "/web wrong ticket": await status(ingress.url(HTTP_PORT, "/web"), x_ticket="forged"),
        # remoteIpBlocks: the gateway's client (use_remote_address), here the address we bind.
        "/api/items from .66": await status(ingress.url(HTTP_PORT, "/api/items"), source=f"{block}.66"),
        "/api/items from .67": await status(ingress.url(HTTP_PORT, "/api/items"), source=f"{block}.67"),
    }
    assert got == {"/api/items": 200, "/api/admin/x": 403, "/web": 403, "/web ticket": 200,
                   "/web wrong ticket": 403, "/api/items from .66": 403, "/api/items from .67": 200}

    # The HTTPS server (TLS terminated at the gateway) has the same filters.
    trusted = ssl.create_default_context(cafile=str(ingress.ca_file))
    assert await status(ingress.url(HTTPS_PORT, "/api/items", "https"), tls=trusted) == 200
    assert await status(ingress.url(HTTPS_PORT, "/api/admin/x", "https"), tls=trusted) == 403

    revision = mesh.pilot.store.revision
    extra.unlink()
    await mesh.wait_applied(revision)
    assert await status(http) == 200
    assert await status(ingress.url(HTTP_PORT, "/web")) == 200
