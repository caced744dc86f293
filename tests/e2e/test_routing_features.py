"""HTTP and TLS route features through real Envoy sidecars, observed over real HTTP and TLS.

One local mesh for the module (see ``route_features_mesh``). Each HTTP test replaces the ``web``
VirtualService, waits until every sidecar ACKed it (``wait_applied``) and checks what a caller
sees. Match tests tag every route with a request header (``x-route``), so the app's echo tells
which route Envoy chose.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from yarl import URL

from meshctl.localmesh import http_session
from tests.e2e.route_features_mesh import HOST, TO_V1, Reply, Routes, running_mesh, tagged

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def routes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Routes]:
    async with running_mesh(tmp_path_factory.mktemp("route-features")) as state:
        yield state


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


async def test_the_absolute_host_name_gets_the_services_routes_and_the_app_the_attempt_count(
    routes: Routes,
) -> None:
    """Istio 1.27 on: ``web.default.svc.cluster.local.`` (trailing dot, as DNS allows) is a domain
    of the service's virtual host, with and without the port; without it the request would fall
    to the passthrough catch-all. Istio's default proxy headers: the app sees the attempt count,
    and a sidecar's inbound listener answers as ``istio-envoy``."""
    await routes.route(tagged(("fqdn", "{authority: {prefix: web.default.svc}}")))
    for host in ("web.default.svc.cluster.local.:8080", "web.default.svc.cluster.local."):
        reply = await routes.call("/", host=host)
        assert (reply.status, reply.tag) == (200, "fqdn"), host
        assert reply.received["x-envoy-attempt-count"] == "1"
    assert (await routes.call("/", host="web.default.svc.cluster.local.:8081")).tag == "fqdn"  # the second port's
    # Straight to web-v1's sidecar inbound port: the Server header is Istio's inbound one.
    port = URL(routes.apps["v1"]).port
    async with http_session() as session, session.get(f"http://{routes.addresses['web-v1']}:{port}/") as resp:
        assert resp.status == 200 and resp.headers["server"] == "istio-envoy"


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


async def test_istio_catch_all_regex_means_present_in_headers_and_absent_in_without_headers(routes: Routes) -> None:
    await routes.route(
        tagged(
            ("any-gamma", "{headers: {x-gamma: {regex: '*'}}}"),
            ("no-delta", "{withoutHeaders: {x-delta: {regex: '*'}}}"),
        )
    )
    cases = [
        ({"x_gamma": "anything", "x_delta": "1"}, "any-gamma"),
        ({"x_gamma": "", "x_delta": "1"}, "any-gamma"),  # present, even empty
        ({}, "no-delta"),
        ({"x_delta": "*"}, "fallback"),  # not the literal "*": any value counts as present
    ]
    assert [(h, (await routes.call("/", **h)).tag) for h, _ in cases] == cases


async def test_stat_prefix_gives_a_match_its_own_envoy_route_statistics(routes: Routes) -> None:
    await routes.route("""
        - match: [{uri: {prefix: /counted}, statPrefix: counted_api}]
          route: [{destination: {host: web, subset: v1}}]
        - route: [{destination: {host: web, subset: v1}}]
    """)
    for path in ("/counted/a", "/counted/b", "/counted/c", "/other"):
        assert (await routes.call(path)).status == 200
    url = f"http://{routes.addresses['frontend']}:15000/stats?filter=route\\.counted_api\\.upstream_rq_completed$"
    async with http_session() as session, session.get(url) as resp:
        stats = dict(line.split(": ") for line in (await resp.text()).splitlines() if ": " in line)
    assert list(stats.values()) == ["3"], stats  # the three /counted requests, not /other


DELEGATE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-api, namespace: team}
spec:
  exportTo: [default]
  http:
  - name: beta
    match: [{uri: {prefix: /api/beta}, headers: {x-beta: {exact: "yes"}}}]
    headers: {request: {set: {x-route: beta}}}
    route: [{destination: {host: web.default.svc.cluster.local, subset: v2}}]
  - name: outside
    match: [{uri: {prefix: /admin}}]
    route: [{destination: {host: web.default.svc.cluster.local, subset: v2}}]
  - name: rest
    route: [{destination: {host: web.default.svc.cluster.local, subset: v1}}]
