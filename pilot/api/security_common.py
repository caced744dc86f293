"""What AuthorizationPolicy and RequestAuthentication share: who a policy applies to.

Istio's ``security.istio.io`` kinds pick workloads with ``selector.matchLabels`` (note: not
``workloadSelector.labels`` as networking kinds do) or with ``targetRef``/``targetRefs``; at most
one of the three. The checks and their wording follow Istio's validation.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence

from pydantic import Field

from pilot.api.base import IstioModel
from pilot.api.errors import FieldIssue

GROUP = "security.istio.io"
VERSIONS = ("v1", "v1beta1")  # Istio serves one schema under both
# Kinds a targetRef may name (group "" is core), as Istio allows them.
TARGET_KINDS = frozenset({
    ("core", "Service"), ("networking.istio.io", "ServiceEntry"),
    ("gateway.networking.k8s.io", "Gateway"), ("gateway.networking.k8s.io", "GatewayClass"),
})  # fmt: skip


class WorkloadSelector(IstioModel):
    """``selector.matchLabels``: every label given must be present with the same value."""

    match_labels: dict[str, str] = Field(default_factory=dict)

    def problems(self, path: str) -> Iterator[FieldIssue]:
        for key, value in self.match_labels.items():
            if not key:
                yield FieldIssue(f"{path}.matchLabels", f"empty key is not supported in selector: {key}={value!r}")
            if "*" in key or "*" in value:
                yield FieldIssue(f"{path}.matchLabels", f"wildcard is not supported in selector: '{key}={value}'")

    def advisories(self, path: str) -> Iterator[FieldIssue]:
        if not self.match_labels:
            yield FieldIssue(path, "workload selector specified without labels")


class PolicyTargetReference(IstioModel):
    group: str = ""
    kind: str = ""
    name: str = ""
    namespace: str = ""

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.name:
            yield FieldIssue(f"{path}.name", "targetRef name must be set")
        if self.namespace:
            yield FieldIssue(
                f"{path}.namespace", "targetRef namespace must not be set; cross namespace referencing is not supported"
            )
        if (self.group or "core", self.kind) not in TARGET_KINDS:
            allowed = ", ".join(f"{g}/{k}" for g, k in sorted(TARGET_KINDS))
            yield FieldIssue(path, f"targetRef must be to one of {allowed} but was {self.group}/{self.kind}")


def selection_problems(
    path: str,
    selector: WorkloadSelector | None,
    target_ref: PolicyTargetReference | None,
    target_refs: Sequence[PolicyTargetReference],
) -> Iterator[FieldIssue]:
    """Istio: at most one of ``selector``, ``targetRef`` and ``targetRefs``."""
    if sum((selector is not None, target_ref is not None, bool(target_refs))) > 1:
        yield FieldIssue(path, "only one of targetRefs or workloadSelector can be set")


def ip_problems(values: Sequence[str]) -> str | None:
    """Istio's check of ipBlocks and ``source.ip``-like values: an address or a CIDR range."""
    for value in values:
        try:
            if "/" in value:
                ipaddress.ip_network(value, strict=False)
            else:
                ipaddress.ip_address(value)
        except ValueError as exc:
            return f"bad CIDR range ({value}): {exc}" if "/" in value else f"bad IP address ({value})"
    return None


def port_problems(values: Sequence[str]) -> str | None:
    """Ports are strings in Istio's schema; each must be a number in [0, 65535]."""
    for value in values:
        if not (value.isascii() and value.isdigit()) or int(value) > 65535:
            return f"bad port ({value})"
    return None
