"""A workload's security for `describe`: inbound mTLS, authorization and JWT policies, its Sidecar.

The inbound mode is `pilot.model.mtls.workload_mtls`, the resolution pilot generates from
(workload policy > namespace > mesh-wide root namespace > PERMISSIVE, port-level exceptions);
here it is also said *which* PeerAuthentication decided it. Policies are the ones
`workload_security` applies (root namespace and own namespace, by selector). Pure; cost:
O(policies of two namespaces) per workload.
"""

from __future__ import annotations

from collections.abc import Mapping

from pilot.describe import words
from pilot.describe.model import MtlsInfo, PolicyInfo, SidecarInfo
from pilot.model.authz import workload_security
from pilot.model.mesh import MeshSnapshot
from pilot.model.mtls import UNSET, PeerAuthn, workload_mtls


def inbound_mtls(mesh: MeshSnapshot, namespace: str, labels: Mapping[str, str]) -> MtlsInfo:
    resolved = workload_mtls(mesh.peer_authn, namespace, labels)
    ports = tuple(f"port {p}: {mode}" for p, mode in resolved.ports)
    return MtlsInfo(resolved.mode, _mtls_source(mesh.peer_authn, namespace, labels), ports)


def _mtls_source(authn: PeerAuthn, namespace: str, labels: Mapping[str, str]) -> str:
    """Which PeerAuthentication set the mode (the most specific level whose mode is not UNSET)."""
    own = None if namespace == authn.root_namespace else next(
        (p for p in authn.selected.get(namespace, ()) if all(labels.get(k) == v for k, v in p.selector or ())), None)
    levels = ((own, "workload"), (authn.namespaces.get(namespace), "namespace"), (authn.mesh, "mesh-wide"))
    for policy, level in levels:
        if policy is not None and policy.mode != UNSET:
            return f"PeerAuthentication {policy.namespace}/{policy.name} ({level})"
    if own is not None:
        return f"PeerAuthentication {own.namespace}/{own.name} (workload, ports only); otherwise the default"
    return "the default (no PeerAuthentication applies)"


def policies(mesh: MeshSnapshot, namespace: str, labels: Mapping[str, str]) -> list[PolicyInfo]:
    """AuthorizationPolicies and RequestAuthentications that apply, by kind, namespace and name."""
    root = mesh.scoping.root_namespace
    applied = workload_security(mesh.security, root, namespace, labels)
    out = [PolicyInfo("AuthorizationPolicy", p.namespace, p.name, p.action, words.authz(p))
           for p in (*applied.audit, *applied.deny, *applied.allow, *applied.custom)]
    for ns in sorted({root, namespace}):
        for a in mesh.security.authentication.get(ns, ()):
            if not a.targeted and (a.selector is None or all(labels.get(k) == v for k, v in a.selector)):
                out.append(PolicyInfo("RequestAuthentication", a.namespace, a.name, "JWT", words.jwt_rules(a.rules)))
    return sorted(out, key=lambda p: (p.kind, p.namespace, p.name))


def policy_warnings(found: list[PolicyInfo]) -> list[str]:
    out = []
    for p in found:
        if p.kind == "AuthorizationPolicy" and p.action == "ALLOW" and p.summary.endswith("denies every request"):
            out.append(f"AuthorizationPolicy {p.namespace}/{p.name} is ALLOW without rules: every request to this "
                       "workload is denied")
    return out


def sidecar(mesh: MeshSnapshot, namespace: str, labels: Mapping[str, str]) -> SidecarInfo | None:
    """The Sidecar resource scoping the workload, as Istio picks it (own selector first, then the namespace's)."""
    found = mesh.sidecar_for(namespace, labels)
    if found is None:
        return None
    lines = ["selects workloads with " + ", ".join(words.labels(found.selector))
             if found.selector else "the namespace's default (no workloadSelector)"]
    lines += [f"inbound port {p}" + (f" ({proto})" if proto else "") +
              (f" forwards to {found.ingress_endpoints[p]}" if p in found.ingress_endpoints else "")
              for p, proto in found.ingress_ports.items()]
    egress = mesh.scoping.egress.get((found.namespace, found.name))
    if egress is not None and egress.hosts is not None:
        lines.append("outbound limited to " + ", ".join(f"{ns}/{h}" for ns, h in egress.hosts))
    if egress is not None and egress.outbound_policy:
        lines.append(f"unknown destinations: {egress.outbound_policy}")
    return SidecarInfo(found.namespace, found.name, tuple(lines))


