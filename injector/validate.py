"""The validation webhook's core (Galley's role): is this mesh object acceptable, and what to warn.

`review_object(request)` takes an AdmissionReview v1 `request` for a `networking.istio.io` or
`security.istio.io` object and returns a `Verdict`. It parses the object with pilot's own
`pilot.api.parse_object`, so the rejection message is exactly the one the file source reports for
the same document (`VirtualService ns/name: spec.http[0].route[0].weight: must be at most 100`),
and every warning the parse collects (unknown fields, deprecated fields, suspicious values)
becomes an AdmissionReview warning that kubectl prints as `Warning: ...`.

Not checked, and allowed: deletions, status writes (a subresource: the leader's conditions),
objects of other groups, and kinds of the mesh groups pilot does not serve (a warning says they
are not validated, so a user with more Istio CRDs installed is never blocked by us).
Pure and synchronous; costs one parse of the object (well under a millisecond for typical rules).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pilot.api import ApiError, UnsupportedKindError, parse_object
from pilot.api.errors import object_ref
from pilot.api.parse import GROUP
from pilot.api.security_kinds import SECURITY_GROUP

MESH_GROUPS = (GROUP, SECURITY_GROUP)
# kubectl shows at most this many warnings' worth of text per response (the API server truncates
# warnings beyond 4 KiB in total); keep the first ones, which point at the first bad fields.
MAX_WARNINGS = 20


@dataclass(frozen=True)
class Verdict:
    """Allowed or not; the reason to show when not; warnings either way."""

    allowed: bool
    message: str = ""
    warnings: tuple[str, ...] = field(default=())
    # For `galley_validation_*` (`injector.metrics`): "" a mesh object admitted, else Istio's
    # failure reason; None for what is not reviewed at all (subresources, other groups).
    failure: str | None = None


def _with_namespace(obj: Mapping[str, Any], namespace: str | None) -> dict[str, Any]:
    """The object with the request's namespace filled in (absent from some create requests)."""
    doc = dict(obj)
    meta = dict(doc.get("metadata") or {})
    if namespace and not meta.get("namespace"):
        meta["namespace"] = namespace
    doc["metadata"] = meta
    return doc


def review_object(request: Mapping[str, Any]) -> Verdict:
    """The verdict for one AdmissionReview `request` (see the module docstring)."""
    group = str((request.get("kind") or {}).get("group", ""))
    if request.get("subResource") or group not in MESH_GROUPS:
        return Verdict(True)
    if request.get("operation") not in ("CREATE", "UPDATE"):
        return Verdict(True, failure="unsupported_operation")
    obj = request.get("object")
    if not isinstance(obj, Mapping):
        return Verdict(True)
    doc = _with_namespace(obj, request.get("namespace"))
    try:
        parsed = parse_object(doc)
    except UnsupportedKindError as exc:
        return Verdict(True, warnings=(f"{exc}; not validated by meshctl",), failure="")
    except ApiError as exc:
        return Verdict(False, str(exc), failure="invalid_resource")
    ref = object_ref(*parsed.key)
    return Verdict(True, warnings=tuple(f"{ref}: {w}" for w in parsed.warnings[:MAX_WARNINGS]), failure="")
