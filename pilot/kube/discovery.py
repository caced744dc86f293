"""API discovery: which of the mesh kinds the API server serves, and at which version.

For each group, the group's preferred version is used for a kind when it serves that kind,
else the first version the server lists (its priority order) that does; only versions pilot's
parser accepts are considered. A group or kind not installed (its CRD absent) is simply missing
from the answer: the caller asks again later. Cost: one GET per group and one per served
version of it (a few small JSON documents).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from kubernetes_asyncio.client import ApiClient

from pilot.kube.retry import RETRIES, call_api
from pilot.kube.watch import Resource, WatchError


async def get_json(api_client: ApiClient, path: str, timeout: float = 30.0,
                   retries: int = RETRIES) -> dict[str, Any] | None:
    """GET `path` as JSON through `api_client`; None on 404, `WatchError` on any other failure
    (after `retries` waits where the server asked to be tried again: see `RETRIES`)."""
    status, body = await call_api(api_client, "GET", path, timeout=timeout, retries=retries)
    if status == 404:
        return None
    if status != 200:
        raise WatchError(f"GET {path} answered {status}: {body[:300].decode(errors='replace')}", status)
    found = json.loads(body)
    return found if isinstance(found, dict) else None


async def served_kinds(api_client: ApiClient, group: str, kinds: Collection[str],
                       versions: Collection[str]) -> dict[str, Resource]:
    """kind -> the Resource to watch it at, for each of `kinds` the server serves in `group`."""
    info = await get_json(api_client, f"/apis/{group}")
    if info is None:
        return {}
    listed = [v.get("version") for v in info.get("versions") or () if isinstance(v, Mapping)]
    preferred = (info.get("preferredVersion") or {}).get("version")
    order = [v for v in [preferred, *listed] if isinstance(v, str) and v in versions]
    found: dict[str, Resource] = {}
    for version in dict.fromkeys(order):
        resources = await get_json(api_client, f"/apis/{group}/{version}")
        for res in (resources or {}).get("resources") or ():
            kind, plural = res.get("kind"), res.get("name", "")
            if kind in kinds and kind not in found and "/" not in plural and "watch" in res.get("verbs", ()):
                found[kind] = Resource(group, version, plural, kind, bool(res.get("namespaced", True)))
    return found
