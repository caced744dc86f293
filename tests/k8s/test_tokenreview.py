"""Kubernetes workload identity against a real API server: projected service-account tokens, reviewed
by the API server (TokenReview, audience `istio-ca`), are the only credential the CA's CSR service
trusts; the identity comes from the review, never from the CSR.

The CA reviews tokens with the least privilege Istio's CA has: a service account bound to the
`system:auth-delegator` ClusterRole. Every namespace and binding made here is deleted at the end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from prometheus_client import CollectorRegistry

from citadel.app import Citadel
from citadel.client import CSRClient
from citadel.csr import build_csr
from citadel.identity import SpiffeId
from citadel.keys import KeyAlgorithm, certs_pem, generate_key
from citadel.settings import CitadelSettings
from citadel.tokenreview import CachedTokenReview, KubeTokenReviewClient
from meshctl.localmesh import free_port
from tests.k8s.cluster import SA_ISSUER, KubeCluster

pytestmark = pytest.mark.e2e

AUDIENCE = "istio-ca"


@dataclass(frozen=True)
class Accounts:
    """A test namespace with service accounts `a` and `b`, and the CA's reviewer kubeconfig."""

    namespace: str
    reviewer_kubeconfig: Path

    def token(self, cluster: KubeCluster, account: str, audience: str = AUDIENCE) -> str:
        out = cluster.kubectl("-n", self.namespace, "create", "token", account, "--audience", audience)
        return out.stdout.strip()


@pytest.fixture
def accounts(kube_cluster: KubeCluster, tmp_path: Path) -> Iterator[Accounts]:
    ns = f"idt-{secrets.token_hex(4)}"
    binding = f"meshctl-test-reviewer-{ns}"
    kube_cluster.kubectl("create", "namespace", ns)
    try:
        for account in ("a", "b", "istiod"):
            kube_cluster.kubectl("-n", ns, "create", "serviceaccount", account)
        kube_cluster.kubectl("create", "clusterrolebinding", binding, "--clusterrole=system:auth-delegator",
                             f"--serviceaccount={ns}:istiod")
        reviewer_token = kube_cluster.kubectl("-n", ns, "create", "token", "istiod").stdout.strip()
        kubeconfig = tmp_path / "reviewer.kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "ca",
            "clusters": [{"name": "c", "cluster": {"server": kube_cluster.server,
                                                   "certificate-authority": str(kube_cluster.ca_file)}}],
            "users": [{"name": "ca", "user": {"token": reviewer_token}}],
            "contexts": [{"name": "ca", "context": {"cluster": "c", "user": "ca"}}],
        }))
        yield Accounts(ns, kubeconfig)
    finally:
        kube_cluster.kubectl("delete", "clusterrolebinding", binding, "--ignore-not-found", check=False)
        kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@dataclass
