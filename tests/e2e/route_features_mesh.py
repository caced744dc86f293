"""The mesh of ``test_routing_features``: services, workloads and helpers to call through it.

Two clients (``frontend``, and ``tester`` which also carries ``env: canary``), the ``web`` service
(HTTP ports 8080 and 8081, subsets v1/v2: echo apps that report the path, host and headers they
received) and the TLS service ``secure.example.com`` (subsets v1/v2: small TLS servers, each with
its own certificate), all on a random 127.a.b.0/24 block. Everything runs on the test module's
event loop; ``Routes.route`` is the only writer of the ``web`` VirtualService.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import textwrap
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from meshctl.devcerts import DevCa
from meshctl.localmesh import LocalMesh, free_port, http_session
from pilot.settings import PilotSettings
from tests.e2e.conftest import random_block

HOST = "web:8080"
VERSIONS = ("v1", "v2")
SERVICES = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}, {{number: 8081, name: http-alt, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: web}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: default}}
spec:
  hosts: [secure.example.com]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {tls_port}, name: tls, protocol: TLS}}]
  workloadSelector: {{labels: {{app: secure}}}}
"""
SUBSETS = """\
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: default}}
spec:
  host: {host}
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
"""
WORKLOAD = """\
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}, namespace: default}}
spec: {{address: {address}, labels: {labels}, ports: {ports}}}
"""
# TLS passthrough by SNI: alias.example.com is no service of its own, only an SNI name routed to v2.
TLS_ROUTE = """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure, namespace: default}
spec:
  hosts: [secure.example.com, alias.example.com]
  tls:
  - match: [{sniHosts: [alias.example.com]}]
    route: [{destination: {host: secure.example.com, subset: v2}}]
  - match: [{sniHosts: [secure.example.com]}]
    route: [{destination: {host: secure.example.com, subset: v1}}]
"""
VS_HEAD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web]
  http:
"""
TO_V1 = "    route: [{destination: {host: web, subset: v1}}]\n"


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]  # the echo app's JSON; empty when Envoy answered itself
    headers: CIMultiDictProxy[str]  # response headers

    @property
    def received(self) -> dict[str, str]:
        """Request headers as the app received them, names lower-cased."""
        return {k.lower(): v for k, v in self.body.get("headers", {}).items()}

    @property
    def tag(self) -> str | None:
        return self.received.get("x-route")


@dataclass
class Routes:
    mesh: LocalMesh
    config_dir: Path
    addresses: dict[str, str]  # workload name -> its (and its sidecar's) address
    apps: dict[str, str]  # web version -> app URL on port "http", for /_control
    tls_port: int
    ca_file: Path
    certs: dict[str, bytes] = field(default_factory=dict, repr=False)  # secure version -> its certificate (DER)

    async def route(self, http: str) -> None:
        """Replace the web VirtualService (``http`` is its ``http:`` list, any indent) and wait for it."""
        revision = self.mesh.pilot.store.revision
        (self.config_dir / "web-vs.yaml").write_text(VS_HEAD + textwrap.indent(textwrap.dedent(http), "  "))
        await self.mesh.wait_applied(revision)

    async def call(
        self, path: str = "/", *, host: str = HOST, method: str = "GET", client: str = "frontend", **headers: str
    ) -> Reply:
        """One request through ``client``'s outbound listener; ``x_foo=`` sends header ``x-foo``."""
        sent = CIMultiDict({"Host": host, **{k.replace("_", "-"): v for k, v in headers.items()}})
        url = URL(f"http://{self.addresses[client]}:15001{path}", encoded=True)
        async with http_session() as session, session.request(method, url, headers=sent, allow_redirects=False) as resp:
            body = await resp.json() if resp.content_type == "application/json" else {}
            return Reply(resp.status, body, resp.headers)

    async def tags(self, paths: Iterable[str]) -> dict[str, str | None]:
        """path -> the route that tagged a GET of it."""
        return {path: (await self.call(path)).tag for path in paths}

    async def control(self, version: str, **body: Any) -> dict[str, Any]:
        """POST the web app of ``version``'s ``/_control`` (delay, failures, counter reset)."""
        async with http_session() as session, session.post(self.apps[version] + "/_control", json=body) as resp:
            reply: dict[str, Any] = await resp.json()
            return reply

    async def served(self, version: str) -> int:
        """How many requests the app of ``version`` has answered (on port ``http``)."""
        async with http_session() as session, session.get(self.apps[version] + "/_control") as resp:
            return int((await resp.json())["requests"]["total"])


