"""AuthorizationPolicy as Envoy RBAC filters, generated the way Istio generates them.

One RBAC filter per action, in Istio's order: AUDIT (action LOG: marks requests for access
logs, never denies), DENY, then ALLOW; an HTTP connection manager gets them as HTTP filters
before the router, a TCP listener as network filters before ``tcp_proxy``. CUSTOM policies are
validated and kept in the model but generate nothing yet: they need an external authorizer
(Mixer's issue). Policies named ``ns[<namespace>]-policy[<name>]-rule[<i>]``, as Istio names them.

Each rule becomes one Envoy policy: its ``from`` entries are OR'ed principals, its ``to``
entries OR'ed permissions, each an AND of attribute tests. On a TCP port only L4 attributes
exist: an ALLOW rule using an HTTP-only attribute is dropped (it could only allow less), a
DENY or AUDIT rule just loses that attribute (it denies more), as Istio does. An ALLOW policy
without rules matches nothing, so the workload then denies every request unless another ALLOW
matches. Identities (principals, namespaces, service accounts, trust domains) are matched on
the peer certificate's URI SAN (``spiffe://<trust domain>/ns/<ns>/sa/<sa>``): they hold only once
mutual TLS gives the connection a peer certificate; without one they never match.

Request principals and claims are read from the JWT filter's dynamic metadata
(``envoy.filters.http.jwt_authn``, key ``payload``; see `pilot.translate.jwt`). Pure: a
function of the policies alone; cost is linear in the attributes of the applicable rules.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Any

from envoy.config.core.v3 import address_pb2, extension_pb2
from envoy.config.listener.v3 import listener_components_pb2 as lc
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, string_pb2, value_pb2

from pilot.model.authz import Attr, AuthzPolicy, WorkloadSecurity

HTTP_RBAC_FILTER = "envoy.filters.http.rbac"
NETWORK_RBAC_FILTER = "envoy.filters.network.rbac"
JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD = "payload"  # where the JWT filter puts a verified token's claims
SPIFFE = "spiffe://"
TCP_STAT_PREFIX = "tcp."
_ACTIONS = {"AUDIT": rbac_pb2.RBAC.LOG, "DENY": rbac_pb2.RBAC.DENY, "ALLOW": rbac_pb2.RBAC.ALLOW}
_SHADOW_PREFIX = {"ALLOW": "istio_dry_run_allow_", "DENY": "istio_dry_run_deny_"}
_MATCH_ANY = ".+"


class HttpOnly(ValueError):
    """An HTTP attribute asked for on a TCP port."""


# --- string and value matchers -------------------------------------------------------------


def string_match(value: str, prefix: str = "", ignore_case: bool = False) -> Any:
    """Istio's wildcard rule: ``*`` anything non-empty, ``*x`` suffix, ``x*`` prefix, else exact;
    ``prefix`` (``spiffe://``) is prepended to what is matched."""
    m = string_pb2.StringMatcher(ignore_case=ignore_case)
    if value == "*":
        m.safe_regex.regex = _MATCH_ANY
        m.ClearField("ignore_case")
    elif value.startswith("*"):
        if prefix:
            m.safe_regex.regex = re.escape(prefix) + ".*" + re.escape(value[1:])
        else:
            m.suffix = value[1:]
    elif value.endswith("*"):
        m.prefix = prefix + value[:-1]
    else:
        m.exact = prefix + value
    return m


def _regex(pattern: str) -> Any:
    m = string_pb2.StringMatcher()
    m.safe_regex.regex = pattern
    return m


def _value_or(values: Sequence[str]) -> Any:
    matchers = [value_pb2.ValueMatcher(string_match=string_match(v)) for v in values]
    if len(matchers) == 1:
        return matchers[0]
    return value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=matchers))


def _jwt_claim(path: Sequence[str], value: Any) -> Any:
    """A claim of the verified token, as a string or as a list holding the value (Istio's extended
    form: claims such as ``aud`` or ``groups`` may be either)."""
    listed = value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=value))
    either = value_pb2.ValueMatcher(or_match=value_pb2.OrMatcher(value_matchers=[listed, value]))
    return _metadata(JWT_FILTER, [JWT_PAYLOAD, *path], either)


