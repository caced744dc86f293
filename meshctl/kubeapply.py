"""Apply, read and delete plain-dict Kubernetes objects through the API server (server-side apply).

`meshctl install` needs `kubectl apply` without kubectl: `Applier.apply` sends each object as a
server-side apply patch (`application/apply-patch+yaml`, field manager `meshctl-install`,
conflicts forced), so a second install changes only what differs and leaves fields that others
own (istiod's patched `caBundle`) alone. Paths come from a fixed table of the kinds meshctl
renders (`RESOURCES`), so no discovery round trips are needed.

Errors: `KubeApiError` carries the HTTP status and the API server's own message, with the
object it was about. Concurrency: one coroutine at a time per `Applier`; each call is one
HTTP request on the `ApiClient`'s pool.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp

from pilot.kube.retry import call_api

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

FIELD_MANAGER = "meshctl-install"
# (apiVersion, kind) -> (plural, namespaced): every kind meshctl.render emits.
RESOURCES: Mapping[tuple[str, str], tuple[str, bool]] = {
    ("v1", "Namespace"): ("namespaces", False),
    ("v1", "ServiceAccount"): ("serviceaccounts", True),
    ("v1", "ConfigMap"): ("configmaps", True),
    ("v1", "Service"): ("services", True),
    ("v1", "Secret"): ("secrets", True),
    ("apps/v1", "Deployment"): ("deployments", True),
    ("policy/v1", "PodDisruptionBudget"): ("poddisruptionbudgets", True),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): ("clusterroles", False),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): ("clusterrolebindings", False),
    ("rbac.authorization.k8s.io/v1", "Role"): ("roles", True),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rolebindings", True),
    ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"): ("mutatingwebhookconfigurations", False),
    ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration"): (
        "validatingwebhookconfigurations", False),
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): ("customresourcedefinitions", False),
}


class KubeApiError(Exception):
    """The API server refused a request (or could not be reached: `status` 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def describe(obj: Mapping[str, Any]) -> str:
    """`Deployment istio-system/istiod`: an object as messages name it."""
    meta = obj.get("metadata", {})
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {where}{meta.get('name')}"


def object_path(obj: Mapping[str, Any]) -> str:
    """The URL path of one object, e.g. `/apis/apps/v1/namespaces/istio-system/deployments/istiod`."""
    api_version, kind = str(obj.get("apiVersion")), str(obj.get("kind"))
    try:
        plural, namespaced = RESOURCES[(api_version, kind)]
    except KeyError:
        raise KubeApiError(f"{describe(obj)}: meshctl does not know where {api_version} {kind} is served") from None
    meta = obj["metadata"]
    base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    scope = f"/namespaces/{meta['namespace']}" if namespaced else ""
    return f"{base}{scope}/{plural}/{meta['name']}"


class Applier:
    """Server-side apply, get and delete through one `ApiClient` (owned by the caller)."""

    def __init__(self, api: ApiClient, field_manager: str = FIELD_MANAGER) -> None:
        self.api = api
        self.field_manager = field_manager

    async def request(self, method: str, path: str, *, body: object = None, query: Iterable[tuple[str, str]] = (),
                      content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
        """One call: (HTTP status, decoded JSON body or {}); KubeApiError only when there is no answer.

        An answer asking to be tried again (429 or 5xx with Retry-After: a new CRD's storage still
        initializing) is, as kubectl does (`pilot.kube.retry`)."""
        try:
            status, raw = await call_api(self.api, method, path, body=body, query=query, content_type=content_type)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise KubeApiError(f"{method} {path}: cannot reach the API server: {exc}") from exc
        text = raw.decode(errors="replace")
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            data = {"message": text[:500]}
        return status, data if isinstance(data, dict) else {}

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create or update `obj` to match (server-side apply); returns the object as stored."""
        status, data = await self.request(
            "PATCH", object_path(obj), body=dict(obj), content_type="application/apply-patch+yaml",
            query=[("fieldManager", self.field_manager), ("force", "true")])
        if not 200 <= status < 300:
            raise KubeApiError(f"{describe(obj)}: {data.get('message', status)}", status)
        return data

    async def get(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored object, or None if it does not exist."""
        status, data = await self.request("GET", object_path(obj))
        if status == 404:
            return None
        if not 200 <= status < 300:
            raise KubeApiError(f"{describe(obj)}: {data.get('message', status)}", status)
        return data

    async def delete(self, obj: Mapping[str, Any]) -> bool:
        """Delete `obj` (dependents in the background); False if it was already gone."""
        status, data = await self.request("DELETE", object_path(obj), query=[("propagationPolicy", "Background")])
        if status == 404:
            return False
        if not 200 <= status < 300:
            raise KubeApiError(f"{describe(obj)}: {data.get('message', status)}", status)
        return True

    async def wait_established(self, crds: Iterable[Mapping[str, Any]], timeout: float = 60.0) -> None:
        """Until every CRD reports `Established=True` (its kind is served); KubeApiError naming the laggard."""
        deadline = time.monotonic() + timeout
        for crd in crds:
            while not _established(await self.get(crd)):
                if time.monotonic() > deadline:
                    raise KubeApiError(f"{describe(crd)} not Established after {timeout:.0f}s")
                await asyncio.sleep(0.2)


def _established(crd: Mapping[str, Any] | None) -> bool:
    conditions = (crd or {}).get("status", {}).get("conditions", [])
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)
