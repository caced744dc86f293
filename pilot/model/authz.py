"""Security policies in the canonical model: AuthorizationPolicy and RequestAuthentication.

`security_stage` converts the API objects once per build (a `build_mesh` stage) into frozen,
hashable values; `workload_security` picks, for one workload, every policy that applies the way
Istio does: the root namespace's policies (mesh-wide without a selector, by selector in every
namespace), then the workload namespace's (namespace-wide without a selector, else by selector).
Gateway (router) workloads are selected the same way, by their namespace and labels. Policies
that name ``targetRefs`` bind to Kubernetes Gateway API gateways and waypoints, never to sidecars
or local-mesh routers. Nothing overrides anything: every applicable policy counts (a DENY
anywhere denies; ALLOW policies are OR'ed), and every applicable RequestAuthentication's JWT
rules are accepted.

A rule is kept as Istio's own model keeps it before generating RBAC: per ``from`` entry the
list of source attributes (identity, addresses, request principals) plus the ``when``
conditions about the caller, per ``to`` entry the operation attributes plus the conditions about
the request; each list AND'ed, entries OR'ed. Everything is tuples: a `WorkloadSecurity` is
hashable, so generators can be cached by value on it. Cost: one pass over the policies per
build; picking a workload's policies is O(policies in its namespace and the root namespace).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

from pilot.api.authorization import Action, AuthorizationPolicy, Condition, Operation, Rule, Source
from pilot.api.request_authentication import JWTRule, RequestAuthentication
from pilot.model.conversions import Conversions

# `when` keys about the request or the connection's destination: they go with the operations.
PERMISSION_KEYS = ("destination.ip", "destination.port", "connection.sni")
# Source fields as Istio's attribute names, in the order Istio emits them (last inserted first).
_SOURCE_ATTRS = (
    ("source.principal", "principals"), ("request.auth.principal", "request_principals"),
    ("source.serviceAccount", "service_accounts"), ("source.trustDomain", "trust_domains"),
    ("source.namespace", "namespaces"), ("remote.ip", "remote_ip_blocks"), ("source.ip", "ip_blocks"),
)  # fmt: skip
_OPERATION_ATTRS = (
    (":authority", "hosts"), (":method", "methods"), ("path-matcher", "paths"), ("destination.port", "ports"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Attr:
    """One attribute test: any of ``values`` must match and none of ``not_values``."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthzRule:
    principals: tuple[tuple[Attr, ...], ...]  # one AND-list per `from` entry (one list without `from`)
    permissions: tuple[tuple[Attr, ...], ...]  # one AND-list per `to` entry (one list without `to`)


