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


SERVICE_ACCOUNTS_GROUP = "system:serviceaccounts"


@dataclass(frozen=True)
class TokenReviewResult:
    """What the API server said about a token (`status` of an authentication.k8s.io/v1 TokenReview).

    `pod_name` is set for a pod-bound token (`user.extra["authentication.kubernetes.io/pod-name"]`);
    it is only logged: like Istio's CA for sidecars, the identity does not require a bound pod.
    """

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    error: str = ""
    pod_name: str | None = None


class TokenReviewClient(Protocol):
    """The one Kubernetes call the TokenReview path needs (`citadel.tokenreview` implements it)."""

    async def review(self, token: str, audiences: Sequence[str]) -> TokenReviewResult:
        """POST authentication.k8s.io/v1 TokenReview; AuthenticationError if the call itself fails."""
        ...


class KubernetesTokenReviewAuthenticator:
    """Kubernetes: the workload's projected service-account token, checked by the API server.

    The agent reads its projected token (audience `istio-ca`, short expiry, bound to the pod) and
    sends it as the bearer token. This authenticator has the API server review it with
    `spec.audiences=[audience]` and accepts only when `status.error` is empty,
    `status.authenticated` is true, `status.audiences` contains the audience, the user is in the
    `system:serviceaccounts` group and `status.user.username` is `system:serviceaccount:<ns>:<sa>`,
    which becomes `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` (Istio's checks). The identity comes
    from the review alone, never from the CSR. The API server being unreachable is an
    authentication failure (fail closed); caching is the client's business
    (`citadel.tokenreview.CachedTokenReview`). Without a client it refuses every caller.
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
        result = await self._client.review(credentials.bearer_token, [self._audience])
        if result.error or not result.authenticated or self._audience not in result.audiences:
            why = result.error or f"not authenticated for audience {self._audience!r}"
            raise AuthenticationError(f"TokenReview rejected the token: {why}")
        if SERVICE_ACCOUNTS_GROUP not in result.groups:
            raise AuthenticationError(f"TokenReview user {result.username!r} is not in group {SERVICE_ACCOUNTS_GROUP}")
        parts = result.username.split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
            raise AuthenticationError(f"TokenReview user {result.username!r} is not a service account")
        via = self.name if result.pod_name is None else f"{self.name}, pod {result.pod_name}"  # for the log
        try:
            return Caller(SpiffeId(self._trust_domain, parts[2], parts[3]), via)
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
