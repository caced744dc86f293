"""Running every check over one input: the registry of checks, suppression and ordering.

`CHECKS` maps a check's name (also its golden test directory, ``tests/golden/analyze/<name>``) to
the codes it reports and its function. `analyze` runs them all, drops suppressed messages and
returns the rest sorted, so one input always gives one output. A check that fails with an
exception costs only itself: it becomes an IST0001 InternalError message naming the check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from pilot.analysis import (
    destination_rules,
    documents,
    gateways,
    injection,
    security,
    services,
    sidecars,
    virtual_services,
)
from pilot.analysis import messages as msg
from pilot.analysis.context import Context
from pilot.analysis.inputs import AnalysisInput

Check = Callable[[Context], Iterator[msg.Message]]
SUPPRESS_ANNOTATION = "galley.istio.io/analyze-suppress"  # Istio's per-resource suppression annotation
INTERNAL_ERROR = msg.MessageType("IST0001", "InternalError", msg.Level.ERROR)

CHECKS: dict[str, tuple[tuple[msg.MessageType, ...], Check]] = {
    "parse-errors": ((msg.SCHEMA_VALIDATION_ERROR, msg.INVALID_DOCUMENT, msg.DUPLICATE_OBJECT, msg.UNSUPPORTED_KIND),
                     documents.parse_problems),
    "schema-warnings": ((msg.SCHEMA_WARNING,), documents.schema_warnings),
    "deprecated-fields": ((msg.DEPRECATED,), documents.deprecated_fields),
    "deprecated-api-version": ((msg.DEPRECATED_API_VERSION,), documents.deprecated_api_versions),
    "vs-host-not-found": ((msg.REFERENCED_RESOURCE_NOT_FOUND,), virtual_services.host_not_found),
    "vs-subset-not-found": ((msg.REFERENCED_RESOURCE_NOT_FOUND,), virtual_services.subset_not_found),
    "vs-gateway-not-found": ((msg.REFERENCED_RESOURCE_NOT_FOUND,), virtual_services.gateway_not_found),
    "vs-conflicting-mesh-hosts": ((msg.CONFLICTING_MESH_GATEWAY_VS_HOSTS,), virtual_services.mesh_host_conflicts),
    "vs-shadowed-routes": ((msg.VS_UNREACHABLE_RULE, msg.VS_INEFFECTIVE_MATCH), virtual_services.shadowed_routes),
    "vs-host-not-in-gateway": ((msg.VS_HOST_NOT_FOUND_IN_GATEWAY,), virtual_services.host_not_in_gateway),
    "dr-subset-selects-nothing": ((msg.DR_SUBSET_NOT_SELECT_PODS,), destination_rules.subset_selects_nothing),
    "dr-unknown-host": ((msg.UNKNOWN_DR_HOST,), destination_rules.unknown_host),
    "dr-conflicting-rules": ((msg.CONFLICTING_DESTINATION_RULES,), destination_rules.conflicting_rules),
    "dr-unverified-tls": ((msg.NO_SERVER_CERT_VERIFICATION_DR, msg.NO_SERVER_CERT_VERIFICATION_PORT),
                          destination_rules.unverified_tls),
    "mtls-conflict": ((msg.MTLS_POLICY_CONFLICT,), security.mtls_conflict),
    "authz-selects-nothing": ((msg.NO_MATCHING_WORKLOADS_FOUND,), security.authz_selects_nothing),
    "authn-selects-nothing": ((msg.NO_MATCHING_WORKLOADS_FOUND,), security.authn_selects_nothing),
    "authz-unknown-namespace": ((msg.REFERENCED_RESOURCE_NOT_FOUND,), security.authz_unknown_namespaces),
    "authz-unknown-principal": ((msg.UNKNOWN_PRINCIPAL,), security.authz_unknown_principals),
    "gateway-selector-not-found": ((msg.REFERENCED_RESOURCE_NOT_FOUND,), gateways.selector_not_found),
    "gateway-host-without-vs": ((msg.GATEWAY_HOST_WITHOUT_VS,), gateways.host_without_virtual_service),
    "gateway-missing-credential": ((msg.INVALID_GATEWAY_CREDENTIAL,), gateways.missing_credentials),
    "gateway-conflicting-servers": ((msg.CONFLICTING_GATEWAYS,), gateways.conflicting_gateways),
    "namespace-not-injected": ((msg.NAMESPACE_NOT_INJECTED,), injection.namespace_not_injected),
    "pod-missing-proxy": ((msg.POD_MISSING_PROXY,), injection.pod_missing_proxy),
    "sidecar-multiple-without-selector": ((msg.MULTIPLE_SIDECARS_WITHOUT_SELECTORS,),
                                          sidecars.multiple_without_selector),
    "sidecar-selects-nothing": ((msg.NO_MATCHING_WORKLOADS_FOUND,), sidecars.selects_nothing),
    "sidecar-hides-routed-host": ((msg.SIDECAR_HIDES_ROUTED_HOST,), sidecars.hides_routed_host),
    "service-port-name": ((msg.PORT_NAME_NOT_UNDER_NAMING_CONVENTION,), services.service_port_names),
    "serviceentry-port-protocol": ((msg.SERVICE_ENTRY_PORT_PROTOCOL,), services.service_entry_port_protocols),
    "serviceentry-addresses-required": ((msg.SERVICE_ENTRY_ADDRESSES_REQUIRED,), services.service_entry_addresses),
}


@dataclass(frozen=True)
class Suppression:
    """``CODE=Kind name.namespace`` (Istio's form) or ``CODE=Kind namespace/name``; globs allowed."""

    code: str
    kind: str
    name: str
    namespace: str

    @classmethod
    def parse(cls, text: str) -> Suppression:
        code, sep, resource = text.partition("=")
        kind, _, ident = resource.strip().partition(" ")
        if not sep or not code.strip() or not kind or not ident:
            raise ValueError(f"{text!r}: a suppression is CODE=Kind name.namespace (e.g. IST0102=Namespace default)"
                             " or CODE=Kind namespace/name; globs (*) allowed")
        if "/" in ident:
            namespace, _, name = ident.partition("/")
        else:
            name, _, namespace = ident.partition(".")
        return cls(code.strip(), kind, name, namespace or "*")

    def matches(self, m: msg.Message) -> bool:
        return (fnmatchcase(m.type.code, self.code) or fnmatchcase(m.type.name, self.code)) and \
            fnmatchcase(m.kind, self.kind) and fnmatchcase(m.name, self.name) and \
            fnmatchcase(m.namespace, self.namespace)


def analyze(inp: AnalysisInput, suppress: Sequence[Suppression] = (),
            only: Iterable[str] | None = None) -> list[msg.Message]:
    """Every message about `inp`, suppressed ones dropped, sorted; `only` limits the checks by name."""
    ctx = Context(inp)
    found: set[msg.Message] = set()
    for name in sorted(CHECKS) if only is None else only:
        try:
            found.update(CHECKS[name][1](ctx))
        except Exception as exc:  # one broken check must not hide the others' findings
            found.add(msg.Message(INTERNAL_ERROR, "", "", "", "", f"Internal error: check {name} failed: {exc!r}",
                                  "report this as a meshctl bug"))
    annotated = _annotated_suppressions(inp)
    kept = [m for m in found if not any(s.matches(m) for s in suppress) and
            m.type.code not in annotated.get((m.kind, m.namespace, m.name), ())]
    return sorted(kept, key=msg.Message.sort_key)


def _annotated_suppressions(inp: AnalysisInput) -> dict[tuple[str, str, str], frozenset[str]]:
    """Codes each object suppresses for itself with Istio's annotation (comma-separated codes)."""
    out: dict[tuple[str, str, str], frozenset[str]] = {}
    for obj in inp.objects:
        value = obj.metadata.annotations.get(SUPPRESS_ANNOTATION, "")
        if value:
            out[obj.key] = frozenset(c.strip() for c in value.split(",") if c.strip())
    return out


def fails(messages: Iterable[msg.Message], threshold: msg.Level) -> bool:
    """Whether any message is at or above `threshold` (then `meshctl analyze` exits 79)."""
    return any(m.level >= threshold for m in messages)