@dataclass(frozen=True, slots=True)
class AuthzPolicy:
    """An AuthorizationPolicy; ``rules`` empty means "matches nothing" (an ALLOW then denies all)."""

    namespace: str
    name: str
    action: str  # ALLOW, DENY, AUDIT, CUSTOM
    rules: tuple[AuthzRule, ...]
    selector: tuple[tuple[str, str], ...] | None = None
    targeted: bool = False  # targetRef(s): gateways and waypoints only
    dry_run: bool = False
    provider: str = ""


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One ``jwtRules`` entry with its keys resolved: inline, fetched from jwksUri, or None (not
    fetched: the generator then inlines a key set no token verifies against, as Istio does)."""

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str | None = None
    jwks_uri: str = ""
    from_headers: tuple[tuple[str, str], ...] = ()  # (name, prefix)
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str = ""
    forward_original_token: bool = False
    claim_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim)
    space_delimited_claims: tuple[str, ...] = ()
    timeout_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class RequestAuthn:
    namespace: str
    name: str
    rules: tuple[JwtRule, ...]
    selector: tuple[tuple[str, str], ...] | None = None
    targeted: bool = False


@dataclass(frozen=True, slots=True)
class WorkloadSecurity:
    """What applies to one workload: policies by action (each sorted by namespace/name) and JWT rules
    (sorted by issuer, as Istio orders them)."""

    audit: tuple[AuthzPolicy, ...] = ()
    deny: tuple[AuthzPolicy, ...] = ()
    allow: tuple[AuthzPolicy, ...] = ()
    custom: tuple[AuthzPolicy, ...] = ()
    jwt: tuple[JwtRule, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.audit or self.deny or self.allow or self.custom or self.jwt)


NO_SECURITY = WorkloadSecurity()


@dataclass(frozen=True, slots=True)
class Security:
    """Every security policy of the mesh, by namespace, in (namespace, name) order."""

    authorization: Mapping[str, tuple[AuthzPolicy, ...]] = field(default_factory=lambda: MappingProxyType({}))
    authentication: Mapping[str, tuple[RequestAuthn, ...]] = field(default_factory=lambda: MappingProxyType({}))


def _attr(key: str, values: tuple[str, ...], not_values: tuple[str, ...]) -> tuple[Attr, ...]:
    return (Attr(key, values, not_values),) if values or not_values else ()


def _condition_attrs(when: Iterable[Condition], permission: bool) -> tuple[Attr, ...]:
    return tuple(
        Attr(c.key, c.values, c.not_values)
        for c in when
        if (c.key in PERMISSION_KEYS or c.key.startswith("experimental.envoy.filters.")) == permission
    )


def _source_attrs(src: Source | None) -> tuple[Attr, ...]:
    if src is None:
        return ()
    return tuple(a for key, name in _SOURCE_ATTRS for a in _attr(key, getattr(src, name), getattr(src, f"not_{name}")))


def _operation_attrs(op: Operation | None) -> tuple[Attr, ...]:
    if op is None:
        return ()
    return tuple(a for key, name in _OPERATION_ATTRS for a in _attr(key, getattr(op, name), getattr(op, f"not_{name}")))


def authz_rule(rule: Rule) -> AuthzRule:
    """Istio's rule model: sources/operations first, then the `when` conditions of their side."""
    base_principal = _condition_attrs(rule.when, permission=False)
    base_permission = _condition_attrs(rule.when, permission=True)
    principals = tuple(_source_attrs(f.source) + base_principal for f in rule.from_) or (base_principal,)
    permissions = tuple(_operation_attrs(t.operation) + base_permission for t in rule.to) or (base_permission,)
    return AuthzRule(principals, permissions)


def authz_policy(obj: AuthorizationPolicy) -> AuthzPolicy:
    spec = obj.spec
    return AuthzPolicy(
        namespace=obj.metadata.namespace,
        name=obj.metadata.name,
        action=spec.action.value,
        rules=tuple(authz_rule(r) for r in spec.rules),
        selector=tuple(sorted(spec.selector.match_labels.items())) if spec.selector is not None else None,
        targeted=spec.target_ref is not None or bool(spec.target_refs),
        dry_run=obj.dry_run,
        provider=spec.provider.name if spec.provider is not None else "",
    )


def jwt_rule(rule: JWTRule, fetched: Mapping[str, str]) -> JwtRule:
    """The model of one rule; ``fetched`` maps jwksUri (or ``openid:<issuer>``) to key sets."""
    if rule.jwks:
        jwks: str | None = rule.jwks
    elif rule.jwks_uri:
        jwks = fetched.get(rule.jwks_uri)
    else:
        jwks = fetched.get(discovery_key(rule.issuer))
    return JwtRule(
        issuer=rule.issuer,
        audiences=rule.audiences,
        jwks=jwks,
        jwks_uri=rule.jwks_uri,
        from_headers=tuple((h.name, h.prefix) for h in rule.from_headers),
        from_params=rule.from_params,
        from_cookies=rule.from_cookies,
        output_payload_to_header=rule.output_payload_to_header,
        forward_original_token=rule.forward_original_token,
        claim_to_headers=tuple((c.header, c.claim) for c in rule.output_claim_to_headers),
        space_delimited_claims=rule.space_delimited_claims,
        timeout_seconds=rule.timeout.total_seconds() if rule.timeout is not None else 5.0,
    )