"""


async def test_delegate_routes_merge_with_the_root_route_in_envoy(routes: Routes) -> None:
    (routes.config_dir / "web-delegate.yaml").write_text(DELEGATE)
    try:
        await routes.route("""
            - name: api
              match: [{uri: {prefix: /api}}]
              delegate: {name: web-api, namespace: team}
              headers: {request: {set: {x-route: api}}}
            - name: site
              headers: {request: {set: {x-route: site}}}
              route: [{destination: {host: web, subset: v2}}]
        """)
        beta = await routes.call("/api/beta/x", x_beta="yes")
        assert (beta.body["version"], beta.tag) == ("v2", "beta")  # the delegate's own header edit
        plain = await routes.call("/api/beta/x")
        assert (plain.body["version"], plain.tag) == ("v1", "api")  # "rest": the root's header edit
        # "outside" (/admin) is not under /api: left out, so /admin falls to the root's next route.
        admin = await routes.call("/admin")
        assert (admin.body["version"], admin.tag) == ("v2", "site")
        warnings = routes.mesh.pilot.pusher.mesh.warnings
        assert any("delegate team/web-api: its http[1] has a match outside" in w for w in warnings), warnings
    finally:
        (routes.config_dir / "web-delegate.yaml").unlink()


CANARY_RULE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-canary-clients, namespace: default}
spec:
  host: web
  workloadSelector: {matchLabels: {env: canary}}
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
"""


async def test_a_destination_rule_with_a_workload_selector_applies_to_the_selected_client_only(
    routes: Routes,
) -> None:
    (routes.config_dir / "web-canary-rule.yaml").write_text(CANARY_RULE)
    try:
        await routes.route("""
            - route: [{destination: {host: web}}]
        """)
        tester = {(await routes.call("/", client="tester", x_user="ann")).body["version"] for _ in range(20)}
        frontend = {(await routes.call("/", x_user="ann")).body["version"] for _ in range(20)}
        assert len(tester) == 1  # env=canary: hashed on x-user, always one endpoint
        assert frontend == {"v1", "v2"}  # not selected: Istio's default balancing over both
    finally:
        (routes.config_dir / "web-canary-rule.yaml").unlink()


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
        - match: [{uri: {prefix: /same-port}}]
          redirect: {authority: moved.example.com, derivePort: FROM_REQUEST_PORT}
        - match: [{uri: {prefix: /default-port}}]
          redirect: {authority: moved.example.com, derivePort: FROM_PROTOCOL_DEFAULT}
        - route: [{destination: {host: web, subset: v1}}]
    """)
    before = await routes.served("v1")
    old, temp, tls = [await routes.call(p) for p in ("/old", "/temp/a/b", "/tls/x")]
    same, default = [await routes.call(p) for p in ("/same-port", "/default-port")]
    assert same.headers["location"] == "http://moved.example.com:8080/same-port"  # the service port asked for
    assert default.headers["location"] == "http://moved.example.com/default-port"
    assert (old.status, old.headers["location"]) == (301, "http://moved.example.com/new")  # Istio's default code
    # The whole path is replaced, although the route matched a prefix; the authority stays.
    assert (temp.status, temp.headers["location"]) == (307, f"http://{HOST}/elsewhere")
    assert (tls.status, tls.headers["location"]) == (308, "https://moved.example.com:8443/tls/x")
    assert await routes.served("v1") == before  # Envoy answered: the app saw none of them


async def test_direct_responses_with_string_bytes_and_a_body_over_envoys_4k_default(routes: Routes) -> None:
    large = "x" * 5000  # over Envoy's default 4 KB: the route config must raise its limit or be NACKed
    await routes.route(f"""
        - match: [{{uri: {{exact: /teapot}}}}]
          directResponse: {{status: 418, body: {{string: "short and stout"}}}}
        - match: [{{uri: {{exact: /bytes}}}}]
          directResponse: {{status: 200, body: {{bytes: "{base64.b64encode(bytes(range(256))).decode()}"}}}}
        - match: [{{uri: {{exact: /large}}}}]
          directResponse: {{status: 503, body: {{string: "{large}"}}}}
        - match: [{{uri: {{exact: /empty}}}}]
          directResponse: {{status: 204}}
        - route: [{{destination: {{host: web, subset: v1}}}}]
    """)

    async def raw(path: str) -> tuple[int, bytes]:
        url = f"http://{routes.addresses['frontend']}:15001{path}"
        async with http_session() as session, session.get(url, headers={"Host": HOST}) as resp:
            return resp.status, await resp.read()

    before = await routes.served("v1")
    assert await raw("/teapot") == (418, b"short and stout")
    assert await raw("/bytes") == (200, bytes(range(256)))
    assert await raw("/large") == (503, large.encode())
    assert await raw("/empty") == (204, b"")
    assert await routes.served("v1") == before  # Envoy answered all of them itself
    assert (await routes.call("/")).status == 200


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
            headers:
              request: {set: {x-dest: lone, host: lone.internal}, add: {x-trace: lone}, remove: [x-internal]}
              response: {set: {x-dest: lone}}
        - route:
          - destination: {host: web, subset: v1}
            weight: 50
            headers: {request: {set: {x-canary: 'no'}}, response: {add: {x-subset: v1}, remove: [x-app-name]}}
          - destination: {host: web, subset: v2}
            weight: 50
            headers: {request: {set: {x-canary: 'yes', host: canary.internal}}, response: {add: {x-subset: v2}}}
    """)
    lone = await routes.call("/lone", x_trace="client", x_internal="secret")
    assert (lone.body["version"], lone.received["x-dest"], lone.body["host"]) == ("v2", "lone", "lone.internal")
    assert "x-internal" not in lone.received and lone.received["x-trace"].replace(" ", "") == "client,lone"
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


