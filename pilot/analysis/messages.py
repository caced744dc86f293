"""Analysis messages: stable codes, levels, and one message per finding.

Codes are Istio's (``pkg/config/analysis/msg/messages.yaml``) where Istio has an analyzer for the
same finding, so ``IST0101`` means the same thing in ``istioctl analyze`` and ``meshctl analyze``;
checks Istio lacks use codes of our own, ``MSH0xxx``, never a made-up ``IST`` one. A code never
changes meaning once released: scripts and ``--suppress`` rules depend on it.

A `Message` names the resource (kind, namespace/name), the field path inside it, what is wrong and
one sentence on how to fix it. Messages sort by (resource, path, code, text), so the same input
always prints the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Level(IntEnum):
    """Severity; a higher value is worse (``--failure-threshold`` compares them)."""

    INFO = 0
    WARNING = 1
    ERROR = 2

    @property
    def label(self) -> str:
        return self.name.capitalize()

    @classmethod
    def parse(cls, text: str) -> Level:
        """``Error``, ``warning``, ``INFO`` ... -> the level; ValueError names the choices."""
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"{text!r} is not a level (Error, Warning, Info)") from None


@dataclass(frozen=True)
class MessageType:
    """A kind of finding: its stable code, its name and its level."""

    code: str
    name: str
    level: Level


def _t(code: str, name: str, level: Level) -> MessageType:
    return MessageType(code, name, level)


E, W, I = Level.ERROR, Level.WARNING, Level.INFO  # noqa: E741

# Istio's codes (names and levels as in Istio's messages.yaml).
DEPRECATED = _t("IST0002", "Deprecated", W)
REFERENCED_RESOURCE_NOT_FOUND = _t("IST0101", "ReferencedResourceNotFound", E)
NAMESPACE_NOT_INJECTED = _t("IST0102", "NamespaceNotInjected", I)
POD_MISSING_PROXY = _t("IST0103", "PodMissingProxy", W)
SCHEMA_VALIDATION_ERROR = _t("IST0106", "SchemaValidationError", E)
CONFLICTING_MESH_GATEWAY_VS_HOSTS = _t("IST0109", "ConflictingMeshGatewayVirtualServiceHosts", E)
MULTIPLE_SIDECARS_WITHOUT_SELECTORS = _t("IST0111", "MultipleSidecarsWithoutWorkloadSelectors", E)
MTLS_POLICY_CONFLICT = _t("IST0113", "MTLSPolicyConflict", E)
PORT_NAME_NOT_UNDER_NAMING_CONVENTION = _t("IST0118", "PortNameIsNotUnderNamingConvention", I)
NO_MATCHING_WORKLOADS_FOUND = _t("IST0127", "NoMatchingWorkloadsFound", W)
NO_SERVER_CERT_VERIFICATION_DR = _t("IST0128", "NoServerCertificateVerificationDestinationLevel", W)
NO_SERVER_CERT_VERIFICATION_PORT = _t("IST0129", "NoServerCertificateVerificationPortLevel", W)
VS_UNREACHABLE_RULE = _t("IST0130", "VirtualServiceUnreachableRule", W)
VS_INEFFECTIVE_MATCH = _t("IST0131", "VirtualServiceIneffectiveMatch", I)
VS_HOST_NOT_FOUND_IN_GATEWAY = _t("IST0132", "VirtualServiceHostNotFoundInGateway", W)
SCHEMA_WARNING = _t("IST0133", "SchemaWarning", W)
SERVICE_ENTRY_ADDRESSES_REQUIRED = _t("IST0134", "ServiceEntryAddressesRequired", W)
CONFLICTING_GATEWAYS = _t("IST0145", "ConflictingGateways", E)
INVALID_GATEWAY_CREDENTIAL = _t("IST0161", "InvalidGatewayCredential", E)
DR_SUBSET_NOT_SELECT_PODS = _t("IST0173", "DestinationRuleSubsetNotSelectPods", E)
UNKNOWN_DR_HOST = _t("IST0174", "UnknownDestinationRuleHost", W)

# Our own codes: findings Istio's analyzers do not report.
INVALID_DOCUMENT = _t("MSH0001", "InvalidDocument", E)
DUPLICATE_OBJECT = _t("MSH0002", "DuplicateObject", E)
UNSUPPORTED_KIND = _t("MSH0003", "UnsupportedKind", I)
DEPRECATED_API_VERSION = _t("MSH0004", "DeprecatedApiVersion", I)
GATEWAY_HOST_WITHOUT_VS = _t("MSH0101", "GatewayHostWithoutVirtualService", W)
CONFLICTING_DESTINATION_RULES = _t("MSH0102", "ConflictingDestinationRules", W)
SIDECAR_HIDES_ROUTED_HOST = _t("MSH0103", "SidecarHidesRoutedHost", W)
UNKNOWN_PRINCIPAL = _t("MSH0104", "AuthorizationPolicyUnknownPrincipal", W)
SERVICE_ENTRY_PORT_PROTOCOL = _t("MSH0105", "ServiceEntryPortProtocolUndetectable", I)

CATALOG: tuple[MessageType, ...] = tuple(sorted(
    {v for v in globals().values() if isinstance(v, MessageType)}, key=lambda t: t.code))


def message_type(code_or_name: str) -> MessageType | None:
    """The type with this code (``IST0101``) or name (``ReferencedResourceNotFound``), if any."""
    return next((t for t in CATALOG if code_or_name in (t.code, t.name)), None)


@dataclass(frozen=True)
class Message:
    """One finding about one resource."""

    type: MessageType
    kind: str
    namespace: str
    name: str
    path: str  # field path in the resource, ``spec.http[0].route[0].destination.host``; "" for the whole
    text: str  # what is wrong
    fix: str  # one sentence: what to do about it
    origin: str = ""  # where the resource came from: ``file.yaml[2]``, ``cluster``, ``pilot``

    @property
    def level(self) -> Level:
        return self.type.level

    @property
    def resource(self) -> str:
        """``Kind namespace/name`` (a document without a name: what is known of it; a Namespace: its name)."""
        parts = (self.name,) if self.kind == "Namespace" else (self.namespace, self.name)
        ident = "/".join(p for p in parts if p)
        return " ".join(p for p in (self.kind, ident) if p) or "document"

    def sort_key(self) -> tuple[str, str, str, str, str, str, str]:
        return (self.kind, self.namespace, self.name, self.origin, self.path, self.type.code, self.text)

    def to_dict(self) -> dict[str, str]:
        """JSON/YAML form; keys are stable (scripts read them)."""
        return {
            "code": self.type.code, "name": self.type.name, "level": self.level.label,
            "kind": self.kind, "namespace": self.namespace, "resourceName": self.name,
            "path": self.path, "message": self.text, "fix": self.fix, "origin": self.origin,
        }

    def line(self) -> str:
        """The text form: ``Error [IST0101] (VirtualService default/reviews) spec...: text. Fix: ...``."""
        where = f" {self.origin}" if self.origin else ""
        path = f"{self.path}: " if self.path else ""
        return f"{self.level.label} [{self.type.code}] ({self.resource}{where}) {path}{self.text}. Fix: {self.fix}"
