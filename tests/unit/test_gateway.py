"""Gateway: Istio's validation with field paths, server conversion, and the router's listeners and routes."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from pilot.api import ApiObject, InvalidObjectError, parse_object
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate
from pilot.xds import typeurls
from pilot.xds.snapshot import Snapshot


def obj(kind: str, name: str, spec: dict[str, Any], namespace: str = "default") -> ApiObject:
    meta = {"name": name, "namespace": namespace}
    return parse_object({"apiVersion": "networking.istio.io/v1", "kind": kind, "metadata": meta, "spec": spec})


def server(number: int, protocol: str, hosts: list[str], name: str = "", **tls: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"port": {"number": number, "name": name or f"p{number}", "protocol": protocol}}
    out["hosts"] = hosts
    if tls:
        out["tls"] = tls
    return out


def gateway(*servers: dict[str, Any], selector: dict[str, str] | None = None) -> ApiObject:
    return obj("Gateway", "gw", {"selector": selector or {"istio": "ingress"}, "servers": list(servers)}, "edge")


def issues(kind: str, spec: dict[str, Any]) -> list[str]:
    with pytest.raises(InvalidObjectError) as err:
        obj(kind, "bad", spec)
    return [str(i) for i in err.value.issues]


SIMPLE = {"mode": "SIMPLE", "serverCertificate": "/c.pem", "privateKey": "/k.pem"}


def test_gateway_validation_names_every_bad_field() -> None:
    found = issues(
        "Gateway",
        {
            "servers": [
                {"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["*"]},
                {
                    "port": {"number": 444, "name": "https", "protocol": "HTTPS"},
                    "hosts": ["a.com"],
                    "tls": {"mode": "MUTUAL"},
                },
                {"port": {"number": 80, "name": "web"}, "hosts": []},
                {"port": {"number": 81, "name": "x", "protocol": "HTTP"}, "hosts": ["*"], "tls": SIMPLE},
            ]
        },
    )
    assert "spec.servers[0].tls: required for protocol HTTPS" in found
    assert "spec.servers[1].port.name: duplicate port name 'https' among servers" in found
    assert "spec.servers[1].tls.serverCertificate: MUTUAL TLS requires a server certificate" in found
    assert "spec.servers[1].tls.caCertificates: MUTUAL TLS requires a client CA bundle" in found
    assert "spec.servers[2].hosts: at least one host is required" in found
    assert "spec.servers[2].port.protocol: required for a Gateway server" in found
    assert any(i.startswith("spec.servers[3].tls: a plain-text HTTP server may only set httpsRedirect") for i in found)
    assert issues("Gateway", {"servers": []}) == ["spec.servers: a gateway needs at least one server"]


@pytest.mark.parametrize("host", ["bad host", "ns/Bad", "a/b/c", "~/x.com"])
def test_gateway_host_syntax(host: str) -> None:
    found = issues("Gateway", {"servers": [server(80, "HTTP", [host])]})
    assert found and found[0].startswith("spec.servers[0].hosts[0]: "), found


def test_credential_name_is_served_from_secrets() -> None:
    gw = gateway(server(443, "HTTPS", ["*"], mode="SIMPLE", credentialName="secret"), server(80, "HTTP", ["*"]))
    assert list(gw.warnings) == []
    mesh = build_mesh([gw])
    assert [s.port for s in mesh.scoping.gateways[0].servers] == [443, 80]
    tls = mesh.scoping.gateways[0].servers[0].tls
    assert tls is not None and tls.credential_names == ("secret",) and tls.server_certificate == ""
    # ISTIO_MUTUAL is served, with the gateway's mesh certificates (tests/unit/test_peer_authentication.py).
    istio_mutual = build_mesh([gateway(server(443, "HTTPS", ["*"], mode="ISTIO_MUTUAL"))])
    assert [s.tls.mode for s in istio_mutual.scoping.gateways[0].servers if s.tls] == ["ISTIO_MUTUAL"]


def test_virtual_service_gateway_refs_and_export_to_are_validated() -> None:
    found = issues("VirtualService", {"hosts": ["a"], "gateways": ["Bad Name"], "exportTo": ["*", "ns1"]})
    assert any(i.startswith("spec.gateways[0]: 'Bad Name' is not 'mesh'") for i in found)
    assert "spec.exportTo: '*' cannot be combined with other entries" in found


SERVICES = [
    obj(
        "ServiceEntry",
        name,
        {
            "hosts": [f"{name}.default.svc.cluster.local"],
            "resolution": "STATIC",
            "ports": [{"number": 8000, "name": "http"}],
            "endpoints": [{"address": f"127.0.0.{60 + i}"}],
        },
    )
    for i, name in enumerate(("web", "api"))
]


def route(host: str, dest: str, gateways: list[str], namespace: str = "default", **extra: Any) -> ApiObject:
    spec = {"hosts": [host], "gateways": gateways, "http": [{"route": [{"destination": {"host": dest}}]}], **extra}
    return obj("VirtualService", f"{dest}-{host.replace('*', 'any').replace('.', '-')}", spec, namespace)


def router(namespace: str = "edge", labels: dict[str, str] | None = None) -> ProxyClass:
    return ProxyClass(
        ProxyKind.ROUTER,
        namespace,
        labels=tuple(sorted((labels or {"istio": "ingress"}).items())),
        bind_address="127.0.0.70",
        workload="gw",
    )


def resources(objs: list[ApiObject], proxy: ProxyClass | None = None) -> dict[str, dict[str, Any]]:
    out = generate(build_mesh(objs), proxy or router())
    assert Snapshot.from_resources(out).consistency_errors() == []
    return out


def vhosts(out: dict[str, dict[str, Any]], name: str) -> dict[str, list[str]]:
    return {v.name: list(v.domains) for v in out[typeurls.ROUTE][name].virtual_hosts}


def test_host_admission_by_namespace_and_wildcard() -> None:
    gw = gateway(server(8080, "HTTP", ["./own.example.com", "default/*.shop.com", "*/any.example.com"]))
    objs = [
        gw,
        *SERVICES,
        route("own.example.com", "web", ["edge/gw"]),  # `.` means the Gateway's namespace: not default
        route("own.example.com", "web.default.svc.cluster.local", ["gw"], namespace="edge"),
        route("*.shop.com", "web", ["edge/gw"]),  # wildcard VS host inside the server's wildcard
        route("any.example.com", "api", ["edge/gw"], namespace="default"),
        route("mesh-only.example.com", "api", ["mesh"]),
    ]
    assert vhosts(resources(objs), "http.8080") == {
        "*.shop.com:8080": ["*.shop.com"],
        "any.example.com:8080": ["any.example.com"],
        "own.example.com:8080": ["own.example.com"],
    }
    warnings = build_mesh(objs).warnings
    assert any("host own.example.com is not exposed to namespace default by Gateway edge/gw" in w for w in warnings)


def test_only_selected_routers_get_listeners_and_export_to_applies() -> None:
    objs = [
        gateway(server(8080, "HTTP", ["*/*"])),
        *SERVICES,
        route("a.example.com", "web", ["edge/gw"]),
        route("b.example.com", "web", ["edge/gw"], exportTo=["."]),  # private to default: not the gateway's ns
    ]
    out = resources(objs)
    assert list(out[typeurls.LISTENER]) == ["127.0.0.70_8080"]
    assert list(vhosts(out, "http.8080")) == ["a.example.com:8080"]
    other = resources(objs, router(labels={"istio": "egress"}))
    assert other[typeurls.LISTENER] == {} and other[typeurls.ROUTE] == {}
    assert other[typeurls.CLUSTER]  # clusters still come, for the services it may reach


def hcm_of(listener: Any, chain: int = 0) -> Any:
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[chain].filters[0].typed_config.Unpack(hcm)
    return hcm


def test_https_servers_share_a_port_by_sni_with_their_own_certificates() -> None:
    admin = {**SIMPLE, "serverCertificate": "/admin.pem", "privateKey": "/admin.key", "minProtocolVersion": "TLSV1_3"}
    objs = [
        gateway(
            server(443, "HTTPS", ["*/shop.com"], name="https-shop", **SIMPLE),
            server(443, "HTTPS", ["*/admin.com"], name="https-admin", **admin),
            server(443, "HTTPS", ["*/shop.com", "*/x.com"], name="https-clash", **SIMPLE),
        ),
        *SERVICES,
        route("shop.com", "web", ["edge/gw"]),
        route("admin.com", "api", ["edge/gw"]),
    ]
    listener = resources(objs)[typeurls.LISTENER]["127.0.0.70_443"]
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.tls_inspector"]
    assert [list(c.filter_chain_match.server_names) for c in listener.filter_chains] == [["shop.com"], ["admin.com"]]
    assert [hcm_of(listener, i).rds.route_config_name for i in (0, 1)] == [
        "https.443.https-shop.gw.edge",
        "https.443.https-admin.gw.edge",
    ]
    ctx = tls_pb2.DownstreamTlsContext()
    assert listener.filter_chains[1].transport_socket.typed_config.Unpack(ctx)
    cert = ctx.common_tls_context.tls_certificates[0]
    assert (cert.certificate_chain.filename, cert.private_key.filename) == ("/admin.pem", "/admin.key")
    assert ctx.common_tls_context.tls_params.tls_minimum_protocol_version == 4  # TLSv1_3
    assert not ctx.HasField("require_client_certificate")


def test_server_conflicts_are_reported_for_declared_gateway_workloads() -> None:
    workload = obj("WorkloadEntry", "gw", {"address": "127.0.0.70", "labels": {"istio": "ingress"}}, "edge")
    objs = [
        gateway(
            server(443, "HTTPS", ["*/shop.com"], name="a", **SIMPLE),
            server(443, "HTTPS", ["*/shop.com"], name="b", **SIMPLE),
            server(443, "HTTP", ["*"], name="c"),
        ),
        workload,
    ]
    warnings = build_mesh(objs).warnings
    assert any("servers[1] (HTTPS) on port 443 conflicts with servers[0] (HTTPS)" in w for w in warnings)
    assert any("servers[2] (HTTP) on port 443 conflicts with servers[0] (HTTPS)" in w for w in warnings)


def test_mutual_tls_requires_and_verifies_client_certificates() -> None:
    mutual: dict[str, Any] = {**SIMPLE, "mode": "MUTUAL", "caCertificates": "/ca.pem",
                              "subjectAltNames": ["client.example.com"]}
    objs = [gateway(server(443, "HTTPS", ["*"], **mutual)), *SERVICES, route("*", "web", ["edge/gw"])]
    listener = resources(objs)[typeurls.LISTENER]["127.0.0.70_443"]
    ctx = tls_pb2.DownstreamTlsContext()
    assert listener.filter_chains[0].transport_socket.typed_config.Unpack(ctx)
    assert ctx.require_client_certificate.value is True
    validation = ctx.common_tls_context.validation_context
    assert validation.trusted_ca.filename == "/ca.pem"
    assert {m.matcher.exact for m in validation.match_typed_subject_alt_names} == {"client.example.com"}
    assert list(listener.filter_chains[0].filter_chain_match.server_names) == []  # "*": any SNI


def test_client_certificate_pins_and_crl_are_validated_and_translated() -> None:
    pins = {"verifyCertificateHash": ["AB:" * 31 + "CD"], "verifyCertificateSpki": ["A" * 43 + "="],
            "caCrl": "/crl.pem"}
    mutual: dict[str, Any] = {**SIMPLE, "mode": "MUTUAL", "caCertificates": "/ca.pem", **pins}
    objs = [gateway(server(443, "HTTPS", ["*"], **mutual)), *SERVICES, route("*", "web", ["edge/gw"])]
    ctx = tls_pb2.DownstreamTlsContext()
    chain = resources(objs)[typeurls.LISTENER]["127.0.0.70_443"].filter_chains[0]
    assert chain.transport_socket.typed_config.Unpack(ctx)
    validation = ctx.common_tls_context.validation_context
    assert validation.crl.filename == "/crl.pem"
    assert list(validation.verify_certificate_hash) == ["AB:" * 31 + "CD"]
    assert list(validation.verify_certificate_spki) == ["A" * 43 + "="]

    bad = {**mutual, "verifyCertificateHash": ["abc"], "verifyCertificateSpki": ["not-base64"]}
    found = issues("Gateway", {"servers": [server(443, "HTTPS", ["*"], **bad)]})
    assert any(i.startswith("spec.servers[0].tls.verifyCertificateHash[0]: 'abc' is not a hex SHA-256") for i in found)
    spki = "spec.servers[0].tls.verifyCertificateSpki[0]: 'not-base64' is not a base64"
    assert any(i.startswith(spki) for i in found)
    simple = gateway(server(443, "HTTPS", ["*"], **SIMPLE, caCrl="/crl.pem"))
    assert [str(w) for w in simple.warnings] == [
        "spec.servers[0].tls.caCrl: checks client certificates: MUTUAL and OPTIONAL_MUTUAL only; ignored"]


def test_https_redirect_and_merged_virtual_services() -> None:
    objs = [
        gateway(server(80, "HTTP", ["*/shop.com"], httpsRedirect=True)),
        *SERVICES,
        obj(
            "VirtualService",
            "first",
            {
                "hosts": ["shop.com"],
                "gateways": ["edge/gw"],
                "http": [{"match": [{"uri": {"prefix": "/api"}}], "route": [{"destination": {"host": "api"}}]}],
            },
        ),
        route("shop.com", "web", ["edge/gw"]),
    ]
    config = resources(objs)[typeurls.ROUTE]["http.80"]
    (vhost,) = config.virtual_hosts
    assert vhost.require_tls == vhost.ALL
    assert [r.match.prefix for r in vhost.routes] == ["/api", "/"]  # oldest (then by name) first
    assert any("merged after VirtualService default/first" in w for w in build_mesh(objs).warnings)


def test_a_merged_virtual_service_without_http_routes_is_not_said_to_be_shadowed() -> None:
    """Only http routes can sit behind an earlier catch-all; a later rule of tcp routes only gets
    the plain merge note."""
    catch_all = route("shop.com", "web", ["edge/gw"])
    tcp_only = obj("VirtualService", "tcp", {"hosts": ["shop.com"], "gateways": ["edge/gw"],
                                             "tcp": [{"route": [{"destination": {"host": "api"}}]}]})
    http_later = obj("VirtualService", "later", {"hosts": ["shop.com"], "gateways": ["edge/gw"],
                                                 "http": [{"route": [{"destination": {"host": "api"}}]}]})
    base = [gateway(server(80, "HTTP", ["*/shop.com"])), *SERVICES, catch_all]
    warnings = build_mesh([*base, tcp_only]).warnings
    notes = [w for w in warnings if "VirtualService default/tcp" in w and "merged after" in w]
    assert notes and not any("never match" in w for w in notes)
    shadowed = [w for w in build_mesh([*base, http_later]).warnings if "VirtualService default/later" in w]
    assert any("never match" in w for w in shadowed)
