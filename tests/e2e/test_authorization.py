"""AuthorizationPolicy and RequestAuthentication through real Envoy sidecars and real requests.

One local mesh for the module: a ``client`` sidecar and the ``api`` workload (an echo app behind
its sidecar on an HTTP port and a TCP port), with one set of policies on ``api``:

- ALLOW ``allow``: GETs of ``/public/*`` and ``/items/{*}/view``; ``/team`` with header
  ``x-team: blue``; anything from the direct peer ``<block>.100`` (an L4 rule, so it also opens
  the TCP port to that peer alone); ``/secure/*`` for request principal alice of the inline-key
  issuer, ``/remote/*`` for any subject of the issuer whose keys pilot fetches from ``jwksUri``;
- DENY ``deny``: ``/public/admin*`` on the HTTP port, and requests whose original client
  (X-Forwarded-For) is ``<block>.66``;
- AUDIT ``audit``: every request (logging only);
- RequestAuthentication ``jwt``: two issuers, one with its keys inline, one by ``jwksUri``
  served by a small HTTP server in the test.

Principals and namespaces need mutual TLS between the sidecars: `test_authorization_mtls.py`
covers them. JWTs are signed here with ``cryptography`` (RS256).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from meshctl.localmesh import LocalMesh, free_port, http_session
from pilot.settings import PilotSettings
from tests.e2e.conftest import random_block

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

ISSUER, REMOTE_ISSUER = "https://idp.test", "https://remote-idp.test"
HTTP_PORT, TCP_PORT = 8080, 9090
HOST = f"api:{HTTP_PORT}"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Signer:
    """An RS256 key pair: signs tokens, and publishes its public half as a JWKS."""

    key: rsa.RSAPrivateKey
    kid: str

    @classmethod
    def create(cls, kid: str) -> Signer:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048), kid)

    def jwks(self) -> str:
        numbers = self.key.public_key().public_numbers()

        def big(n: int) -> str:
            return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))

        return json.dumps({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": self.kid,
                                     "n": big(numbers.n), "e": big(numbers.e)}]})

    def token(self, issuer: str, subject: str, **claims: Any) -> str:
        header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": self.kid}).encode())
        now = int(time.time())
        body = b64(json.dumps({"iss": issuer, "sub": subject, "iat": now, "exp": now + 600, **claims}).encode())
        signature = self.key.sign(f"{header}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{header}.{body}.{b64(signature)}"


def doc(kind: str, name: str, spec: str, group: str = "networking.istio.io") -> str:
    return f"---\napiVersion: {group}/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: default}}\nspec:\n{spec}\n"


def mesh_yaml(block: str, ports: dict[str, int], inline_jwks: str, jwks_uri: str) -> str:
    out = doc("ServiceEntry", "api", f"""\
  hosts: [api.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {HTTP_PORT}, name: http, protocol: HTTP}}, {{number: {TCP_PORT}, name: tcp, protocol: TCP}}]
  workloadSelector: {{labels: {{app: api}}}}""")
    out += doc("WorkloadEntry", "client", f"  address: {block}.10\n  labels: {{app: client}}")
    out += doc("WorkloadEntry", "api", f"  address: {block}.11\n  labels: {{app: api}}\n"
                                       f"  ports: {{http: {ports['http']}, tcp: {ports['tcp']}}}")
    selector = "  selector: {matchLabels: {app: api}}\n"
    out += doc("AuthorizationPolicy", "allow", selector + f"""\
  action: ALLOW
  rules:
  - to: [{{operation: {{methods: [GET], paths: ['/public/*', '/items/{{*}}/view']}}}}]
  - to: [{{operation: {{paths: [/team]}}}}]
    when: [{{key: 'request.headers[x-team]', values: [blue]}}]
  - from: [{{source: {{ipBlocks: [{block}.100/32]}}}}]
  - from: [{{source: {{requestPrincipals: [{ISSUER}/alice]}}}}]
    to: [{{operation: {{paths: ['/secure/*']}}}}]
  - from: [{{source: {{requestPrincipals: ['{REMOTE_ISSUER}/*']}}}}]
    to: [{{operation: {{paths: ['/remote/*']}}}}]""", "security.istio.io")
    out += doc("AuthorizationPolicy", "deny", selector + f"""\
  action: DENY
  rules:
  - to: [{{operation: {{paths: ['/public/admin*'], ports: ['{ports["http"]}']}}}}]
  - from: [{{source: {{remoteIpBlocks: [{block}.66]}}}}]""", "security.istio.io")
    out += doc("AuthorizationPolicy", "audit", selector + "  action: AUDIT\n  rules: [{}]", "security.istio.io")
    out += doc("RequestAuthentication", "jwt", selector + f"""\
  jwtRules:
  - issuer: {ISSUER}
    jwks: '{inline_jwks}'
  - issuer: {REMOTE_ISSUER}
    jwksUri: {jwks_uri}""", "security.istio.io")
    return out


@dataclass
class Authz:
    mesh: LocalMesh
    config_dir: Path
    block: str
    ports: dict[str, int]
    inline: Signer
    remote: Signer

    @property
    def api(self) -> str:
        return f"{self.block}.11"

    async def call(self, path: str, source: str | None = None, **headers: str) -> int:
        """A GET through the client's sidecar (from ``source`` when given); the status code.
        ``x_team=`` sends header ``x-team``."""
        connector = aiohttp.TCPConnector(local_addr=(source, 0) if source else None, force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10),
                                         trust_env=False) as session:
            url = f"http://{self.block}.10:15001{path}"
            sent = {"Host": HOST, **{k.replace("_", "-"): v for k, v in headers.items()}}
            async with session.get(url, headers=sent) as resp:
                return resp.status

    async def direct(self, port_name: str, path: str, source: str) -> int | str:
        """A GET sent straight to the api sidecar's inbound port from ``source``: the status, or
        "refused" when the connection is closed without an answer (network RBAC)."""
        connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10),
                                         trust_env=False) as session:
            try:
                async with session.get(f"http://{self.api}:{self.ports[port_name]}{path}") as resp:
                    return resp.status
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                return "refused"

    async def stat(self, name: str) -> int:
        stats = await self.mesh.sidecars["default/api"].stats(f"^{name}$")
        return int(stats.get(name, 0))


async def serve_jwks(stack: contextlib.AsyncExitStack, jwks: str) -> str:
    async def keys(_: web.Request) -> web.Response:
        return web.Response(text=jwks, content_type="application/json")

    app = web.Application()
    app.router.add_get("/keys", keys)
    runner = web.AppRunner(app)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}/keys"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def authz(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Authz]:
    config_dir: Path = tmp_path_factory.mktemp("authorization")
    block = random_block()
    ports = {"http": free_port(), "tcp": free_port()}
    inline, remote = Signer.create("inline"), Signer.create("remote")
    async with contextlib.AsyncExitStack() as stack:
        jwks_uri = await serve_jwks(stack, remote.jwks())
        (config_dir / "mesh.yaml").write_text(mesh_yaml(block, ports, inline.jwks(), jwks_uri))
        settings = PilotSettings(ads_port=free_port(), debug_port=0, config_dir=config_dir, debounce_ms=50)
        mesh = await stack.enter_async_context(LocalMesh(settings))
        for port_name in ("http", "tcp"):
            await mesh.start_app("default", "api", "v1", port_name=port_name)
        for name in ("client", "api"):
            await mesh.start_sidecar("default", name)
        await mesh.wait_synced()
        state = Authz(mesh, config_dir, block, ports, inline, remote)
        # The remote issuer's keys arrive once pilot fetched them; the fetcher then touches the
        # store, and the rebuild from that revision is pushed.
        for _ in range(100):
            if jwks_uri in mesh.pilot.jwks.current():
                break
            await asyncio.sleep(0.1)
        await mesh.pilot.pusher.wait_built(mesh.pilot.store.revision)
        await mesh.wait_synced()
        yield state


async def test_allow_rules_by_method_path_template_and_header(authz: Authz) -> None:
    got = {
        ("GET", "/public/a"): await authz.call("/public/a"),
        ("GET", "/items/42/view"): await authz.call("/items/42/view"),
        ("GET", "/items/42/edit"): await authz.call("/items/42/edit"),  # {*} is one segment, /view only
        ("GET", "/items/4/2/view"): await authz.call("/items/4/2/view"),
        ("GET", "/private"): await authz.call("/private"),  # no rule allows it
        ("GET", "/team blue"): await authz.call("/team", x_team="blue"),
        ("GET", "/team red"): await authz.call("/team", x_team="red"),
        ("GET", "/team none"): await authz.call("/team"),
    }
    assert got == {
        ("GET", "/public/a"): 200, ("GET", "/items/42/view"): 200, ("GET", "/items/42/edit"): 403,
        ("GET", "/items/4/2/view"): 403, ("GET", "/private"): 403,
        ("GET", "/team blue"): 200, ("GET", "/team red"): 403, ("GET", "/team none"): 403,
    }


async def test_method_rule_refuses_other_methods(authz: Authz) -> None:
    async with http_session() as session:
        url = f"http://{authz.block}.10:15001/public/a"
        async with session.post(url, headers={"Host": HOST}, data=b"x") as resp:
            assert resp.status == 403
            assert "RBAC: access denied" in await resp.text()


async def test_deny_beats_allow(authz: Authz) -> None:
    # /public/admin is allowed by the GET /public/* rule, and by the ipBlocks rule for .100.
    assert await authz.call("/public/admin") == 403
    assert await authz.direct("http", "/public/admin", f"{authz.block}.100") == 403
    assert await authz.direct("http", "/anything", f"{authz.block}.100") == 200


async def test_ip_blocks_match_the_direct_peer_on_http_and_tcp_ports(authz: Authz) -> None:
    trusted, other = f"{authz.block}.100", f"{authz.block}.101"
    assert await authz.direct("http", "/private", trusted) == 200
    assert await authz.direct("http", "/private", other) == 403
    # TCP: only L4 rules apply; the ipBlocks rule opens it to .100, everyone else is cut off.
    assert await authz.direct("tcp", "/private", trusted) == 200
    assert await authz.direct("tcp", "/private", other) == "refused"
    assert await authz.stat("tcp.rbac.denied") >= 1


async def test_remote_ip_blocks_match_the_original_client_from_x_forwarded_for(authz: Authz) -> None:
    assert await authz.call("/public/a", source=f"{authz.block}.66") == 403
    assert await authz.call("/public/a", source=f"{authz.block}.67") == 200


async def test_audit_is_evaluated_and_changes_nothing(authz: Authz) -> None:
    allowed = f"http.inbound_{authz.ports['http']}.rbac.allowed"
    before = await authz.stat(allowed)
    assert await authz.call("/public/audited") == 200  # AUDIT matches every request, still allowed
    # Three RBAC filters passed it: AUDIT (action LOG, which only marks the request for access
    # logs), DENY and ALLOW, in Istio's order.
    assert await authz.stat(allowed) == before + 3
    assert await authz.call("/private") == 403  # ...and still denied where ALLOW says no
    dump = await authz.mesh.sidecars["default/api"].admin_get("/config_dump", {"resource": "dynamic_listeners"})
    assert '"action": "LOG"' in dump.replace('"action":"LOG"', '"action": "LOG"')


async def test_jwt_invalid_token_is_401_missing_principal_is_403_valid_is_200(authz: Authz) -> None:
    alice = authz.inline.token(ISSUER, "alice")
    forged = Signer.create("inline").token(ISSUER, "alice")  # right issuer and kid, wrong key
    expired = authz.inline.token(ISSUER, "alice", exp=int(time.time()) - 3600)
    assert await authz.call("/secure/data", Authorization=f"Bearer {alice}") == 200
    assert await authz.call("/secure/data", Authorization=f"Bearer {forged}") == 401
    assert await authz.call("/secure/data", Authorization=f"Bearer {expired}") == 401
    assert await authz.call("/secure/data", Authorization="Bearer not-a-jwt") == 401
    assert await authz.call("/secure/data") == 403  # no token: authenticated, but no request principal
    bob = authz.inline.token(ISSUER, "bob")
    assert await authz.call("/secure/data", Authorization=f"Bearer {bob}") == 403  # valid, not alice
    # A request without a token passes authentication wherever no request principal is required.
    assert await authz.call("/public/a") == 200
    # An invalid token is refused even where no policy asks for one.
    assert await authz.call("/public/a", Authorization=f"Bearer {forged}") == 401


async def test_keys_fetched_from_jwks_uri_verify_tokens(authz: Authz) -> None:
    token = authz.remote.token(REMOTE_ISSUER, "carol")
    assert await authz.call("/remote/x", Authorization=f"Bearer {token}") == 200
    wrong_issuer = authz.inline.token(ISSUER, "alice")
    assert await authz.call("/remote/x", Authorization=f"Bearer {wrong_issuer}") == 403


async def settles_to(authz: Authz, path: str, status: int) -> list[int]:
    """Statuses of GETs of ``path`` until one is ``status`` (at most 10 s of them). A changed
    listener serves new connections at once; connections the client's sidecar opened before
    keep the old filters until Envoy drained them (drain time 1 s in the local mesh)."""
    seen = [await authz.call(path)]
    deadline = time.monotonic() + 10
    while seen[-1] != status and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        seen.append(await authz.call(path))
    return seen


async def test_a_policy_edit_reaches_the_sidecar_and_its_removal_too(authz: Authz) -> None:
    assert await authz.call("/public/late") == 200
    revision = authz.mesh.pilot.store.revision
    extra = authz.config_dir / "late.yaml"
    rule = f"[{{to: [{{operation: {{paths: [/public/late], ports: ['{authz.ports['http']}']}}}}]}}]"
    extra.write_text(doc("AuthorizationPolicy", "late", f"  action: DENY\n  rules: {rule}", "security.istio.io"))
    await authz.mesh.wait_applied(revision)
    # A direct call opens a new connection to the api sidecar: the new policy holds at once.
    assert await authz.direct("http", "/public/late", f"{authz.block}.101") == 403
    assert (await settles_to(authz, "/public/late", 403))[-1] == 403
    revision = authz.mesh.pilot.store.revision
    extra.unlink()
    await authz.mesh.wait_applied(revision)
    assert await authz.direct("http", "/public/late", f"{authz.block}.101") == 200
    assert (await settles_to(authz, "/public/late", 200))[-1] == 200
