"""The admission response's patch: an RFC 6902 JSONPatch from the pod as received to the pod injected.

The webhook never builds patch operations by hand: `inject` returns the whole new pod and
`jsonpatch.make_patch` diffs the two, so what the API server applies is exactly what `meshctl
kube-inject` prints for the same pod. An unchanged pod gives an empty patch (no `patch` field in
the response). Cost: one walk over both documents, a few hundred microseconds for a typical pod.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import jsonpatch


def pod_patch(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """The operations turning `before` into `after` (empty when they are equal)."""
    ops: list[dict[str, Any]] = jsonpatch.make_patch(before, after).patch
    return ops


def encode_patch(ops: list[dict[str, Any]]) -> str:
    """Base64 of the patch's JSON, as AdmissionReview v1 `response.patch` carries it."""
    return base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode()
