"""Who is calling the CSR service: authenticators turn a request's credential into a `SpiffeId`.

The CSR service asks each configured authenticator in turn; the first that accepts decides the
identity, and if none accepts the call fails UNAUTHENTICATED. Credentials arrive as gRPC metadata
`authorization: Bearer <token>` (as Istio's agents send them). Authenticators are awaited on the
server's event loop; the local one is pure CPU (~50 µs), the Kubernetes one is a network call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from citadel.errors import AuthenticationError
from citadel.identity import SpiffeId
from citadel.tokens import TokenVerifier

BEARER_PREFIX = "Bearer "


@dataclass(frozen=True)
class Credentials:
    """What a caller presented: the bearer token (if any) and its peer address, for logs."""

    bearer_token: str | None
    peer: str


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: its identity and the authenticator that vouched for it."""

    identity: SpiffeId
    authenticator: str


def bearer_from_metadata(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    """The token of the first `authorization: Bearer ...` entry, or None."""
    for key, value in metadata:
        if key.lower() == "authorization" and isinstance(value, str) and value.startswith(BEARER_PREFIX):
            return value[len(BEARER_PREFIX):].strip() or None
    return None


class Authenticator(Protocol):
    """Turns credentials into a caller, or raises AuthenticationError with a log-safe reason."""

    name: str

    async def authenticate(self, credentials: Credentials) -> Caller:
        """The caller, or AuthenticationError."""
        ...


class LocalTokenAuthenticator:
    """The local mesh: tokens signed by this control plane (see `citadel.tokens`)."""

    name = "local-token"

    def __init__(self, verifier: TokenVerifier, trust_domain: str, clock: Callable[[], datetime]) -> None:
        self._verifier = verifier
        self._trust_domain = trust_domain
        self._clock = clock

    async def authenticate(self, credentials: Credentials) -> Caller:
        """Verify the bearer token and map its subject to a SPIFFE id in this trust domain."""
        if credentials.bearer_token is None:
            raise AuthenticationError("no bearer token in the 'authorization' metadata")
        claims = self._verifier.verify(credentials.bearer_token, self._clock())
        try:
            identity = SpiffeId(self._trust_domain, claims.namespace, claims.service_account)
        except ValueError as exc:
            raise AuthenticationError(f"token subject is not a valid identity: {exc}") from None
        return Caller(identity, self.name)


class TokenReviewClient(Protocol):
    """The one Kubernetes call the TokenReview path needs (implemented with the Kubernetes issue)."""

    async def review(self, token: str, audiences: Sequence[str]) -> tuple[bool, str, Sequence[str]]:
        """POST authentication.k8s.io/v1 TokenReview; returns (authenticated, username, audiences)."""
        ...


class KubernetesTokenReviewAuthenticator:
    """Kubernetes: the workload's projected service-account token, checked by the API server.

    Design (wired with the Kubernetes issue): the agent reads its projected token (audience
    `istio-ca`, short expiry, bound to the pod) and sends it as the bearer token. This authenticator
    POSTs a TokenReview with `spec.token` and `spec.audiences=[audience]`; it accepts only when
    `status.authenticated` is true, `status.audiences` contains the audience and `status.user.username`
    is `system:serviceaccount:<ns>:<sa>`, which becomes `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.
    Results may be cached by token hash until shortly before the token's expiry. The API server
    being unreachable is an authentication failure (fail closed). Until a client is provided it
    refuses every caller.
    """

    name = "kubernetes-tokenreview"

    def __init__(self, client: TokenReviewClient | None, trust_domain: str, audience: str) -> None:
        self._client = client
        self._trust_domain = trust_domain
        self._audience = audience

    async def authenticate(self, credentials: Credentials) -> Caller:
        """Review the token with the API server (see the class docstring)."""
        if self._client is None:
            raise AuthenticationError("Kubernetes TokenReview is not configured")
        if credentials.bearer_token is None:
            raise AuthenticationError("no bearer token in the 'authorization' metadata")
        ok, username, audiences = await self._client.review(credentials.bearer_token, [self._audience])
        if not ok or self._audience not in audiences:
            raise AuthenticationError(f"TokenReview rejected the token for audience {self._audience!r}")
        parts = username.split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
            raise AuthenticationError(f"TokenReview user {username!r} is not a service account")
        try:
            return Caller(SpiffeId(self._trust_domain, parts[2], parts[3]), self.name)
        except ValueError as exc:
            raise AuthenticationError(f"TokenReview user is not a valid identity: {exc}") from None


async def authenticate(authenticators: Sequence[Authenticator], credentials: Credentials) -> Caller:
    """The first authenticator's caller that accepts; AuthenticationError listing every refusal otherwise."""
    reasons = []
    for authenticator in authenticators:
        try:
            return await authenticator.authenticate(credentials)
        except AuthenticationError as exc:
            reasons.append(f"{authenticator.name}: {exc}")
    raise AuthenticationError("; ".join(reasons) or "no authenticator configured")
