"""When to try a Kubernetes API request again: the rule client-go (kubectl) follows.

Kept apart from the modules that import `kubernetes_asyncio` (its client package loads every
model class, ~36 MB): `meshctl`'s install path uses this rule without paying for that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import aiohttp

T = TypeVar("T")

# As client-go (kubectl): a 429 or 5xx answer carrying Retry-After is tried again after that many
# seconds (capped), up to this many times. The API server answers so while a new CRD's storage
# initializes ("storage is (re)initializing") and when API Priority and Fairness sheds load.
RETRIES = 10
MAX_RETRY_AFTER = 10.0


def retry_after(status: int, header: str | None) -> float | None:
    """Seconds to wait before trying again, if the answer asks for it (429 or 5xx with Retry-After
    in seconds); None if it is final."""
    if (status != 429 and status < 500) or header is None:
        return None
    try:
        seconds = float(header.strip())
    except ValueError:
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


async def retrying(send: Callable[[], Awaitable[tuple[int, str | None, T]]], retries: int = RETRIES) -> tuple[int, T]:
    """`send()` -> (status, Retry-After header, what was read), sent again while the answer asks for
    it (`retry_after`), at most `retries` more times; the last answer's (status, what was read)."""
    for _ in range(retries):
        status, header, read = await send()
        wait = retry_after(status, header)
        if wait is None:
            return status, read
        await asyncio.sleep(wait)
    status, _, read = await send()
    return status, read


async def call_api(api_client: Any, method: str, path: str, *, body: object = None,
                   query: Iterable[tuple[str, str]] = (), content_type: str = "application/json",
                   timeout: float = 30.0, retries: int = RETRIES) -> tuple[int, bytes]:
    """One JSON request to the API server through `api_client` (a `kubernetes_asyncio` ApiClient:
    its address and credentials), sent again while the answer asks for it (`retrying`); the last
    answer's (status, body). No answer at all (`aiohttp.ClientError`, `OSError`, `TimeoutError`)
    propagates: each caller names it in its own error. The one place discovery, the leader
    election, the status writer, the CA store and `meshctl install` send requests from."""
    headers = {"Accept": "application/json", "Content-Type": content_type}

    async def send() -> tuple[int, str | None, bytes]:
        resp: aiohttp.ClientResponse = await api_client.call_api(
            path, method, query_params=list(query), header_params=headers, body=body,
            auth_settings=["BearerToken"], _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=timeout))
        async with resp:
            return resp.status, resp.headers.get("Retry-After"), await resp.read()

    return await retrying(send, retries)
