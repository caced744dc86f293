"""Istio ``networking.istio.io`` and ``security.istio.io`` API objects as validated pydantic models.

``parse_object(doc)`` is the one entry point from decoded YAML; ``pilot.api.errors``
documents what it raises. Models are frozen: sources produce them, nothing mutates them.
"""

from pilot.api.authorization import AuthorizationPolicy
from pilot.api.base import ApiObject, LabelSelector, ObjectMeta
from pilot.api.destination_rule import DestinationRule, Subset, TrafficPolicy
from pilot.api.errors import (
    ApiError,
    FieldIssue,
    InvalidObjectError,
    MalformedDocumentError,
    UnsupportedKindError,
)
from pilot.api.gateway import Gateway
from pilot.api.parse import GROUP, KINDS, VERSIONS, parse_object
from pilot.api.request_authentication import RequestAuthentication
from pilot.api.service_entry import (
    HTTP_PROTOCOLS,
    Location,
    Resolution,
    ServiceEntry,
    ServicePort,
    WorkloadEntry,
    WorkloadEntrySpec,
)
from pilot.api.sidecar import Sidecar
from pilot.api.virtual_service import HTTPRoute, VirtualService

__all__ = [
    "GROUP",
    "HTTP_PROTOCOLS",
    "KINDS",
    "VERSIONS",
    "ApiError",
    "ApiObject",
    "AuthorizationPolicy",
    "DestinationRule",
    "FieldIssue",
    "Gateway",
    "HTTPRoute",
    "InvalidObjectError",
    "LabelSelector",
    "Location",
    "MalformedDocumentError",
    "ObjectMeta",
    "RequestAuthentication",
    "Resolution",
    "ServiceEntry",
    "ServicePort",
    "Sidecar",
    "Subset",
    "TrafficPolicy",
    "UnsupportedKindError",
    "VirtualService",
    "WorkloadEntry",
    "WorkloadEntrySpec",
    "parse_object",
]
