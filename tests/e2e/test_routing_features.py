"""HTTP and TLS route features through real Envoy sidecars, observed over real HTTP and TLS.

One local mesh per module: two clients (``frontend``, and ``tester`` which also carries
``env: canary``), the ``web`` service (HTTP ports 8080 and 8081, subsets v1/v2, echo apps that
report the path, host and headers they received) and the TLS service ``secure.example.com``
(subsets v1/v2: small TLS servers, each with its own certificate). Each HTTP test replaces the
``web`` VirtualService, waits until every sidecar ACKed it (``wait_applied``) and checks what a
caller sees. Match tests tag every route with a request header (``x-route``), so the app's echo
tells which route Envoy chose.
"""

from __future__ import annotations

import asyncio
import ssl
import textwrap
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from meshctl.devcerts import DevCa
from meshctl.localmesh import LocalMesh, http_session
from pilot.settings import PilotSettings
from tests.e2e.conftest import free_port, random_block

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

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


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def routes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Routes]:
    config_dir = tmp_path_factory.mktemp("route-features")
    cert_dir = tmp_path_factory.mktemp("route-features-certs")
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
        state.certs[v] = x509.load_pem_x509_certificate(issued.cert.read_bytes()).public_bytes(Encoding.DER)
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


async def test_uri_exact_prefix_regex_in_order_first_match_wins(routes: Routes) -> None:
    await routes.route(
        tagged(
            ("exact", "{uri: {exact: /exact}}"),
            ("api", "{uri: {prefix: /api}}"),
            ("api-v2", "{uri: {prefix: /api/v2}}"),  # listed after /api: never reached
            ("item", "{uri: {regex: '/items/[0-9]+'}}"),  # RE2 full match of the path
        )
    )
    expected = {
        "/exact": "exact", "/exact/more": "fallback", "/EXACT": "fallback",  # exact, case-sensitive
        "/api": "api", "/api/v2/x": "api", "/apiary": "api",  # a prefix is a string prefix
        "/items/42": "item", "/items/42x": "fallback", "/v1/items/42": "fallback",
        "/": "fallback",
    }  # fmt: skip
    assert await routes.tags(expected) == expected


async def test_ignore_uri_case_covers_exact_and_prefix_but_not_regex(routes: Routes) -> None:
    await routes.route(
        tagged(
            ("login", "{uri: {exact: /Login}, ignoreUriCase: true}"),
            ("docs", "{uri: {prefix: /Docs/}, ignoreUriCase: true}"),
            ("img", "{uri: {regex: '/Img/.*'}, ignoreUriCase: true}"),
        )
    )
    expected = {
        "/login": "login", "/LOGIN": "login", "/Login": "login", "/login/x": "fallback",
        "/docs/a": "docs", "/DOCS/A": "docs",
        "/Img/a": "img", "/img/a": "fallback",  # Istio: case is ignored for exact and prefix only
    }  # fmt: skip
    assert await routes.tags(expected) == expected


async def test_query_params_exact_regex_and_presence(routes: Routes) -> None:
    await routes.route(
        tagged(
            ("user", "{queryParams: {user: {exact: jason}}}"),
            ("beta", "{queryParams: {beta: {regex: '1|true'}}}"),
            ("debug", "{queryParams: {debug: {}}}"),  # present, any value
        )
    )
    expected = {
        "/?user=jason": "user", "/?a=1&user=jason": "user", "/?user=Jason": "fallback",
        "/?user=jasonx": "fallback", "/?beta=true": "beta", "/?beta=1": "beta", "/?beta=yes": "fallback",
        "/?debug=0": "debug", "/?debug": "debug", "/?nodebug=1": "fallback", "/": "fallback",
    }  # fmt: skip
    assert await routes.tags(expected) == expected


