"""PeerAuthentication in the canonical model, and who has a sidecar with mesh certificates.

`peer_authn_stage` turns the PeerAuthentication objects (already in precedence order: oldest
first) into a frozen `PeerAuthn` once per build. `workload_mtls` resolves, for one workload,
the mode Istio's ``ComposePeerAuthentication`` gives it: PERMISSIVE by default, replaced by the
mesh-wide policy (root namespace, no selector), then the namespace policy (no selector), then
the oldest policy whose ``selector`` picks the workload (never one in the root namespace);
a level whose mode is UNSET (or absent) inherits, and each ``portLevelMtls`` entry applies to
that workload port, UNSET there meaning the workload's own mode. Of several policies at one
level the oldest wins, as in Istio.

`endpoint_tls_mode` is Istio's rule for a WorkloadEntry: the ``security.istio.io/tlsMode``
label if present, else ``istio`` when a service account is named (the workload runs a sidecar
with a mesh identity), else ``disabled``. Cost: one pass over the policies per build; resolving
one workload is O(policies of its namespace), memoized per (namespace, labels) by callers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pilot.api.peer_authentication import MutualTLSMode, PeerAuthentication

TLS_MODE_LABEL = "security.istio.io/tlsMode"
ISTIO_TLS_MODE = "istio"
DISABLED_TLS_MODE = "disabled"
UNSET, DISABLE, PERMISSIVE, STRICT = (m.value for m in MutualTLSMode)


@dataclass(frozen=True, slots=True)
class PeerPolicy:
    namespace: str
    name: str
    mode: str  # UNSET when the policy has no mtls section
    selector: tuple[tuple[str, str], ...] | None = None  # None (or empty): namespace or mesh-wide
    ports: tuple[tuple[int, str], ...] = ()  # portLevelMtls, by port


@dataclass(frozen=True, slots=True)
class PeerAuthn:
    """Every PeerAuthentication, by level. ``selected`` is oldest first per namespace."""

    root_namespace: str = "istio-system"
    mesh: PeerPolicy | None = None
    namespaces: Mapping[str, PeerPolicy] = field(default_factory=lambda: MappingProxyType({}))
    selected: Mapping[str, tuple[PeerPolicy, ...]] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class WorkloadMtls:
    """One workload's inbound mode, and its per-port exceptions (hashable: a cache key)."""

    mode: str = PERMISSIVE
    ports: tuple[tuple[int, str], ...] = ()

    def at(self, port: int) -> str:
        return dict(self.ports).get(port, self.mode)


DEFAULT_MTLS = WorkloadMtls()


def peer_authn_stage(policies: Iterable[PeerAuthentication], root_namespace: str) -> PeerAuthn:
    """Index the policies (given oldest first) by level; the first one seen at a level wins."""
    mesh: PeerPolicy | None = None
    namespaces: dict[str, PeerPolicy] = {}
    selected: dict[str, list[PeerPolicy]] = {}
    for pa in policies:
        policy = _policy(pa)
        if policy.selector is None:
            if policy.namespace == root_namespace:
                mesh = mesh or policy
            else:
                namespaces.setdefault(policy.namespace, policy)
        elif policy.namespace != root_namespace:  # Istio ignores selectors in the root namespace
            selected.setdefault(policy.namespace, []).append(policy)
    return PeerAuthn(
        root_namespace=root_namespace,
        mesh=mesh,
        namespaces=MappingProxyType(namespaces),
        selected=MappingProxyType({ns: tuple(found) for ns, found in selected.items()}),
    )


def _policy(pa: PeerAuthentication) -> PeerPolicy:
    spec = pa.spec
    labels = spec.selector.match_labels if spec.selector is not None else {}
    return PeerPolicy(
        namespace=pa.metadata.namespace,
        name=pa.metadata.name,
        mode=(spec.mtls.mode if spec.mtls is not None else MutualTLSMode.UNSET).value,
        selector=tuple(sorted(labels.items())) if labels else None,
        ports=tuple(sorted((port, m.mode.value) for port, m in (spec.port_level_mtls or {}).items())),
    )


def workload_mtls(authn: PeerAuthn, namespace: str, labels: Mapping[str, str]) -> WorkloadMtls:
    """The mode of a workload in `namespace` with `labels`, and its port exceptions (see module doc)."""
    mode = PERMISSIVE
    for level in (authn.mesh, authn.namespaces.get(namespace)):
        if level is not None and level.mode != UNSET:
            mode = level.mode
    if namespace == authn.root_namespace:
        return WorkloadMtls(mode)
    own = next((p for p in authn.selected.get(namespace, ()) if _selects(p.selector or (), labels)), None)
    if own is None:
        return WorkloadMtls(mode)
    if own.mode != UNSET:
        mode = own.mode
    return WorkloadMtls(mode, tuple((port, mode if m == UNSET else m) for port, m in own.ports))


def _selects(selector: tuple[tuple[str, str], ...], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector)


def endpoint_tls_mode(labels: Mapping[str, str], service_account: str) -> str:
    """``istio`` if the instance runs a sidecar with a mesh identity, as Istio decides for WorkloadEntry."""
    if TLS_MODE_LABEL in labels:
        return labels[TLS_MODE_LABEL]
    return ISTIO_TLS_MODE if service_account else DISABLED_TLS_MODE


def spiffe_uri(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
