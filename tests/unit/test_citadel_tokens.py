"""Workload credentials: issued by the control plane, verified by the CSR service."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from citadel.authn import Credentials, KubernetesTokenReviewAuthenticator, LocalTokenAuthenticator
from citadel.errors import AuthenticationError
from citadel.identity import SpiffeId
from citadel.testing import Clock
from citadel.tokens import TokenIssuer, TokenVerifier

KEY = ed25519.Ed25519PrivateKey.generate()


def verifier(**kwargs: object) -> TokenVerifier:
    return TokenVerifier([KEY.public_key()], **kwargs)  # type: ignore[arg-type]


def test_round_trip_names_namespace_and_service_account() -> None:
    clock = Clock()
    token = TokenIssuer(KEY).issue("shop", "cart", timedelta(hours=1), clock.now)
    claims = verifier().verify(token, clock.now)
    assert (claims.namespace, claims.service_account) == ("shop", "cart")
    assert claims.expires_at == clock.now + timedelta(hours=1)


def test_forged_tampered_expired_and_foreign_tokens_fail() -> None:
    clock = Clock()
    good = TokenIssuer(KEY).issue("shop", "cart", timedelta(hours=1), clock.now)
    forged = TokenIssuer(ed25519.Ed25519PrivateKey.generate()).issue("shop", "cart", timedelta(hours=1), clock.now)
    with pytest.raises(AuthenticationError, match="not a known signing key"):
        verifier().verify(forged, clock.now)
    # same kid, other key's signature: the signature check must catch it
    header, claims, _ = good.split(".")
    other_sig = forged.split(".")[2]
    with pytest.raises(AuthenticationError, match="signature is invalid"):
        verifier().verify(f"{header}.{claims}.{other_sig}", clock.now)
    body = json.loads(base64.urlsafe_b64decode(claims + "=="))
    body["sub"] = "system:serviceaccount:shop:admin"
    tampered = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    with pytest.raises(AuthenticationError, match="signature is invalid"):
        verifier().verify(f"{header}.{tampered}.{good.split('.')[2]}", clock.now)
    with pytest.raises(AuthenticationError, match="token expired"):
        verifier().verify(good, clock.now + timedelta(hours=1))
    with pytest.raises(AuthenticationError, match="claim aud"):
        verifier(audience="other").verify(good, clock.now)
    with pytest.raises(AuthenticationError, match="claim iss"):
        verifier(issuer="other").verify(good, clock.now)
    for junk in ("", "a.b", "not-base64!.x.y", "a" * 9000):
        with pytest.raises(AuthenticationError):
            verifier().verify(junk, clock.now)


def test_token_file_is_0600(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "token"
    token = TokenIssuer(KEY).issue_to_file(path, "shop", "cart", timedelta(hours=1), clock.now)
    assert path.read_text() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != "token"]  # no temporary file left behind


def test_local_authenticator_maps_token_to_spiffe_id() -> None:
    clock = Clock()
    auth = LocalTokenAuthenticator(verifier(), "example.org", clock)
    token = TokenIssuer(KEY).issue("shop", "cart", timedelta(hours=1), clock.now)
    caller = asyncio.run(auth.authenticate(Credentials(token, "ipv4:127.0.0.1:1")))
    assert caller.identity == SpiffeId("example.org", "shop", "cart")
    with pytest.raises(AuthenticationError, match="no bearer token"):
        asyncio.run(auth.authenticate(Credentials(None, "ipv4:127.0.0.1:1")))


def test_kubernetes_tokenreview_fails_closed_until_wired() -> None:
    auth = KubernetesTokenReviewAuthenticator(None, "cluster.local", "istio-ca")
    with pytest.raises(AuthenticationError, match="not configured"):
        asyncio.run(auth.authenticate(Credentials("t", "peer")))