CORS_ROUTES = """
    - match: [{uri: {prefix: /api}}]
      corsPolicy:
        allowOrigins: [{exact: "https://shop.example.com"}, {regex: "https://[a-z]+[.]example[.]org"}]
        allowMethods: [GET, POST]
        allowHeaders: [x-token]
        exposeHeaders: [x-served-by]
        maxAge: 24h
        allowCredentials: true
      route: [{destination: {host: web, subset: v1}}]
    - route: [{destination: {host: web, subset: v1}}]
"""


def access_control(reply: Reply) -> dict[str, str]:
    return {k.lower(): v for k, v in reply.headers.items() if k.lower().startswith("access-control-")}


async def test_cors_preflight_from_an_allowed_origin_is_answered_by_envoy(routes: Routes) -> None:
    await routes.route(CORS_ROUTES)
    before = await routes.served("v1")
    preflight = {"origin": "https://shop.example.com", "access_control_request_method": "POST"}
    allowed = await routes.call("/api/items", method="OPTIONS", **preflight)
    assert allowed.status == 200 and allowed.body == {}
    assert access_control(allowed) == {
        "access-control-allow-origin": "https://shop.example.com",
        "access-control-allow-methods": "GET,POST",
        "access-control-allow-headers": "x-token",
        "access-control-expose-headers": "x-served-by",
        "access-control-max-age": "86400",
        "access-control-allow-credentials": "true",
    }
    by_regex = await routes.call("/api/items", method="OPTIONS", **{**preflight, "origin": "https://app.example.org"})
    assert access_control(by_regex)["access-control-allow-origin"] == "https://app.example.org"
    assert await routes.served("v1") == before  # neither preflight reached the app
    # An origin no matcher allows gets no CORS headers; Istio's default (unmatchedPreflights
    # FORWARD) passes its preflight on to the app.
    denied = await routes.call("/api/items", method="OPTIONS", **{**preflight, "origin": "https://evil.example.com"})
    assert denied.status == 200 and access_control(denied) == {}
    assert denied.body["method"] == "OPTIONS" and await routes.served("v1") == before + 1


async def test_cors_simple_request_gets_allow_origin_only_for_allowed_origins(routes: Routes) -> None:
    await routes.route(CORS_ROUTES)
    allowed = await routes.call("/api/items", origin="https://shop.example.com")
    assert allowed.status == 200 and allowed.body["version"] == "v1"
    assert access_control(allowed) == {
        "access-control-allow-origin": "https://shop.example.com",
        "access-control-expose-headers": "x-served-by",
        "access-control-allow-credentials": "true",
    }
    denied = await routes.call("/api/items", origin="https://evil.example.com")
    assert denied.status == 200 and access_control(denied) == {}  # CORS is for browsers to enforce
    elsewhere = await routes.call("/other", origin="https://shop.example.com")
    assert elsewhere.status == 200 and access_control(elsewhere) == {}  # no policy on this route


async def test_cors_unmatched_preflights_ignore_keeps_them_from_the_app(routes: Routes) -> None:
    await routes.route(CORS_ROUTES.replace("maxAge: 24h", "unmatchedPreflights: IGNORE"))
    before = await routes.served("v1")
    denied = await routes.call(
        "/api/items", method="OPTIONS", origin="https://evil.example.com", access_control_request_method="POST"
    )
    # Envoy answers it itself, without access-control-allow-origin, so a browser refuses the call.
    assert denied.status == 200 and denied.body == {}
    assert "access-control-allow-origin" not in access_control(denied)
    assert await routes.served("v1") == before


