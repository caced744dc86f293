"""The Kubernetes TokenReview client of the CA's `KubernetesTokenReviewAuthenticator`, and a bounded cache.

`KubeTokenReviewClient.review` POSTs an authentication.k8s.io/v1 TokenReview (`spec.token`,
`spec.audiences`) with kubernetes_asyncio and returns the API server's verdict as a
`TokenReviewResult`; a failed call (unreachable, 403 because the CA's account may not create
TokenReviews, a timeout) raises AuthenticationError, so the CSR fails closed. The CA's own
credentials need only `create` on `tokenreviews` (the `system:auth-delegator` ClusterRole).

`CachedTokenReview` keeps *authenticated* results, keyed by the SHA-256 of the token and the
audiences (the token itself is never kept), for at most `ttl` (60 s by default) and never past
the token's own `exp` claim (read without verifying: it can only shorten the entry's life). So a
deleted service account or pod stops getting certificates within `ttl`, and a fleet of agents
renewing together costs the API server one review per token per `ttl`. Refusals are not cached:
a token the API server rejects is asked about again (the CA's callers retry with backoff). At
most `max_entries` (4096) are kept; the oldest go first.

Concurrency: one event loop; the cache is a plain dict touched only between awaits. Two
identical concurrent misses both call the API server (harmless; the later result wins). Cost: a
hit is one SHA-256 of the token (~1 µs); a miss is one HTTPS round trip to the API server.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from citadel.authn import TokenReviewClient, TokenReviewResult
from citadel.errors import AuthenticationError

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
DEFAULT_CACHE_TTL = timedelta(seconds=60)
DEFAULT_CACHE_ENTRIES = 4096
REVIEW_TIMEOUT_S = 5.0


def result_from_status(status: client.V1TokenReviewStatus | None) -> TokenReviewResult:
    """The verdict in a TokenReview's `status` (an absent status is a refusal)."""
    if status is None:
        return TokenReviewResult(False, error="TokenReview has no status")
    user = status.user
    extra = (user.extra or {}) if user is not None else {}
    pods = extra.get(POD_NAME_EXTRA) or []
    return TokenReviewResult(
        authenticated=bool(status.authenticated),
        username=(user.username or "") if user is not None else "",
        audiences=tuple(status.audiences or ()),
        groups=tuple((user.groups or ()) if user is not None else ()),
        error=status.error or "",
        pod_name=pods[0] if pods else None,
    )


class KubeTokenReviewClient:
    """TokenReviews through one kubernetes_asyncio ApiClient; `open` builds it, `close` ends it."""

    def __init__(self, api: client.ApiClient, timeout_s: float = REVIEW_TIMEOUT_S) -> None:
        self._api = api
        self._authn = client.AuthenticationV1Api(api)
        self._timeout_s = timeout_s

    @classmethod
    async def open(cls, kubeconfig: Path | None) -> KubeTokenReviewClient:
        """A client from a kubeconfig file, or from the pod's in-cluster config when `kubeconfig` is None."""
        configuration = client.Configuration()
        try:
            if kubeconfig is None:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            else:
                await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration,
                                              persist_config=False)
        except (config.ConfigException, OSError) as exc:
            where = kubeconfig if kubeconfig is not None else "in-cluster config"
            raise AuthenticationError(f"TokenReview client: cannot load {where}: {exc}") from None
        return cls(client.ApiClient(configuration))

    async def review(self, token: str, audiences: Sequence[str]) -> TokenReviewResult:
        """Ask the API server about `token` for `audiences` (see the module docstring)."""
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=list(audiences)))
        try:
            review = await self._authn.create_token_review(body, _request_timeout=self._timeout_s)
        except ApiException as exc:
            raise AuthenticationError(f"TokenReview call failed: {exc.status} {exc.reason}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AuthenticationError(f"TokenReview call failed: {type(exc).__name__}: {exc}") from None
        return result_from_status(review.status)

    async def close(self) -> None:
        await self._api.close()

    async def __aenter__(self) -> KubeTokenReviewClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


def token_expiry(token: str) -> float | None:
    """The `exp` claim (Unix seconds) of a JWT, read without verifying; None if it has none."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


class CachedTokenReview:
    """A `TokenReviewClient` remembering authenticated results briefly (see the module docstring)."""

    def __init__(self, inner: TokenReviewClient, ttl: timedelta = DEFAULT_CACHE_TTL,
                 max_entries: int = DEFAULT_CACHE_ENTRIES, clock: Callable[[], float] = time.time) -> None:
        if ttl < timedelta(0) or max_entries < 1:
            raise ValueError(f"CachedTokenReview: ttl {ttl} must not be negative and max_entries {max_entries} "
                             "must be at least 1")
        self._inner = inner
        self._ttl = ttl.total_seconds()
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, TokenReviewResult]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(token: str, audiences: Sequence[str]) -> str:
        digest = hashlib.sha256(token.encode())
        for audience in sorted(audiences):
            digest.update(b"\0" + audience.encode())
        return digest.hexdigest()

    async def review(self, token: str, audiences: Sequence[str]) -> TokenReviewResult:
        """The cached verdict while fresh, else the inner client's (cached if authenticated)."""
        key = self._key(token, audiences)
        now = self._clock()
        found = self._entries.get(key)
        if found is not None and now < found[0]:
            self.hits += 1
            return found[1]
        self._entries.pop(key, None)
        self.misses += 1
        result = await self._inner.review(token, audiences)
        expires = min(now + self._ttl, token_expiry(token) or float("inf"))
        if result.authenticated and not result.error and expires > now:
            self._entries[key] = (expires, result)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)
        return result