def discovery_key(issuer: str) -> str:
    """Where keys found by OpenID discovery (no jwks, no jwksUri) are kept in the fetched map."""
    return f"openid:{issuer}"


def jwks_sources(objects: Iterable[RequestAuthentication]) -> set[str]:
    """What the JWKS fetcher must fetch: every jwksUri, and ``openid:<issuer>`` for rules with neither."""
    found: set[str] = set()
    for obj in objects:
        for rule in obj.spec.jwt_rules:
            if rule.jwks:
                continue
            found.add(rule.jwks_uri or discovery_key(rule.issuer))
    return found


def request_authn(obj: RequestAuthentication, fetched: Mapping[str, str]) -> RequestAuthn:
    spec = obj.spec
    return RequestAuthn(
        namespace=obj.metadata.namespace,
        name=obj.metadata.name,
        rules=tuple(jwt_rule(r, fetched) for r in spec.jwt_rules),
        selector=tuple(sorted(spec.selector.match_labels.items())) if spec.selector is not None else None,
        targeted=spec.target_ref is not None or bool(spec.target_refs),
    )


def build_security(
    policies: Iterable[AuthorizationPolicy], authns: Iterable[RequestAuthentication], fetched: Mapping[str, str],
    memo: Conversions | None = None,
) -> Security:
    """Every policy converted and grouped by namespace, each group in name order.

    With `memo` (the build's), an unchanged policy keeps its converted form and identity, so an
    edit converts one policy, not all of them."""
    convert = memo.of if memo is not None else (lambda fn, obj: fn(obj))
    authz: dict[str, list[AuthzPolicy]] = {}
    for p in policies:
        authz.setdefault(p.metadata.namespace, []).append(convert(authz_policy, p))
    authn: dict[str, list[RequestAuthn]] = {}
    for a in authns:
        authn.setdefault(a.metadata.namespace, []).append(request_authn(a, fetched))
    return Security(authorization=_by_name(authz), authentication=_by_name(authn))


N = TypeVar("N", AuthzPolicy, RequestAuthn)


def _by_name(grouped: dict[str, list[N]]) -> Mapping[str, tuple[N, ...]]:
    """Namespace -> its policies in name order, read-only, namespaces sorted."""
    return MappingProxyType({ns: tuple(sorted(ps, key=lambda p: p.name)) for ns, ps in sorted(grouped.items())})


def _applies(selector: tuple[tuple[str, str], ...] | None, targeted: bool, labels: Mapping[str, str]) -> bool:
    if targeted:
        return False
    return selector is None or all(labels.get(k) == v for k, v in selector)


def workload_security(
    security: Security, root_namespace: str, namespace: str, labels: Mapping[str, str]
) -> WorkloadSecurity:
    """Every policy that applies to a workload with ``labels`` in ``namespace`` (see the module docstring)."""
    namespaces = sorted({root_namespace, namespace})
    policies = [p for ns in namespaces for p in security.authorization.get(ns, ())
                if _applies(p.selector, p.targeted, labels)]
    authns = [a for ns in namespaces for a in security.authentication.get(ns, ())
              if _applies(a.selector, a.targeted, labels)]
    by_action: dict[str, list[AuthzPolicy]] = {a.value: [] for a in Action}
    for p in policies:
        by_action[p.action].append(p)
    return WorkloadSecurity(
        audit=tuple(by_action["AUDIT"]),
        deny=tuple(by_action["DENY"]),
        allow=tuple(by_action["ALLOW"]),
        custom=tuple(by_action["CUSTOM"]),
        jwt=tuple(sorted((r for a in authns for r in a.rules), key=lambda r: r.issuer)),
    )