def _metadata(filter_name: str, path: Sequence[str], value: Any) -> Any:
    m = metadata_pb2.MetadataMatcher(filter=filter_name, value=value)
    for key in path:
        m.path.add(key=key)
    return m


def _header(name: str, value: str, ignore_case: bool = False) -> Any:
    if value == "*":
        return route_pb2.HeaderMatcher(name=name, present_match=True)
    return route_pb2.HeaderMatcher(name=name, string_match=string_match(value, ignore_case=ignore_case))


def _cidr(value: str) -> Any:
    address, _, length = value.partition("/")
    version = ipaddress.ip_address(address).version
    cidr = address_pb2.CidrRange(address_prefix=address)
    cidr.prefix_len.value = int(length) if length else (32 if version == 4 else 128)
    return cidr


def bracketed(key: str, prefix: str) -> list[str]:
    """``request.auth.claims[a][b]`` -> ``["a", "b"]``; ``request.headers[x-a]`` -> ``["x-a"]``."""
    rest = key[len(prefix):]
    found = re.findall(r"\[([^\[\]]*)\]", rest)
    if "".join(f"[{f}]" for f in found) == rest and found:
        return found
    return [rest[1:-1]]


# --- principals ----------------------------------------------------------------------------


def _authenticated(m: Any) -> Any:
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=m))


def _p_or(ids: list[Any]) -> Any:
    return rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=ids))


def _p_and(ids: list[Any]) -> Any:
    return rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=ids))


def _namespace_principal(value: str) -> Any:
    pattern = ".*".join(re.escape(part) for part in value.split("*"))
    return _authenticated(_regex(f".*/ns/{pattern}/.*"))


def _service_account_principal(value: str, policy_namespace: str) -> Any:
    namespace, sep, account = value.partition("/")
    if not sep:
        namespace, account = policy_namespace, value
    return _authenticated(_regex(f"spiffe://.+/ns/{re.escape(namespace)}/(.+/|)sa/{re.escape(account)}(/.+)?"))


def _trust_domain_principal(value: str) -> Any:
    if value == "*":
        return _authenticated(string_pb2.StringMatcher(prefix=SPIFFE))
    if "*" not in value:
        return _authenticated(string_pb2.StringMatcher(prefix=f"{SPIFFE}{value}/"))
    head, _, tail = value.partition("*")
    return _authenticated(_regex(f"spiffe://{re.escape(head)}[^/]*{re.escape(tail)}/.*"))


def _request_principal(values: Sequence[str]) -> Any:
    """``iss/sub`` split at the last ``/``, with Istio's wildcard forms, matched on the token's claims."""
    any_value = _regex(_MATCH_ANY)
    found = []
    for value in values:
        iss, sep, sub = value.rpartition("/")
        if not sep:
            iss, sub = value, ""
        if value == "*":
            m_iss, m_sub = any_value, any_value
        elif value.startswith("*"):
            if sep:
                m_iss = any_value if iss == "*" else string_pb2.StringMatcher(suffix=iss[1:])
                m_sub = string_pb2.StringMatcher(exact=sub)
            else:
                m_iss, m_sub = any_value, string_pb2.StringMatcher(suffix=value[1:])
        elif value.endswith("*"):
            if sep:
                m_iss = string_pb2.StringMatcher(exact=iss)
                m_sub = any_value if sub == "*" else string_pb2.StringMatcher(prefix=sub[:-1])
            else:
                m_iss, m_sub = string_pb2.StringMatcher(prefix=value[:-1]), any_value
        else:
            m_iss, m_sub = string_pb2.StringMatcher(exact=iss), string_pb2.StringMatcher(exact=sub)
        found.append(_p_and([_claim_is(claim, m) for claim, m in (("iss", m_iss), ("sub", m_sub))]))
    return found[0] if len(found) == 1 else _p_or(found)


def _claim_is(claim: str, m: Any) -> Any:
    """The verified token's ``claim`` is a string matching ``m``."""
    value = value_pb2.ValueMatcher(string_match=m)
    return rbac_pb2.Principal(metadata=_metadata(JWT_FILTER, [JWT_PAYLOAD, claim], value))