async def test_method_authority_and_header_prefix_regex_matches(routes: Routes) -> None:
    await routes.route(
        tagged(
            ("post", "{method: {exact: POST}}"),
            ("fqdn", "{authority: {prefix: web.default.svc}}"),
            ("gold", "{headers: {x-tier: {prefix: gold}}}"),
            ("id", "{headers: {x-id: {regex: '[0-9]{3}'}}}"),
        )
    )
    assert (await routes.call("/", method="POST")).tag == "post"
    assert (await routes.call("/", method="PUT")).tag == "fallback"
    assert (await routes.call("/", host="web.default.svc.cluster.local:8080")).tag == "fqdn"
    assert (await routes.call("/", host="web.default:8080")).tag == "fallback"
    cases = [
        ({"x_tier": "gold-plus"}, "gold"), ({"x_tier": "silver"}, "fallback"),
        ({"x_id": "123"}, "id"), ({"x_id": "1234"}, "fallback"), ({"x_id": "12a"}, "fallback"),
    ]  # fmt: skip
    assert [(h, (await routes.call("/", **h)).tag) for h, _ in cases] == cases


async def test_without_headers_matches_requests_lacking_the_header(routes: Routes) -> None:
    await routes.route(
        tagged(
            ("internal", "{headers: {x-internal: {}}}"),  # present
            ("no-beta", "{withoutHeaders: {x-beta: {}}}"),  # absent
            ("not-yes", "{withoutHeaders: {x-skip: {prefix: 'yes'}}}"),  # absent, or not starting with yes
        )
    )
    cases = [
        ({"x_internal": "1", "x_beta": "1"}, "internal"),
        ({}, "no-beta"),
        ({"x_beta": "1"}, "not-yes"),  # x-skip missing: Istio counts that as "does not match"
        ({"x_beta": "1", "x_skip": "no"}, "not-yes"),
        ({"x_beta": "1", "x_skip": "yes-please"}, "fallback"),
    ]
    assert [(h, (await routes.call("/", **h)).tag) for h, _ in cases] == cases


async def test_port_match_routes_the_two_ports_of_one_service_differently(routes: Routes) -> None:
    await routes.route("""
        - match: [{port: 8080}]
          route: [{destination: {host: web, subset: v1}}]
        - match: [{port: 8081}]
          route: [{destination: {host: web, subset: v2, port: {number: 8081}}}]
    """)
    for _ in range(5):
        assert (await routes.call("/", host="web:8080")).body["version"] == "v1"
        assert (await routes.call("/", host="web:8081")).body["version"] == "v2"


async def test_source_labels_give_two_clients_different_routes(routes: Routes) -> None:
    await routes.route("""
        - match: [{sourceLabels: {env: canary}}]
          route: [{destination: {host: web, subset: v2}}]
        - route: [{destination: {host: web, subset: v1}}]
    """)
    for _ in range(5):
        assert (await routes.call("/same", client="frontend")).body["version"] == "v1"
        assert (await routes.call("/same", client="tester")).body["version"] == "v2"


async def test_redirect_answers_with_the_status_code_and_location(routes: Routes) -> None:
    await routes.route("""
        - match: [{uri: {exact: /old}}]
          redirect: {uri: /new, authority: moved.example.com}
        - match: [{uri: {prefix: /temp}}]
          redirect: {uri: /elsewhere, redirectCode: 307}
        - match: [{uri: {prefix: /tls}}]
          redirect: {scheme: https, authority: moved.example.com, port: 8443, redirectCode: 308}
        - route: [{destination: {host: web, subset: v1}}]
    """)
    before = await routes.served("v1")
    old, temp, tls = [await routes.call(p) for p in ("/old", "/temp/a/b", "/tls/x")]
    assert (old.status, old.headers["location"]) == (301, "http://moved.example.com/new")  # Istio's default code
    # The whole path is replaced, although the route matched a prefix; the authority stays.
    assert (temp.status, temp.headers["location"]) == (307, f"http://{HOST}/elsewhere")
    assert (tls.status, tls.headers["location"]) == (308, "https://moved.example.com:8443/tls/x")
    assert await routes.served("v1") == before  # Envoy answered: the app saw none of them


async def test_rewrite_uri_prefix_regex_and_authority_reach_the_app(routes: Routes) -> None:
    await routes.route(r"""
        - match: [{uri: {prefix: /v1/}}]
          rewrite: {uri: /api/}
          route: [{destination: {host: web, subset: v1}}]
        - match: [{uri: {exact: /login}}]
          rewrite: {uri: /auth/login, authority: auth.internal}
          route: [{destination: {host: web, subset: v1}}]
        - match: [{uri: {prefix: /service/}}]
          rewrite: {uriRegexRewrite: {match: '^/service/([^/]+)(/.*)$', rewrite: '\2/instance/\1'}}
          route: [{destination: {host: web, subset: v1}}]
    """)
    prefixed, login, regex = [await routes.call(p) for p in ("/v1/items?q=1", "/login", "/service/foo/bar")]
    assert (prefixed.body["path"], prefixed.body["host"]) == ("/api/items?q=1", HOST)
    assert (login.body["path"], login.body["host"]) == ("/auth/login", "auth.internal")
    assert regex.body["path"] == "/bar/instance/foo"


