"""Put the mesh root into the webhook configurations' `caBundle`, so the API server trusts istiod.

`meshctl install` applies the Mutating- and ValidatingWebhookConfiguration without a caBundle
(the root does not exist until the CA starts). At start, and whenever the root changes, istiod
calls `patch_ca_bundles`: for each configuration it reads the object and sends one JSON patch
setting `clientConfig.caBundle` on every webhook whose bundle differs, guarded by a `test` of
each webhook's name (a configuration edited meanwhile makes the patch fail instead of landing on
the wrong webhook; the next call retries). It needs exactly `get` and `patch` on those two
objects by name, which is what the rendered ClusterRole grants.

`ca_bundle_patch` is the pure part. Each call costs one GET and at most one PATCH per
configuration; nothing is sent when the bundle is already current.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshctl.kubeapply import Applier, KubeApiError, describe, object_path

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

FIELD_MANAGER = "meshctl-istiod"
ADMISSION = "admissionregistration.k8s.io/v1"


@dataclass(frozen=True)
class PatchResult:
    """What `patch_ca_bundles` did to one configuration."""

    kind: str
    name: str
    patched: int  # webhooks whose caBundle changed (0: already current)
    found: bool = True


def ca_bundle_patch(config: Mapping[str, Any], ca_pem: bytes) -> list[dict[str, Any]]:
    """The JSON patch (RFC 6902) setting every webhook's caBundle to `ca_pem`; [] when all match."""
    bundle = base64.b64encode(ca_pem).decode()
    ops: list[dict[str, Any]] = []
    for i, hook in enumerate(config.get("webhooks") or ()):
        if hook.get("clientConfig", {}).get("caBundle") == bundle:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook["name"]})
        ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": bundle})
    return ops


async def patch_ca_bundles(api: ApiClient, ca_pem: bytes, *, mutating: Sequence[str] = (),
                           validating: Sequence[str] = ()) -> list[PatchResult]:
    """Set the caBundle of the named configurations; a missing one is reported (found=False), not an error.

    Raises `KubeApiError` (naming the configuration and the API server's reason) when a read or
    the patch is refused, e.g. a concurrent edit made the `test` operation fail (422 or 409).
    """
    applier = Applier(api, FIELD_MANAGER)
    targets = [("MutatingWebhookConfiguration", n) for n in mutating]
    targets += [("ValidatingWebhookConfiguration", n) for n in validating]
    results = []
    for kind, name in targets:
        ref = {"apiVersion": ADMISSION, "kind": kind, "metadata": {"name": name}}
        config = await applier.get(ref)
        if config is None:
            results.append(PatchResult(kind, name, 0, found=False))
            continue
        ops = ca_bundle_patch(config, ca_pem)
        if ops:
            await _patch(applier, ref, ops)
        results.append(PatchResult(kind, name, len(ops) // 2))
    return results


async def _patch(applier: Applier, ref: Mapping[str, Any], ops: list[dict[str, Any]]) -> None:
    status, data = await applier.request("PATCH", object_path(ref), body=ops,
                                         content_type="application/json-patch+json",
                                         query=[("fieldManager", applier.field_manager)])
    if not 200 <= status < 300:
        raise KubeApiError(f"{describe(ref)}: caBundle patch refused: {data.get('message', status)}", status)
