"""security.istio.io checks: policies selecting nothing, unknown sources, mTLS contradictions."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase

from pilot.analysis import messages as msg
from pilot.analysis.context import Context
from pilot.api import ApiObject, DestinationRule
from pilot.api.authorization import AuthorizationPolicy
from pilot.api.peer_authentication import MutualTLSMode, PeerAuthentication
from pilot.api.request_authentication import RequestAuthentication
from pilot.api.security_common import WorkloadSelector
from pilot.api.traffic_policy import TLSMode
from pilot.model.build import precedence
from pilot.model.mesh import selects

_PRINCIPAL = re.compile(r"^(?P<td>[^/]*)/ns/(?P<ns>[^/]+)/sa/(?P<sa>[^/]+)$")


def _selects_nothing(ctx: Context, obj: ApiObject, selector: WorkloadSelector | None) -> msg.Message | None:
    if selector is None or not selector.match_labels:
        return None
    namespace = None if obj.metadata.namespace == ctx.inp.root_namespace else obj.metadata.namespace
    if ctx.selected(namespace, selector.match_labels):
        return None
    labels = ",".join(f"{k}={v}" for k, v in sorted(selector.match_labels.items()))
    return ctx.message(msg.NO_MATCHING_WORKLOADS_FOUND, obj, "spec.selector.matchLabels",
                       f"No matching workloads for this resource with the following labels: {labels}",
                       "correct the labels to those of the workloads it is meant for (in the policy's namespace)")


def authz_selects_nothing(ctx: Context) -> Iterator[msg.Message]:
    """IST0127: an AuthorizationPolicy whose selector matches no workload (it protects nothing)."""
    if ctx.workloads_known:
        for policy in ctx.of(AuthorizationPolicy):
            if (found := _selects_nothing(ctx, policy, policy.spec.selector)) is not None:
                yield found


def authn_selects_nothing(ctx: Context) -> Iterator[msg.Message]:
    """IST0127: a PeerAuthentication or RequestAuthentication whose selector matches no workload."""
    if ctx.workloads_known:
        for pa in ctx.of(PeerAuthentication):
            if (found := _selects_nothing(ctx, pa, pa.spec.selector)) is not None:
                yield found
        for ra in ctx.of(RequestAuthentication):
            if (found := _selects_nothing(ctx, ra, ra.spec.selector)) is not None:
                yield found


def _sources(policy: AuthorizationPolicy) -> Iterator[tuple[str, str, Sequence[str]]]:
    """(path, field, values) of every namespace, principal and service-account list in the rules."""
    for i, rule in enumerate(policy.spec.rules):
        for j, rule_from in enumerate(rule.from_):
            source = rule_from.source
            if source is None:
                continue
            base = f"spec.rules[{i}].from[{j}].source"
            for field in ("namespaces", "not_namespaces", "principals", "not_principals",
                          "service_accounts", "not_service_accounts"):
                values: Sequence[str] = getattr(source, field)
                if values:
                    alias = type(source).model_fields[field].alias or field
                    yield f"{base}.{alias}", field, values


def _glob_matches(pattern: str, candidates: frozenset[str] | frozenset[tuple[str, str]], pair: bool) -> bool:
    if not any(c in pattern for c in "*?["):  # no glob: a lookup (policies x workloads would be quadratic)
        namespace, _, account = pattern.partition("/")
        return (namespace, account) in candidates if pair else pattern in candidates
    if not pair:
        return any(fnmatchcase(str(c), pattern) for c in candidates)
    return any(fnmatchcase(f"{c[0]}/{c[1]}", pattern) for c in candidates if isinstance(c, tuple))


def authz_unknown_namespaces(ctx: Context) -> Iterator[msg.Message]:
    """IST0101: an AuthorizationPolicy source names a namespace in which no workload runs."""
    if not ctx.workloads_known:
        return
    for policy in ctx.of(AuthorizationPolicy):
        for path, field, values in _sources(policy):
            if not field.endswith("namespaces"):
                continue
            for k, value in enumerate(values):
                if not _glob_matches(value, ctx.workload_namespaces, pair=False):
                    yield ctx.message(msg.REFERENCED_RESOURCE_NOT_FOUND, policy, f"{path}[{k}]",
                                      f'Referenced namespace not found: "{value}"',
                                      "correct the namespace name; no workload runs in this one")


def authz_unknown_principals(ctx: Context) -> Iterator[msg.Message]:
    """MSH0104: a principal (``<trust domain>/ns/<ns>/sa/<sa>``) or service account (``<ns>/<sa>``)
    that no workload runs as, so the rule can never match it."""
    if not ctx.workloads_known:
        return
    for policy in ctx.of(AuthorizationPolicy):
        for path, field, values in _sources(policy):
            if "principals" not in field and "service_accounts" not in field:
                continue
            for k, value in enumerate(values):
                if "principals" in field:
                    found = _PRINCIPAL.match(value)
                    if found is None:
                        continue  # "*", a prefix glob over trust domains, ...: nothing to judge
                    wanted = f"{found['ns']}/{found['sa']}"
                else:
                    wanted = value
                if not _glob_matches(wanted, ctx.identities, pair=True):
                    yield ctx.message(msg.UNKNOWN_PRINCIPAL, policy, f"{path}[{k}]",
                                      f"no workload runs as service account {wanted}, so {value!r} never matches",
                                      "correct the namespace and service account, or deploy the workload first")


def _namespace_mode(ctx: Context, namespace: str,
                    labels: Sequence[dict[str, str]]) -> tuple[str, PeerAuthentication | None]:
    """The PeerAuthentication mode in force for some instance (selector, else namespace, else mesh)."""
    policies = sorted(ctx.of(PeerAuthentication), key=precedence)
    for pa in policies:
        sel = pa.spec.selector
        if pa.metadata.namespace == namespace and sel is not None and sel.match_labels and \
                any(selects(sel.match_labels, lbl) for lbl in labels) and _mode(pa) == MutualTLSMode.STRICT:
            return MutualTLSMode.STRICT, pa
    for ns in (namespace, ctx.inp.root_namespace):
        for pa in policies:
            if pa.metadata.namespace == ns and (pa.spec.selector is None or not pa.spec.selector.match_labels) \
                    and _mode(pa) != MutualTLSMode.UNSET:
                return _mode(pa), pa
    return "", None


def _mode(pa: PeerAuthentication) -> str:
    return pa.spec.mtls.mode if pa.spec.mtls is not None else MutualTLSMode.UNSET


def mtls_conflict(ctx: Context) -> Iterator[msg.Message]:
    """IST0113: a DestinationRule sends plaintext (tls.mode DISABLE) to workloads that accept only
    mutual TLS (PeerAuthentication STRICT): every such request is refused."""
    for dr in ctx.of(DestinationRule):
        policy = dr.spec.traffic_policy
        places = [("spec.trafficPolicy.tls.mode", policy.tls)] if policy is not None else []
        places += [(f"spec.trafficPolicy.portLevelSettings[{i}].tls.mode", p.tls)
                   for i, p in enumerate(policy.port_level_settings if policy is not None else ())]
        host = ctx.qualify(dr.spec.host, dr.metadata.namespace)
        for path, tls in places:
            if tls is None or tls.mode != TLSMode.DISABLE:
                continue
            labels = [dict(lbl) for lbl in ctx.instance_labels(host)]
            for namespace in ctx.service_namespaces(host):
                mode, pa = _namespace_mode(ctx, namespace, labels)
                if mode == MutualTLSMode.STRICT and pa is not None:
                    yield ctx.message(msg.MTLS_POLICY_CONFLICT, dr, path,
                                      f"A DestinationRule and Policy are in conflict with regards to mTLS for host "
                                      f'{host}. The DestinationRule "{dr.metadata.namespace}/{dr.metadata.name}" '
                                      f'specifies that mTLS must be false but the Policy object '
                                      f'"{pa.metadata.namespace}/{pa.metadata.name}" specifies STRICT',
                                      "set tls.mode ISTIO_MUTUAL (or remove tls) for this host, or relax the "
                                      "PeerAuthentication to PERMISSIVE")