async def test_route_level_header_edits_on_request_and_response(routes: Routes) -> None:
    await routes.route("""
        - headers:
            request: {set: {x-route: mesh}, add: {x-trace: mesh}, remove: [x-internal]}
            response: {set: {x-app-name: mesh, x-served-by: mesh}, add: {x-extra: one}, remove: [x-app-version]}
          route: [{destination: {host: web, subset: v1}}]
    """)
    reply = await routes.call("/", x_route="client", x_trace="client", x_internal="secret", x_kept="yes")
    seen = reply.received
    assert (seen["x-route"], seen["x-kept"]) == ("mesh", "yes")  # set overwrites; others pass untouched
    assert sorted(v.strip() for v in seen["x-trace"].split(",")) == ["client", "mesh"]  # add appends
    assert "x-internal" not in seen
    assert reply.headers.getall("x-app-name") == ["mesh"]  # set replaced the app's own header
    assert (reply.headers["x-served-by"], reply.headers["x-extra"]) == ("mesh", "one")
    assert "x-app-version" not in reply.headers and reply.body["version"] == "v1"


async def test_destination_level_header_edits_follow_the_chosen_destination(routes: Routes) -> None:
    await routes.route("""
        - match: [{uri: {prefix: /lone}}]
          route:
          - destination: {host: web, subset: v2}
            headers: {request: {set: {x-dest: lone, host: lone.internal}}, response: {set: {x-dest: lone}}}
        - route:
          - destination: {host: web, subset: v1}
            weight: 50
            headers: {request: {set: {x-canary: 'no'}}, response: {add: {x-subset: v1}, remove: [x-app-name]}}
          - destination: {host: web, subset: v2}
            weight: 50
            headers: {request: {set: {x-canary: 'yes', host: canary.internal}}, response: {add: {x-subset: v2}}}
    """)
    lone = await routes.call("/lone")
    assert (lone.body["version"], lone.received["x-dest"], lone.body["host"]) == ("v2", "lone", "lone.internal")
    assert lone.headers["x-dest"] == "lone"
    seen = set()
    for _ in range(40):  # both halves show up: all 40 on one side has probability 2**-39
        r = await routes.call("/split")
        seen.add((r.body["version"], r.received["x-canary"], r.body["host"], r.headers["x-subset"],
                  r.headers.get("x-app-name")))  # fmt: skip
    assert seen == {("v1", "no", HOST, "v1", None), ("v2", "yes", "canary.internal", "v2", "web-v2")}


async def test_route_and_lone_destination_header_rules_combine_as_in_istio(routes: Routes) -> None:
    """Istio applies a lone destination's header rules after the route's (its ``set`` wins), and takes
    the authority from ``rewrite.authority``, else the route's ``host`` header, else the destination's."""
    await routes.route("""
        - match: [{uri: {prefix: /all}}]
          headers: {request: {set: {x-level: route, host: route.internal}}}
          rewrite: {authority: rewrite.internal}
          route:
          - destination: {host: web, subset: v1}
            headers: {request: {set: {x-level: destination, host: dest.internal}}}
        - match: [{uri: {prefix: /headers}}]
          headers: {request: {set: {x-level: route, host: route.internal}}}
          route:
          - destination: {host: web, subset: v1}
            headers: {request: {set: {x-level: destination, host: dest.internal}}}
        - route:
          - destination: {host: web, subset: v1}
            headers: {request: {set: {x-level: destination, host: dest.internal}}}
    """)
    seen = {p: ((r := await routes.call(p)).received["x-level"], r.body["host"]) for p in ("/all", "/headers", "/")}
    assert seen == {
        "/all": ("destination", "rewrite.internal"),
        "/headers": ("destination", "route.internal"),
        "/": ("destination", "dest.internal"),
    }
