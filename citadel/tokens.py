"""Per-workload credentials for the local mesh: compact JWS tokens signed by the control plane.

A token is `base64url(header).base64url(claims).base64url(Ed25519 signature)` (RFC 7515/7519 shape,
`alg: EdDSA`, a `kid` naming the signing key) with claims:

    iss  the control plane's issuer name          aud  the mesh CA audience (Istio's default: istio-ca)
    sub  system:serviceaccount:<ns>:<sa>          iat/nbf/exp  issue time, not-before, expiry (seconds)
    jti  random id, so two tokens never collide in logs

The control plane issues one when `meshctl proxy run` starts a workload and writes it to a 0600
file the workload's agent reads; the agent presents it as `authorization: Bearer <token>` to the CSR
service. The subject mirrors a Kubernetes service-account token, so the CSR service handles both
paths alike. Verification cost: one Ed25519 verify (~50 µs) and a JSON parse; no network.
The verifier accepts several keys (by `kid`) so the signing key can be rotated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from citadel.errors import AuthenticationError
from citadel.files import write_secret_file

DEFAULT_AUDIENCE = "istio-ca"
DEFAULT_ISSUER = "meshctl-citadel"
MAX_TOKEN_BYTES = 8192
SA_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class WorkloadClaims:
    """What a verified token says: the caller's namespace and service account, and when it expires."""

    namespace: str
    service_account: str
    expires_at: datetime
    token_id: str


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """A short id for a verification key: the SHA-256 of its raw bytes, 16 hex digits."""
    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


class TokenIssuer:
    """Signs workload credentials with the control plane's Ed25519 key."""

    def __init__(self, key: ed25519.Ed25519PrivateKey, *, issuer: str = DEFAULT_ISSUER,
                 audience: str = DEFAULT_AUDIENCE) -> None:
        self._key = key
        self.kid = key_id(key.public_key())
        self.issuer = issuer
        self.audience = audience

    def issue(self, namespace: str, service_account: str, ttl: timedelta, now: datetime) -> str:
        """A token for `namespace`/`service_account`, valid from `now` for `ttl`."""
        if ttl <= timedelta(0):
            raise ValueError("token ttl must be positive")
        header = {"alg": "EdDSA", "typ": "JWT", "kid": self.kid}
        iat = int(now.timestamp())
        claims = {"iss": self.issuer, "aud": self.audience, "sub": f"{SA_PREFIX}{namespace}:{service_account}",
                  "iat": iat, "nbf": iat, "exp": iat + int(ttl.total_seconds()), "jti": secrets.token_hex(8)}
        signing_input = f"{_b64e(json.dumps(header).encode())}.{_b64e(json.dumps(claims).encode())}"
        return f"{signing_input}.{_b64e(self._key.sign(signing_input.encode('ascii')))}"

    def issue_to_file(self, path: Path, namespace: str, service_account: str, ttl: timedelta,
                      now: datetime) -> str:
        """Issue a token and write it to `path` (0600, atomically); returns the token."""
        token = self.issue(namespace, service_account, ttl, now)
        write_secret_file(path, token.encode("ascii"))
        return token


class TokenVerifier:
    """Checks workload credentials: signature by a known key, issuer, audience, time window, subject."""

    def __init__(self, keys: Iterable[ed25519.Ed25519PublicKey], *, issuer: str = DEFAULT_ISSUER,
                 audience: str = DEFAULT_AUDIENCE, leeway: timedelta = timedelta(0)) -> None:
        self._keys = {key_id(k): k for k in keys}
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway

    def verify(self, token: str, now: datetime) -> WorkloadClaims:
        """The token's claims, or AuthenticationError saying which check failed (never echoing the token)."""
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthenticationError(f"token is longer than {MAX_TOKEN_BYTES} bytes")
        parts = token.split(".")
        if len(parts) != 3:
            raise AuthenticationError("token is not a compact JWS (header.claims.signature)")
        header = self._json(parts[0], "header")
        key = self._keys.get(str(header.get("kid")))
        if header.get("alg") != "EdDSA" or key is None:
            raise AuthenticationError(f"token header: alg {header.get('alg')!r} / kid {header.get('kid')!r} "
                                      "is not a known signing key")
        try:
            key.verify(_b64d(parts[2]), f"{parts[0]}.{parts[1]}".encode("ascii"))
        except (InvalidSignature, ValueError, binascii.Error, UnicodeEncodeError):
            raise AuthenticationError("token signature is invalid") from None
        return self._check_claims(self._json(parts[1], "claims"), now)

    @staticmethod
    def _json(part: str, what: str) -> dict[str, Any]:
        try:
            value = json.loads(_b64d(part))
        except (ValueError, binascii.Error):
            raise AuthenticationError(f"token {what} is not base64url JSON") from None
        if not isinstance(value, dict):
            raise AuthenticationError(f"token {what} is not a JSON object")
        return value

    def _check_claims(self, claims: dict[str, Any], now: datetime) -> WorkloadClaims:
        if claims.get("iss") != self.issuer:
            raise AuthenticationError(f"token claim iss {claims.get('iss')!r} is not {self.issuer!r}")
        aud = claims.get("aud")
        if aud != self.audience and not (isinstance(aud, list) and self.audience in aud):
            raise AuthenticationError(f"token claim aud {aud!r} does not include {self.audience!r}")
        exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
        if not isinstance(exp, int) or not isinstance(nbf, int):
            raise AuthenticationError("token claims exp/nbf must be integers")
        ts = now.timestamp()
        if ts >= exp + self.leeway.total_seconds():
            raise AuthenticationError(f"token expired at {datetime.fromtimestamp(exp, now.tzinfo).isoformat()}")
        if ts < nbf - self.leeway.total_seconds():
            raise AuthenticationError("token is not valid yet (nbf in the future)")
        sub = claims.get("sub")
        fields = sub[len(SA_PREFIX):].split(":") if isinstance(sub, str) and sub.startswith(SA_PREFIX) else []
        if len(fields) != 2 or not all(fields):
            raise AuthenticationError(f"token claim sub {sub!r} is not system:serviceaccount:<ns>:<sa>")
        return WorkloadClaims(fields[0], fields[1], datetime.fromtimestamp(exp, now.tzinfo), str(claims.get("jti")))