def _one_principal(key: str, value: str, tcp: bool, namespace: str) -> Any:
    """The principal for one value of a single-valued attribute."""
    if key == "source.ip":
        return rbac_pb2.Principal(direct_remote_ip=_cidr(value))
    if key == "remote.ip":
        return rbac_pb2.Principal(remote_ip=_cidr(value))
    if key == "source.principal":
        return _authenticated(string_match(value, SPIFFE))
    if key == "source.namespace":
        return _namespace_principal(value)
    if key == "source.serviceAccount":
        return _service_account_principal(value, namespace)
    if key == "source.trustDomain":
        return _trust_domain_principal(value)
    if key.startswith("request.headers"):
        if tcp:
            raise HttpOnly(key)
        return rbac_pb2.Principal(header=_header(bracketed(key, "request.headers")[0], value))
    raise ValueError(f"unknown attribute {key}")  # validation keeps these out


def _many_principal(key: str, values: Sequence[str], tcp: bool) -> Any | None:
    """Attributes Istio matches with all values at once (request.auth.*); None if not one of them."""
    if key == "request.auth.principal":
        path = None
    elif key == "request.auth.audiences":
        path = ["aud"]
    elif key == "request.auth.presenter":
        path = ["azp"]
    elif key.startswith("request.auth.claims"):
        path = bracketed(key, "request.auth.claims")
    else:
        return None
    if tcp:
        raise HttpOnly(key)
    if path is None:
        return _request_principal(values)
    return rbac_pb2.Principal(metadata=_jwt_claim(path, _value_or(values)))


def _principals(attr: Attr, tcp: bool, namespace: str) -> list[Any]:
    out = []
    for values, negate in ((attr.values, False), (attr.not_values, True)):
        if not values:
            continue
        many = _many_principal(attr.key, values, tcp)
        if many is None:
            ids = [_one_principal(attr.key, v, tcp, namespace) for v in values]
            many = _p_or(ids)
        out.append(rbac_pb2.Principal(not_id=many) if negate else many)
    return out


# --- permissions ---------------------------------------------------------------------------


def _path_permission(value: str) -> Any:
    if "{*}" in value or "{**}" in value:
        template = uri_template_match_pb2.UriTemplateMatchConfig(
            path_template=value.replace("{**}", "**").replace("{*}", "*"))
        config = extension_pb2.TypedExtensionConfig(name="uri-template")
        config.typed_config.Pack(template)
        return rbac_pb2.Permission(uri_template=config)
    return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=string_match(value)))


def _one_permission(key: str, value: str, tcp: bool) -> Any:
    if key == "destination.port":
        return rbac_pb2.Permission(destination_port=int(value))
    if key == "destination.ip":
        return rbac_pb2.Permission(destination_ip=_cidr(value))
    if key == "connection.sni":
        return rbac_pb2.Permission(requested_server_name=string_match(value))
    if key.startswith("experimental.envoy.filters."):
        filter_name, _, rest = key[len("experimental."):].partition("[")
        if value.startswith("[") and value.endswith("]"):
            listed = value_pb2.ValueMatcher(string_match=string_match(value[1:-1]))
            matcher = value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=listed))
        else:
            matcher = value_pb2.ValueMatcher(string_match=string_match(value))
        return rbac_pb2.Permission(metadata=_metadata(filter_name, [rest.rstrip("]")], matcher))
    if tcp:
        raise HttpOnly(key)
    if key == ":authority":
        return rbac_pb2.Permission(header=_header(":authority", value, ignore_case=True))
    if key == ":method":
        return rbac_pb2.Permission(header=_header(":method", value))
    if key == "path-matcher":
        return _path_permission(value)
    raise ValueError(f"unknown attribute {key}")


def _permissions(attr: Attr, tcp: bool) -> list[Any]:
    out = []
    for values, negate in ((attr.values, False), (attr.not_values, True)):
        if values:
            either = rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(
                rules=[_one_permission(attr.key, v, tcp) for v in values]))
            out.append(rbac_pb2.Permission(not_rule=either) if negate else either)
    return out


# --- policies ------------------------------------------------------------------------------


def _and_of(attrs: tuple[Attr, ...], build: Callable[[Attr], list[Any]], strict: bool) -> list[Any]:
    """Every attribute's tests; an HTTP-only one on TCP fails the rule (`strict`) or is left out."""
    out: list[Any] = []
    for attr in attrs:
        try:
            out += build(attr)
        except HttpOnly:
            if strict:
                raise
    return out


