"""The pure parts of gateway certificates over ADS (`pilot.xds.secrets`, `pilot.kube.secrets`)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from prometheus_client import CollectorRegistry

from meshctl.devcerts import DevCa
from pilot.kube.secrets import checked_material, material_of
from pilot.model.gateway import ServerTls
from pilot.model.proxy import ProxyClass, ProxyIdentity, ProxyKind
from pilot.translate.gateway_tls import downstream_tls_context
from pilot.xds import typeurls
from pilot.xds.cache import SnapshotCache
from pilot.xds.secrets import (
    MaterialError,
    SecretGrant,
    SecretServer,
    TlsMaterial,
    namespace_secrets,
    refused,
)
from pilot.xds.server import AdsServer
from pilot.xds.snapshot import Snapshot
from pilot.xds.status import StatusRegistry, XdsMetrics


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("secret-certs")
    ca = DevCa.create("unit secrets CA")
    one, two = ca.issue(directory, "one", ["shop.example.com"]), ca.issue(directory, "two", ["shop.example.com"])
    return {"cert": Path(one.cert).read_bytes(), "key": Path(one.key).read_bytes(),
            "other_key": Path(two.key).read_bytes(), "ca": ca.write_ca(directory / "ca.pem").read_bytes()}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kube_secret(ns: str, name: str, **data: bytes) -> dict[str, object]:
    encoded = {k.replace("_", "."): _b64(v) for k, v in data.items()}
    return {"metadata": {"namespace": ns, "name": name}, "data": encoded}


def test_secrets_are_named_as_istio_names_them(pems: dict[str, bytes]) -> None:
    both = TlsMaterial(pems["cert"], pems["key"], ca=pems["ca"], crl=b"crl")
    out = namespace_secrets({"shop": both, "ca-only": TlsMaterial(ca=pems["ca"]),
                             "cert-only": TlsMaterial(pems["cert"], pems["key"])})
    assert sorted(out) == ["kubernetes://ca-only-cacert", "kubernetes://cert-only", "kubernetes://shop",
                           "kubernetes://shop-cacert"]
    shop = out["kubernetes://shop"]
    assert shop.tls_certificate.certificate_chain.inline_bytes == pems["cert"]
    assert shop.tls_certificate.private_key.inline_bytes == pems["key"]
    assert out["kubernetes://shop-cacert"].validation_context.trusted_ca.inline_bytes == pems["ca"]
    assert out["kubernetes://shop-cacert"].validation_context.crl.inline_bytes == b"crl"


def test_a_dedicated_cacert_secret_wins_and_holds_no_certificate(pems: dict[str, bytes]) -> None:
    out = namespace_secrets({"shop": TlsMaterial(pems["cert"], pems["key"], ca=b"inline ca"),
                             "shop-cacert": TlsMaterial(pems["cert"], pems["key"], ca=pems["ca"])})
    assert sorted(out) == ["kubernetes://shop", "kubernetes://shop-cacert"]
    assert out["kubernetes://shop-cacert"].validation_context.trusted_ca.inline_bytes == pems["ca"]


def test_kube_secret_material_by_istio_key_names(pems: dict[str, bytes]) -> None:
    tls = material_of(kube_secret("a", "s", tls_crt=pems["cert"], tls_key=pems["key"], ca_crt=pems["ca"]))
    assert tls == TlsMaterial(pems["cert"], pems["key"], ca=pems["ca"])
    generic = material_of({"metadata": {}, "data": {"cert": _b64(pems["cert"]), "key": _b64(pems["key"])},
                           "stringData": {"cacert": pems["ca"].decode()}})
    assert generic == TlsMaterial(pems["cert"], pems["key"], ca=pems["ca"])
    assert material_of(kube_secret("a", "s", password=b"x")) is None
    assert "key=" not in repr(tls)  # the key never shows in a repr
    assert pems["key"].decode()[40:80] not in repr(tls)


def test_a_key_that_is_not_the_certificates_is_refused_without_its_value(
        pems: dict[str, bytes], caplog: pytest.LogCaptureFixture) -> None:
    secret = kube_secret("a", "bad", tls_crt=pems["cert"], tls_key=pems["other_key"])
    with pytest.raises(MaterialError, match="does not match the certificate"):
        material_of(secret)
    assert checked_material(secret) is None
    assert "Secret a/bad: not served to gateways: the private key does not match" in caplog.text
    assert pems["other_key"].decode()[40:80] not in caplog.text
    with pytest.raises(MaterialError, match=r"data\.tls\.crt is not base64"):
        material_of({"data": {"tls.crt": "%%%", "tls.key": _b64(pems["key"])}})


def test_refused_names_cross_namespace_and_certificates_without_authorization() -> None:
    names = frozenset({"kubernetes://shop", "kubernetes://shop-cacert", "kubernetes://other/shop", "file-cert:x"})
    allowed = refused(SecretGrant("a", "gw", True), names)
    assert sorted(allowed) == ["file-cert:x", "kubernetes://other/shop"]
    assert "not readable from namespace 'a'" in allowed["kubernetes://other/shop"]
    denied = refused(SecretGrant("a", "gw", False, "no RBAC"), names)
    assert denied["kubernetes://shop"] == "no RBAC" and "kubernetes://shop-cacert" not in denied


def test_server_views_are_per_namespace_shared_and_follow_changes(pems: dict[str, bytes]) -> None:
    server = SecretServer()
    server.replace({("a", "shop"): TlsMaterial(pems["cert"], pems["key"], ca=pems["ca"]),
                    ("b", "web"): TlsMaterial(pems["cert"], pems["key"])})
    full, cas = SecretGrant("a", "gw", True), SecretGrant("a", "gw", False, "denied")
    view = server.view(full)
    assert sorted(view) == ["kubernetes://shop", "kubernetes://shop-cacert"]
    assert server.view(full) is view  # shared by every stream of the namespace until a change
    assert sorted(server.view(cas)) == ["kubernetes://shop-cacert"]  # CA bundles are public
    assert sorted(server.view(SecretGrant("c", "gw", True))) == []
    assert view["kubernetes://shop"].type_url == typeurls.SECRET
    decoded = secret_pb2.Secret.FromString(view["kubernetes://shop"].value)
    assert decoded.tls_certificate.private_key.inline_bytes == pems["key"]

    woken: list[str] = []
    with server.watch("a", lambda: woken.append("a")), server.watch("b", lambda: woken.append("b")):
        server.put("a", "shop", TlsMaterial(pems["cert"], pems["key"], ca=pems["ca"]))  # unchanged: no wake
        assert woken == [] and server.view(full) is view
        server.put("a", "shop", None)
        assert woken == ["a"] and sorted(server.view(full)) == []
        server.replace({("b", "web"): TlsMaterial(pems["cert"], pems["key"])})  # a re-list: nothing changed
        assert woken == ["a"]
    server.put("a", "shop", TlsMaterial(pems["cert"], pems["key"]))
    assert woken == ["a"]  # no stream watches any more


def test_grant_asks_the_authorizer() -> None:
    asked: list[tuple[str, str]] = []

    async def authorize(ns: str, sa: str) -> str | None:
        asked.append((ns, sa))
        return None if sa == "gw" else f"{sa} may not list secrets"

    server = SecretServer(authorize)
    assert asyncio.run(server.grant("a", "gw")) == SecretGrant("a", "gw", True)
    assert asyncio.run(server.grant("a", "web")) == SecretGrant("a", "web", False, "web may not list secrets")
    assert asyncio.run(SecretServer().grant("a", "x")).certificates
    assert asked == [("a", "gw"), ("a", "web")]


def test_credential_context_asks_ads_on_kubernetes_and_the_agent_locally() -> None:
    tls = ServerTls(mode="MUTUAL", server_certificate="", private_key="", credential_names=("shop",))
    for over_ads, wants_ads in ((True, True), (False, False)):
        context = downstream_tls_context(tls, over_ads=over_ads)
        assert isinstance(context, tls_pb2.DownstreamTlsContext)
        common = context.common_tls_context
        cert = common.tls_certificate_sds_secret_configs[0]
        ca = common.combined_validation_context.validation_context_sds_secret_config
        assert (cert.name, ca.name) == ("kubernetes://shop", "kubernetes://shop-cacert")
        for config in (cert.sds_config, ca.sds_config):
            assert config.HasField("ads") is wants_ads
            assert config.HasField("api_config_source") is not wants_ads
            assert config.initial_fetch_timeout.seconds == 5


def test_only_authenticated_routers_get_a_grant(pems: dict[str, bytes]) -> None:
    ads = AdsServer(SnapshotCache(), StatusRegistry(XdsMetrics(CollectorRegistry())))
    ads.secrets = SecretServer()
    ads.secrets.put("a", "shop", TlsMaterial(pems["cert"], pems["key"]))

    def proxy(kind: ProxyKind) -> ProxyIdentity:
        return ProxyIdentity(f"{kind.value}~127.0.0.1~gw.a~a.svc.cluster.local", "c", ProxyClass(kind, "a"),
                             service_account="gw")

    router, sidecar = proxy(ProxyKind.ROUTER), proxy(ProxyKind.SIDECAR)
    assert asyncio.run(ads.secrets.stream_grant(router, authenticated=False)) is None  # plaintext: never
    assert asyncio.run(ads.secrets.stream_grant(sidecar, authenticated=True)) is None
    grant = asyncio.run(ads.secrets.stream_grant(router, authenticated=True))
    assert grant == SecretGrant("a", "gw", True)
    # The stream's snapshot: the class's, with the namespace's secrets; the cached one has none.
    cached = Snapshot.from_resources({})
    latest, secrets = ads._parts(cached, grant)
    assert latest is cached and sorted(secrets) == ["kubernetes://shop"]
    assert len(cached.of(typeurls.SECRET)) == 0
    assert ads._parts(cached, None) == (cached, None)
