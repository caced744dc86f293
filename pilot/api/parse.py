"""Turning one decoded YAML/JSON document into a typed, validated API object."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pydantic

from pilot.api.base import ApiObject, collect_issues
from pilot.api.destination_rule import DestinationRule
from pilot.api.errors import FieldIssue, InvalidObjectError, MalformedDocumentError, UnsupportedKindError
from pilot.api.gateway import Gateway
from pilot.api.security_kinds import SECURITY_GROUP, SECURITY_KINDS, SECURITY_VERSIONS
from pilot.api.service_entry import ServiceEntry, WorkloadEntry
from pilot.api.sidecar import Sidecar
from pilot.api.virtual_service import VirtualService

GROUP = "networking.istio.io"
# Istio serves one schema under all three versions; so do we.
VERSIONS = ("v1", "v1beta1", "v1alpha3")
KINDS: Mapping[str, type[ApiObject]] = {
    cls.KIND: cls for cls in (ServiceEntry, WorkloadEntry, DestinationRule, VirtualService, Gateway, Sidecar)
}

# What pydantic says, in the words of Istio's validation and the Kubernetes schema ("must be a list").
_EXPECTED = {
    "list_type": "a list", "tuple_type": "a list", "set_type": "a list", "frozen_set_type": "a list",
    "dict_type": "a map", "model_type": "a map of fields", "model_attributes_type": "a map of fields",
    "string_type": "a string", "string_unicode": "a string",
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "datetime_type": "an RFC 3339 timestamp", "datetime_parsing": "an RFC 3339 timestamp",
    "datetime_from_date_parsing": "an RFC 3339 timestamp",
}  # fmt: skip
_BOUNDS = {
    "greater_than_equal": ("ge", "must be at least {}"), "greater_than": ("gt", "must be greater than {}"),
    "less_than_equal": ("le", "must be at most {}"), "less_than": ("lt", "must be less than {}"),
    "too_long": ("max_length", "must have at most {} entries"),
    "too_short": ("min_length", "must have at least {} entries"),
    "string_too_long": ("max_length", "must be at most {} characters"),
}  # fmt: skip


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
    security = group == SECURITY_GROUP
    kinds, versions = (SECURITY_KINDS, SECURITY_VERSIONS) if security else (KINDS, VERSIONS)
    cls = kinds.get(kind)
    if cls is None or group not in (GROUP, SECURITY_GROUP) or version not in versions:
        # Name what the group the document claims does serve (both groups if it claims neither).
        groups = [(SECURITY_KINDS, SECURITY_GROUP, SECURITY_VERSIONS)] if security else (
            [(KINDS, GROUP, VERSIONS)] if group == GROUP else
            [(KINDS, GROUP, VERSIONS), (SECURITY_KINDS, SECURITY_GROUP, SECURITY_VERSIONS)])
        served = "; ".join(f"kinds {', '.join(sorted(k))} of {g}/{'|'.join(v)}" for k, g, v in groups)
        raise UnsupportedKindError(
            f"{api_version} {kind} is not served ({served})",
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
    """One FieldIssue per pydantic error, with the document's (camelCase) field path, in Istio's words."""
    return [FieldIssue(format_loc(err["loc"]), istio_message(err)) for err in exc.errors()]


def istio_message(err: Mapping[str, Any]) -> str:
    """Pydantic's error as Istio's validation words it: ``must be a list, not a string``.

    Why: pydantic's wording names Python types ("Input should be a valid tuple") that a user
    writing YAML never sees; Istio and Kubernetes name what the field must be. Our own rule
    errors (type ``meshctl``) are already in those words and pass through unchanged.
    """
    kind: str = err["type"]
    ctx: Mapping[str, Any] = err.get("ctx") or {}
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind in _EXPECTED:
        return f"must be {_EXPECTED[kind]}, not {yaml_kind(err.get('input'))}"
    if kind in ("enum", "literal_error") and "expected" in ctx:
        return f"must be one of {ctx['expected'].replace(' or ', ', ')}, not {err.get('input')!r}"
    if kind == "string_too_short":
        minimum = ctx.get("min_length", 1)
        return "must not be empty" if minimum == 1 else f"must be at least {minimum} characters"
    if kind in _BOUNDS and _BOUNDS[kind][0] in ctx:
        key, text = _BOUNDS[kind]
        return text.format(ctx[key])
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    return str(err["msg"])


def yaml_kind(value: object) -> str:
    """What a decoded YAML value is, in YAML's terms, for "must be X, not Y" messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, Mapping):
        return "a map"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def format_loc(loc: tuple[int | str, ...]) -> str:
    """``('spec', 'http', 0, 'route', 1, 'weight')`` -> ``spec.http[0].route[1].weight``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out = f"{out}.{part}" if out else str(part)
    return out
