"""Errors raised while reading Istio API documents, and the issues they carry.

Every error names the object it is about (kind, namespace/name, when known) and every
issue names a field path (``spec.http[0].route[1].weight``), so a message can be shown to
a user as-is and points at the line to fix. The hierarchy::

    ApiError                      base class; catch this to handle any bad document
    ├── MalformedDocumentError    not an object at all: not a mapping, no apiVersion/kind,
    │   │                         no metadata.name
    │   └── UnsupportedKindError  a well-formed object of a kind or apiVersion we do not serve
    └── InvalidObjectError        a served kind whose fields break the schema or Istio's
                                  rules; ``issues`` lists every problem found, not only the first

Warnings (unknown fields, legal-but-suspicious values) are never raised: they are
``FieldIssue`` values collected on the parsed object (``ApiObject.warnings``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class FieldIssue:
    """One problem with one field: ``path`` is dotted from the document root."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


def object_ref(kind: str | None, namespace: str | None, name: str | None) -> str:
    """``Kind namespace/name`` with whatever parts are known, for message prefixes."""
    ident = "/".join(p for p in (namespace, name) if p)
    return " ".join(p for p in (kind or "", ident) if p) or "document"


class ApiError(ValueError):
    """A document could not be turned into an API object."""

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        namespace: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(f"{object_ref(kind, namespace, name)}: {message}")
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.reason = message


class MalformedDocumentError(ApiError):
    """The document is not a Kubernetes-style object (apiVersion, kind, metadata.name)."""


class UnsupportedKindError(MalformedDocumentError):
    """The object is well-formed but its apiVersion/kind is not one meshctl serves."""


class InvalidObjectError(ApiError):
    """A served kind whose fields are invalid; ``issues`` holds every field problem."""

    def __init__(
        self,
        issues: Sequence[FieldIssue],
        *,
        kind: str | None = None,
        namespace: str | None = None,
        name: str | None = None,
    ) -> None:
        self.issues = tuple(issues) or (FieldIssue("", "invalid"),)
        super().__init__("; ".join(map(str, self.issues)), kind=kind, namespace=namespace, name=name)