@functools.lru_cache(maxsize=65536)
def rule_policy(policy: AuthzPolicy, index: int, tcp: bool) -> Any | None:
    """One rule as an Envoy policy; None when an ALLOW rule cannot be expressed on TCP.

    Cached on exactly its arguments (policies are frozen values): a workload's RBAC filters are
    rebuilt whenever any of its policies changes, and recompiling its other ~thousands of rules
    would make one edit cost as much as all of them. Callers copy the result, never change it."""
    rule = policy.rules[index]
    strict = policy.action == "ALLOW"
    out = rbac_pb2.Policy()
    try:
        for attrs in rule.permissions:
            found = _and_of(attrs, lambda a: _permissions(a, tcp), strict)
            out.permissions.add(and_rules=rbac_pb2.Permission.Set(rules=found or [rbac_pb2.Permission(any=True)]))
        for attrs in rule.principals:
            ids = _and_of(attrs, lambda a: _principals(a, tcp, policy.namespace), strict)
            out.principals.add(and_ids=rbac_pb2.Principal.Set(ids=ids or [rbac_pb2.Principal(any=True)]))
    except HttpOnly:
        return None
    return out


def _match_never() -> Any:
    out = rbac_pb2.Policy()
    out.permissions.add(not_rule=rbac_pb2.Permission(any=True))
    out.principals.add(not_id=rbac_pb2.Principal(any=True))
    return out


def policy_name(policy: AuthzPolicy, index: int) -> str:
    return f"ns[{policy.namespace}]-policy[{policy.name}]-rule[{index}]"


def rbac_rules(policies: Sequence[AuthzPolicy], action: str, tcp: bool) -> tuple[Any | None, Any | None]:
    """(enforced rules, dry-run rules) of one action; each None when no policy of that kind exists."""
    built = {dry_run: rbac_pb2.RBAC(action=_ACTIONS[action]) for dry_run in (False, True)}
    for policy in policies:
        target = built[policy.dry_run]
        if not policy.rules:
            target.policies[policy_name(policy, 0)].CopyFrom(_match_never())
        for i in range(len(policy.rules)):
            found = rule_policy(policy, i, tcp)
            if found is not None:
                target.policies[policy_name(policy, i)].CopyFrom(found)
    used = {p.dry_run for p in policies}
    return (built[False] if False in used else None), (built[True] if True in used else None)


def _by_action(security: WorkloadSecurity) -> list[tuple[str, tuple[AuthzPolicy, ...]]]:
    """Istio's order; CUSTOM (an external authorizer) is not generated yet."""
    return [(a, ps) for a, ps in (("AUDIT", security.audit), ("DENY", security.deny), ("ALLOW", security.allow)) if ps]


def _rbac_configs(security: WorkloadSecurity, make: Callable[[], Any], tcp: bool) -> list[Any]:
    """One RBAC filter config (HTTP or network: both keep `rules` and `shadow_rules`) per action."""
    configs = []
    for action, policies in _by_action(security):
        enforced, shadow = rbac_rules(policies, action, tcp=tcp)
        config = make()
        if enforced is not None:
            config.rules.CopyFrom(enforced)
        if shadow is not None:
            config.shadow_rules.CopyFrom(shadow)
            config.shadow_rules_stat_prefix = _SHADOW_PREFIX.get(action, "")
        configs.append(config)
    return configs


def http_rbac_filters(security: WorkloadSecurity) -> list[Any]:
    """The RBAC HTTP filters of one workload, to go after the JWT filter and before the router."""
    filters = []
    for config in _rbac_configs(security, http_rbac_pb2.RBAC, tcp=False):
        flt = hcm_pb2.HttpFilter(name=HTTP_RBAC_FILTER)
        flt.typed_config.Pack(config)
        filters.append(flt)
    return filters


def network_rbac_filters(security: WorkloadSecurity) -> list[Any]:
    """The RBAC network filters of one workload's TCP ports, to go before ``tcp_proxy``."""
    filters = []
    for config in _rbac_configs(security, lambda: net_rbac_pb2.RBAC(stat_prefix=TCP_STAT_PREFIX), tcp=True):
        flt = lc.Filter(name=NETWORK_RBAC_FILTER)
        flt.typed_config.Pack(config)
        filters.append(flt)
    return filters