def tagged(*routes: tuple[str, str]) -> str:
    """An ``http:`` list: per (tag, match) one route that sets ``x-route: tag``, then a fallback."""
    out = ""
    for tag, match in [*routes, ("fallback", "")]:
        out += f"  - name: {tag}\n" + (f"    match: [{match}]\n" if match else "")
        out += f"    headers: {{request: {{set: {{x-route: {tag}}}}}}}\n" + TO_V1
    return out


async def _tls_server(name: str, cert: Path, key: Path, port: int) -> asyncio.Server:
    """A TLS echo server answering ``<name>:<line>``: the client can tell who terminated TLS."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(name.encode() + b":" + line)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port, ssl=context)


def _mesh_yaml(block: str, ports: dict[str, dict[str, int]], tls_port: int) -> tuple[str, dict[str, str]]:
    addresses = {"frontend": f"{block}.10", "tester": f"{block}.20"}
    labels = {"frontend": "{app: frontend}", "tester": "{app: frontend, env: canary}"}
    for i, v in enumerate(VERSIONS):
        addresses[f"web-{v}"], labels[f"web-{v}"] = f"{block}.{11 + i}", f"{{app: web, version: {v}}}"
        addresses[f"secure-{v}"], labels[f"secure-{v}"] = f"{block}.{31 + i}", f"{{app: secure, version: {v}}}"
    text = SERVICES.format(tls_port=tls_port)
    text += SUBSETS.format(name="web", host="web") + SUBSETS.format(name="secure", host="secure.example.com")
    for name, address in addresses.items():
        workload_ports = "{" + ", ".join(f"{k}: {p}" for k, p in ports.get(name, {}).items()) + "}"
        text += WORKLOAD.format(name=name, address=address, labels=labels[name], ports=workload_ports)
    return text + TLS_ROUTE, addresses


@contextlib.asynccontextmanager
async def running_mesh(workdir: Path) -> AsyncIterator[Routes]:
    """Pilot, the TLS servers, the echo apps and every sidecar, for one test module."""
    (config_dir := workdir / "config").mkdir()
    (cert_dir := workdir / "certs").mkdir()
    ca = DevCa.create("e2e route features CA")
    ports = {f"web-{v}": {"http": free_port(), "http-alt": free_port()} for v in VERSIONS}
    ports |= {f"secure-{v}": {"tls": free_port()} for v in VERSIONS}
    tls_port = free_port()
    text, addresses = _mesh_yaml(random_block(), ports, tls_port)
    (config_dir / "mesh.yaml").write_text(text)
    settings = PilotSettings(ads_port=free_port(), debug_port=0, config_dir=config_dir, debounce_ms=50)
    state = Routes(LocalMesh(settings), config_dir, addresses, {}, tls_port, ca.write_ca(cert_dir / "ca.pem"))
    servers = []
    for v in VERSIONS:
        issued = ca.issue(cert_dir, f"secure-{v}", ["secure.example.com", "alias.example.com"])
        state.certs[v] = ssl.PEM_cert_to_DER_cert(issued.cert.read_text())
        servers.append(await _tls_server(v, issued.cert, issued.key, ports[f"secure-{v}"]["tls"]))
    try:
        async with state.mesh as mesh:
            for v in VERSIONS:
                state.apps[v] = await mesh.start_app("default", f"web-{v}", v)
                await mesh.start_app("default", f"web-{v}", v, port_name="http-alt")
            await asyncio.gather(*(mesh.start_sidecar("default", name) for name in addresses))
            await mesh.wait_synced()
            yield state
    finally:
        for server in servers:
            server.close()