async def tls_exchange(routes: Routes, sni: str, context: ssl.SSLContext) -> tuple[bytes, bytes]:
    """Send a line over TLS through frontend's TLS listener: (the reply, the server's certificate)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(routes.addresses["frontend"], routes.tls_port, ssl=context, server_hostname=sni), 5
    )
    try:
        certificate = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(b"ping\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5), certificate
    finally:
        writer.close()


async def test_tls_route_passes_the_connection_through_by_sni(routes: Routes) -> None:
    verifying = ssl.create_default_context(cafile=routes.ca_file)  # checks the chain and the SNI name
    for _ in range(3):
        # The client verifies the backend's own certificate: the sidecar forwarded the TLS bytes untouched.
        assert await tls_exchange(routes, "secure.example.com", verifying) == (b"v1:ping\n", routes.certs["v1"])
        assert await tls_exchange(routes, "alias.example.com", verifying) == (b"v2:ping\n", routes.certs["v2"])
    # An SNI name no tls route (and no service) claims matches no filter chain: the sidecar refuses
    # it, even to a client that would accept any certificate.
    trusting = ssl.create_default_context()
    trusting.check_hostname, trusting.verify_mode = False, ssl.CERT_NONE
    assert (await tls_exchange(routes, "secure.example.com", trusting))[0] == b"v1:ping\n"
    with pytest.raises((OSError, asyncio.IncompleteReadError)) as refused:
        await tls_exchange(routes, "other.example.com", trusting)
    assert not isinstance(refused.value, TimeoutError)  # closed at once, not left hanging


async def test_an_app_header_shortens_or_extends_the_route_timeout(routes: Routes) -> None:
    """Istio's traffic-management concepts: an app may override the route's timeout per request
    with ``x-envoy-upstream-rq-timeout-ms``; the sidecar's outbound listener honours it."""
    await routes.route(
        "  - match: [{uri: {prefix: /long}}]\n    timeout: 10s\n" + TO_V1 + "  - timeout: 0.3s\n" + TO_V1
    )
    await routes.control("v1", delay_ms=1000)
    try:
        assert (await routes.call("/long")).status == 200  # 1s of work within the route's 10s
        assert (await routes.call("/long", x_envoy_upstream_rq_timeout_ms="200")).status == 504  # shortened
        assert (await routes.call("/short")).status == 504  # 1s of work beyond the route's 0.3s
        assert (await routes.call("/short", x_envoy_upstream_rq_timeout_ms="5000")).status == 200  # extended
    finally:
        await routes.control("v1", delay_ms=0)


async def attempts(routes: Routes, **headers: str) -> tuple[int, int]:
    """(status, requests the always-failing v1 app saw) for one call through frontend."""
    await routes.control("v1", reset_counters=True)
    status = (await routes.call("/", **headers)).status
    return status, await routes.served("v1")


async def test_an_app_header_sets_the_number_of_retries_and_503_is_not_retried_by_default(routes: Routes) -> None:
    """``x-envoy-max-retries`` replaces the route's attempts per request; Istio's default policy
    (no ``retries`` field) does not retry a 503 (Istio 1.24 on), an explicit ``retryOn`` does."""
    await routes.route(
        "  - match: [{uri: {prefix: /}, headers: {x-policy: {exact: explicit}}}]\n"
        "    retries: {attempts: 2, retryOn: 5xx, backoff: 1ms}\n" + TO_V1 + "  - name: default-policy\n" + TO_V1
    )
    await routes.control("v1", fail_rate=1.0, fail_status=503)
    try:
        assert await attempts(routes) == (503, 1)  # the default policy leaves a 503 alone
        assert await attempts(routes, x_policy="explicit") == (503, 3)  # 1 try + 2 retries
        assert await attempts(routes, x_policy="explicit", x_envoy_max_retries="5") == (503, 6)
        assert await attempts(routes, x_policy="explicit", x_envoy_max_retries="0") == (503, 1)
        # The app can also say what to retry on; the header count applies to it.
        assert await attempts(routes, x_envoy_retry_on="5xx", x_envoy_max_retries="3") == (503, 4)
    finally:
        await routes.control("v1", fail_rate=0.0, reset_counters=True)


async def test_weights_are_relative_three_and_one_split_traffic_75_25(routes: Routes) -> None:
    """Istio 1.15 on: weights need not add up to 100; Envoy sums them itself."""
    await routes.route(
        "  - route:\n"
        "    - {destination: {host: web, subset: v1}, weight: 3}\n"
        "    - {destination: {host: web, subset: v2}, weight: 1}\n"
    )
    seen = Counter([(await routes.call("/")).body["version"] for _ in range(400)])
    assert set(seen) == {"v1", "v2"} and 250 <= seen["v1"] <= 350, seen  # 300 expected, sd 8.7