class Now:
    """A settable wall clock for the cache (the API server keeps its own real clock)."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class CA:
    citadel: Citadel
    cache: CachedTokenReview
    now: Now

    def client(self) -> CSRClient:
        return CSRClient(f"127.0.0.1:{self.citadel.port}", certs_pem(self.citadel.ca.trust_bundle()).encode())


@pytest.fixture
async def ca(accounts: Accounts, tmp_path: Path) -> AsyncIterator[CA]:
    settings = CitadelSettings(ca_dir=tmp_path / "ca", grpc_port=0, trust_domain="cluster.local")
    citadel = Citadel(settings, CollectorRegistry())
    now = Now()
    async with await KubeTokenReviewClient.open(accounts.reviewer_kubeconfig) as reviews:
        cache = CachedTokenReview(reviews, ttl=timedelta(seconds=60), clock=now)
        citadel.use_token_review(cache)
        async with citadel:
            yield CA(citadel, cache, now)


def _csr(uri: str | None) -> str:
    key = generate_key(KeyAlgorithm.ECDSA_P256)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)] if uri else []
    return build_csr(key, sans)


def _identity(chain: list[str]) -> list[str]:
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]


def _spiffe(ns: str, sa: str) -> str:
    return SpiffeId("cluster.local", ns, sa).uri


async def _refusal(ca: CA, csr: str, token: str) -> grpc.StatusCode:
    async with ca.client() as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.create_certificate(csr, token=token)
    return info.value.code()


async def test_projected_token_with_mesh_audience_gets_exactly_its_spiffe_id(
        kube_cluster: KubeCluster, accounts: Accounts, ca: CA) -> None:
    token = accounts.token(kube_cluster, "a")
    uri = _spiffe(accounts.namespace, "a")
    async with ca.client() as client:
        chain = await client.create_certificate(_csr(uri), token=token)
        assert _identity(chain) == [uri]
        # A CSR without SANs gets the caller's identity too: it comes from the review, not the CSR.
        assert _identity(await client.create_certificate(_csr(None), token=token)) == [uri]


async def test_token_for_another_audience_is_unauthenticated(
        kube_cluster: KubeCluster, accounts: Accounts, ca: CA) -> None:
    for audience in ("not-istio-ca", SA_ISSUER):  # a foreign service's token; the API server's default audience
        token = accounts.token(kube_cluster, "a", audience)
        assert await _refusal(ca, _csr(_spiffe(accounts.namespace, "a")), token) == grpc.StatusCode.UNAUTHENTICATED
    assert len(ca.cache) == 0


async def test_token_of_another_account_never_gets_the_identity_it_asks_for(
        kube_cluster: KubeCluster, accounts: Accounts, ca: CA) -> None:
    token_b = accounts.token(kube_cluster, "b")
    ask_for_a = _csr(_spiffe(accounts.namespace, "a"))
    assert await _refusal(ca, ask_for_a, token_b) == grpc.StatusCode.PERMISSION_DENIED
    async with ca.client() as client:
        assert _identity(await client.create_certificate(_csr(None), token=token_b)) == [
            _spiffe(accounts.namespace, "b")]


def _jwt(key: rsa.RSAPrivateKey, claims: dict[str, object]) -> str:
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    signing_input = part(json.dumps({"alg": "RS256", "typ": "JWT"}).encode()) + "." + part(
        json.dumps(claims).encode())
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + part(signature)


def _cluster_signed_token(cluster: KubeCluster, ns: str, account: str, exp: int) -> str:
    """A service-account token signed with the cluster's own key (what kube-apiserver would issue)."""
    key = serialization.load_pem_private_key((cluster.workdir / "pki" / "sa.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    uid = cluster.kubectl("-n", ns, "get", "serviceaccount", account, "-o", "jsonpath={.metadata.uid}").stdout
    return _jwt(key, {
        "iss": SA_ISSUER, "aud": [AUDIENCE], "sub": f"system:serviceaccount:{ns}:{account}",
        "iat": exp - 600, "nbf": exp - 600, "exp": exp,
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": account, "uid": uid}},
    })


async def test_expired_and_garbage_tokens_are_unauthenticated(
        kube_cluster: KubeCluster, accounts: Accounts, ca: CA) -> None:
    ns = accounts.namespace
    csr = _csr(_spiffe(ns, "a"))
    # Control: the same construction with a future expiry is accepted, so expiry alone refuses the next one.
    fresh = _cluster_signed_token(kube_cluster, ns, "a", int(time.time()) + 600)
    async with ca.client() as client:
        assert _identity(await client.create_certificate(csr, token=fresh)) == [_spiffe(ns, "a")]
    expired = _cluster_signed_token(kube_cluster, ns, "a", int(time.time()) - 120)
    assert await _refusal(ca, csr, expired) == grpc.StatusCode.UNAUTHENTICATED
    for garbage in ("not-a-jwt", fresh[:-8] + "AAAAAAAA"):  # not a token; a token with a broken signature
        assert await _refusal(ca, csr, garbage) == grpc.StatusCode.UNAUTHENTICATED


async def test_reviews_are_cached_briefly_and_a_deleted_account_loses_its_certificates_after_the_ttl(
        kube_cluster: KubeCluster, accounts: Accounts, ca: CA) -> None:
    ns = accounts.namespace
    token = accounts.token(kube_cluster, "a")
    csr = _csr(_spiffe(ns, "a"))
    async with ca.client() as client:
        await client.create_certificate(csr, token=token)
        await client.create_certificate(csr, token=token)
    assert (ca.cache.misses, ca.cache.hits, len(ca.cache)) == (1, 1, 1)
    kube_cluster.kubectl("-n", ns, "delete", "serviceaccount", "a")
    async with ca.client() as client:  # within the TTL the cached review still answers
        assert _identity(await client.create_certificate(csr, token=token)) == [_spiffe(ns, "a")]
    # Past our TTL every CSR asks the API server again; it refuses once its own success cache (about
    # 10 s in kube-apiserver) has forgotten the token.
    deadline = time.monotonic() + 40
    code: grpc.StatusCode | None = None
    while code is None:
        ca.now.offset += 61
        misses = ca.cache.misses
        async with ca.client() as client:
            try:
                await client.create_certificate(csr, token=token)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
        assert ca.cache.misses == misses + 1
        assert code is not None or time.monotonic() < deadline, "the deleted account kept getting certificates"
        await asyncio.sleep(0 if code else 1)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert len(ca.cache) == 0


async def test_cache_is_bounded_and_never_outlives_the_token(kube_cluster: KubeCluster, accounts: Accounts) -> None:
    now = Now()
    async with await KubeTokenReviewClient.open(accounts.reviewer_kubeconfig) as reviews:
        cache = CachedTokenReview(reviews, ttl=timedelta(hours=2), max_entries=2, clock=now)
        tokens = [accounts.token(kube_cluster, sa) for sa in ("a", "b", "istiod")]
        for token in tokens:
            assert (await cache.review(token, [AUDIENCE])).authenticated
        assert len(cache) == 2
        await cache.review(tokens[0], [AUDIENCE])  # the oldest was dropped: asked again
        await cache.review(tokens[2], [AUDIENCE])  # still there
        assert (cache.misses, cache.hits) == (4, 1)
        # A 10-minute token stays cached for 10 minutes at most, although the TTL is 2 hours.
        short = kube_cluster.kubectl("-n", accounts.namespace, "create", "token", "a", "--audience", AUDIENCE,
                                     "--duration", "10m").stdout.strip()
        await cache.review(short, [AUDIENCE])
        now.offset = 9 * 60
        await cache.review(short, [AUDIENCE])
        assert (cache.misses, cache.hits) == (5, 2)
        now.offset = 11 * 60
        await cache.review(short, [AUDIENCE])
        assert cache.misses == 6


async def test_unreachable_api_server_fails_closed(kube_cluster: KubeCluster, accounts: Accounts,
                                                   tmp_path: Path) -> None:
    dead = tmp_path / "dead.kubeconfig"
    config = yaml.safe_load(accounts.reviewer_kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{free_port()}"
    dead.write_text(yaml.safe_dump(config))
    citadel = Citadel(CitadelSettings(ca_dir=tmp_path / "ca", grpc_port=0), CollectorRegistry())
    async with await KubeTokenReviewClient.open(dead) as reviews:
        citadel.use_token_review(reviews)
        async with citadel:
            ca = CA(citadel, CachedTokenReview(reviews), Now())
            token = accounts.token(kube_cluster, "a")
            assert await _refusal(ca, _csr(None), token) == grpc.StatusCode.UNAUTHENTICATED
