"""Envoy RBAC filters (network and HTTP) decided for one request, with three-valued logic (pure).

A rule this module cannot judge from the request alone (JWT claims in dynamic metadata, filter
state, URI templates, a source address or principal the request does not state) is *unknown*;
unknown propagates through and/or/not like SQL NULL, so a decision is reported as `allow`, `deny`
or `unknown` with the policy that decided it. No client certificate (no `--from-principal`) means
`authenticated` rules do not match, as for a plaintext connection.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pilot.simulate.matchers import header_match, string_match
from pilot.simulate.request import Request

Json = Mapping[str, Any]
Tri = bool | None


@dataclass(frozen=True)
class RbacDecision:
    """One RBAC filter's verdict: its action (ALLOW/DENY/LOG), the outcome and the deciding policy."""

    filter: str
    action: str
    outcome: str  # allow | deny | unknown
    policy: str | None


def _all(values: Iterable[Tri]) -> Tri:
    seen = list(values)
    if any(v is False for v in seen):
        return False
    return None if any(v is None for v in seen) else True


def _any(values: Iterable[Tri]) -> Tri:
    seen = list(values)
    if any(v is True for v in seen):
        return True
    return None if any(v is None for v in seen) else False


def _not(value: Tri) -> Tri:
    return None if value is None else not value


def _cidr(cidr: Json, ip: str | None) -> Tri:
    if ip is None:
        return None
    net = ipaddress.ip_network(f'{cidr.get("addressPrefix")}/{int(cidr.get("prefixLen", 0) or 0)}', strict=False)
    return ipaddress.ip_address(ip) in net


def permission(rule: Json, req: Request, dst_port: int) -> Tri:
    """One Permission against the request (destination port as the listener saw it)."""
    if rule.get("any"):
        return True
    if "andRules" in rule:
        return _all(permission(r, req, dst_port) for r in rule["andRules"].get("rules", ()))
    if "orRules" in rule:
        return _any(permission(r, req, dst_port) for r in rule["orRules"].get("rules", ()))
    if "notRule" in rule:
        return _not(permission(rule["notRule"], req, dst_port))
    if "header" in rule:
        return header_match(rule["header"], req)
    if "urlPath" in rule:
        return string_match(rule["urlPath"].get("path", {}), req.path_only)
    if "destinationPort" in rule:
        return int(rule["destinationPort"]) == dst_port
    if "destinationPortRange" in rule:
        rng = rule["destinationPortRange"]
        return int(rng.get("start", 0)) <= dst_port < int(rng.get("end", 0))
    if "destinationIp" in rule:
        return _cidr(rule["destinationIp"], req.destination_ip)
    if "requestedServerName" in rule:
        return string_match(rule["requestedServerName"], req.host if req.scheme == "https" else "")
    return None  # metadata, uriTemplate, matcher extensions: not decidable from the request


def principal(rule: Json, req: Request) -> Tri:
    """One Principal (who is asking) against the request."""
    if rule.get("any"):
        return True
    if "andIds" in rule:
        return _all(principal(r, req) for r in rule["andIds"].get("ids", ()))
    if "orIds" in rule:
        return _any(principal(r, req) for r in rule["orIds"].get("ids", ()))
    if "notId" in rule:
        return _not(principal(rule["notId"], req))
    if "authenticated" in rule:
        if req.source_principal is None:
            return False
        name = rule["authenticated"].get("principalName")
        return True if not name else string_match(name, req.source_principal)
    for key in ("directRemoteIp", "remoteIp", "sourceIp"):
        if key in rule:
            return _cidr(rule[key], req.source_ip)
    if "header" in rule:
        return header_match(rule["header"], req)
    if "urlPath" in rule:
        return string_match(rule["urlPath"].get("path", {}), req.path_only)
    return None  # metadata (JWT claims), filter state


def decide(name: str, config: Json, req: Request, dst_port: int) -> RbacDecision:
    """What one RBAC filter (its typed config) does to the request."""
    rules = config.get("rules")
    if rules is None:
        return RbacDecision(name, "NONE", "allow", None)
    action = str(rules.get("action", "ALLOW"))
    verdicts = {pname: _all([
        _any(permission(p, req, dst_port) for p in policy.get("permissions", ())),
        _any(principal(p, req) for p in policy.get("principals", ())),
    ]) for pname, policy in sorted((rules.get("policies") or {}).items())}
    hit = next((p for p, v in verdicts.items() if v is True), None)
    maybe = next((p for p, v in verdicts.items() if v is None), None)
    if action == "LOG":
        return RbacDecision(name, action, "allow", hit)
    if hit is not None:
        return RbacDecision(name, action, "allow" if action == "ALLOW" else "deny", hit)
    if maybe is not None:
        return RbacDecision(name, action, "unknown", maybe)
    return RbacDecision(name, action, "deny" if action == "ALLOW" else "allow", None)
