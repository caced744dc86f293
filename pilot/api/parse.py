"""Turning one decoded YAML/JSON document into a typed, validated API object."""

from __future__ import annotations

from collections.abc import Mapping

import pydantic

from pilot.api.base import ApiObject, collect_issues
from pilot.api.destination_rule import DestinationRule
from pilot.api.errors import FieldIssue, InvalidObjectError, MalformedDocumentError, UnsupportedKindError
from pilot.api.gateway import Gateway
from pilot.api.service_entry import ServiceEntry, WorkloadEntry
from pilot.api.sidecar import Sidecar
from pilot.api.virtual_service import VirtualService

GROUP = "networking.istio.io"
# Istio serves one schema under all three versions; so do we.
VERSIONS = ("v1", "v1beta1", "v1alpha3")
KINDS: Mapping[str, type[ApiObject]] = {
    cls.KIND: cls for cls in (ServiceEntry, WorkloadEntry, DestinationRule, VirtualService, Gateway, Sidecar)
}

# What pydantic says, in the words Istio's validation uses.
_MESSAGES = {"missing": "required", "extra_forbidden": "unknown field"}


def parse_object(doc: object) -> ApiObject:
    """Validate ``doc`` (a decoded document) as one of the kinds in ``KINDS``.

    Raises an ``ApiError`` subclass naming the object and every bad field; on success the
    object's ``warnings`` list unknown fields and suspicious values.
    """
    if not isinstance(doc, Mapping):
        raise MalformedDocumentError(f"a document must be a mapping, not {type(doc).__name__}")
    kind, namespace, name = _identity(doc)
    api_version = doc.get("apiVersion")
    if not kind or not isinstance(api_version, str) or not api_version:
        raise MalformedDocumentError(
            "apiVersion and kind are required", kind=kind, namespace=namespace, name=name
        )
    if not name:
        raise MalformedDocumentError("metadata.name is required", kind=kind, namespace=namespace)
    group, _, version = api_version.rpartition("/")
    cls = KINDS.get(kind)
    if cls is None or group != GROUP or version not in VERSIONS:
        served = ", ".join(sorted(KINDS))
        raise UnsupportedKindError(
            f"{api_version} {kind} is not served (kinds {served} of {GROUP}/{'|'.join(VERSIONS)})",
            kind=kind,
            namespace=namespace,
            name=name,
        )
    try:
        obj = cls.model_validate(doc)
    except pydantic.ValidationError as exc:
        raise InvalidObjectError(
            issues_from_pydantic(exc), kind=kind, namespace=namespace, name=name
        ) from None
    errors, warnings = collect_issues(obj)
    if errors:
        raise InvalidObjectError(errors, kind=kind, namespace=namespace, name=name)
    obj._warnings = tuple(warnings)
    return obj


def _identity(doc: Mapping[object, object]) -> tuple[str | None, str | None, str | None]:
    """Best-effort kind, namespace and name of a document, for error messages."""
    kind = doc.get("kind")
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name, namespace = meta.get("name"), meta.get("namespace", "default")
    return (
        kind if isinstance(kind, str) and kind else None,
        namespace if isinstance(namespace, str) else None,
        name if isinstance(name, str) and name else None,
    )


def issues_from_pydantic(exc: pydantic.ValidationError) -> list[FieldIssue]:
    """One FieldIssue per pydantic error, with the document's (camelCase) field path."""
    return [
        FieldIssue(format_loc(err["loc"]), _MESSAGES.get(err["type"], err["msg"])) for err in exc.errors()
    ]


def format_loc(loc: tuple[int | str, ...]) -> str:
    """``('spec', 'http', 0, 'route', 1, 'weight')`` -> ``spec.http[0].route[1].weight``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out
