"""AuthorizationPolicy (``security.istio.io`` v1/v1beta1): who may call a workload, and how.

A policy's ``rules`` each match when one of their ``from`` sources, one of their ``to``
operations and every ``when`` condition match; ``action`` says what a match does (ALLOW, DENY,
AUDIT, or CUSTOM: ask an external authorizer). The validation is Istio's, in Istio's words;
each issue points at the field it is about.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from enum import StrEnum
from typing import Literal

from pydantic import Field

from pilot.api.base import ApiObject, IstioModel
from pilot.api.errors import FieldIssue
from pilot.api.security_common import (
    PolicyTargetReference,
    WorkloadSelector,
    ip_problems,
    port_problems,
    selection_problems,
)

DRY_RUN_ANNOTATION = "istio.io/dry-run"
MATCH_ONE, MATCH_ANY = "{*}", "{**}"  # Istio's path templates: one segment, any number of segments
_PCHAR = re.compile(r"^[a-zA-Z0-9\-._~%!$&'()+,;:@=]+$")  # RFC 3986 pchar, as Envoy's templates accept
_MAP_KEY = re.compile(r"^[^\[]+\[.+\]$")
# `when` keys with a value check of their own; other known keys accept any non-empty string.
_PLAIN_KEYS = frozenset({
    "source.namespace", "source.principal", "request.auth.principal", "request.auth.audiences",
    "request.auth.presenter", "connection.sni",
})  # fmt: skip
_IP_KEYS = frozenset({"source.ip", "remote.ip", "destination.ip"})
_MAP_PREFIXES = ("request.headers", "request.auth.claims", "experimental.envoy.filters.")


class Action(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


def empty_value(values: tuple[str, ...], name: str) -> str | None:
    return f"empty value not allowed, found in {name}" if any(v == "" for v in values) else None


def wildcard_problem(values: tuple[str, ...], name: str) -> str | None:
    """Istio's rule for trust domains: one ``*`` at most, at the start or the end."""
    for value in values:
        count = value.count("*")
        if count > 1:
            return f"at most one wildcard is allowed, found in {name}: {value!r}"
        if count == 1 and value != "*" and not value.startswith("*") and not value.endswith("*"):
            return f"wildcard is only allowed at the start or end, found in {name}: {value!r}"
    return None


def service_account_problem(values: tuple[str, ...], name: str) -> str | None:
    """``serviceAccount`` or ``namespace/serviceAccount``, no wildcard, at most 16 of them."""
    if len(values) > 16:
        return "may not have more than 16 values"
    for value in values:
        if not value:
            return f"empty value not allowed, found in {name}"
        if "*" in value:
            return f"wildcard not allowed, found in {name}"
        if value.count("/") > 1 or len(value) > 320:
            return f"expected format 'serviceAccount' or 'namespace/serviceAccount', found {value!r} in {name}"
        namespace, sep, account = value.partition("/")
        if sep and (not namespace or not account):
            return f"expected format 'serviceAccount' or 'namespace/serviceAccount', found {value!r} in {name}"
    return None


def path_template_problem(paths: tuple[str, ...], name: str) -> str | None:
    """Istio's path templates: ``{*}`` one segment, ``{**}`` the rest and only last, literals pchar."""
    for path in paths:
        templated = MATCH_ONE in path or MATCH_ANY in path
        seen_any = False
        trimmed = path.strip("/")
        for glob in trimmed.split("/"):
            if glob in (MATCH_ONE, MATCH_ANY):
                if seen_any:
                    return f"invalid or unsupported path {trimmed}, found in {name}. {{**}} is not the last operator"
                seen_any = glob == MATCH_ANY
                continue
            if "{" in glob or "}" in glob:
                return (f"invalid or unsupported path {trimmed}, found in {name}. "
                        "Contains '{' or '}' beyond a supported path template")
            if templated and not _PCHAR.match(glob):
                return (f"invalid or unsupported path {trimmed}, found in {name}. "
                        f"Contains segment {glob} with invalid string literal")
    return None


def attribute_problem(key: str, values: tuple[str, ...]) -> str | None:
    """Istio's check of one ``when`` key and its values (``ValidateAttribute``)."""
    if (found := empty_value(values, key)) is not None:
        return found
    if key.startswith(_MAP_PREFIXES):
        return None if _MAP_KEY.match(key) else f"bad key ({key}): should have format a[b]"
    if key in _IP_KEYS:
        return ip_problems(values)
    if key == "destination.port":
        return port_problems(values)
    if key == "source.serviceAccount":
        return service_account_problem(values, key)
    if key == "source.trustDomain":
        return wildcard_problem(values, key)
    if key in _PLAIN_KEYS:
        return None
    if key == "destination.namespace":
        return f"attribute {key} is replaced by the metadata.namespace"
    if key.startswith("destination.labels"):
        return f"attribute {key} is replaced by the workload selector"
    if key in ("destination.name", "destination.user"):
        return f"deprecated attribute {key}: only supported in v1alpha1"
    return f"unknown attribute: {key}"


Values = tuple[str, ...]


class Source(IstioModel):
    """``from.source``: who sends the request. Every field set must match (values OR'ed within one)."""

    principals: Values = ()
    not_principals: Values = ()
    request_principals: Values = ()
    not_request_principals: Values = ()
    namespaces: Values = ()
    not_namespaces: Values = ()
    service_accounts: Values = ()
    not_service_accounts: Values = ()
    trust_domains: Values = ()
    not_trust_domains: Values = ()
    ip_blocks: Values = ()
    not_ip_blocks: Values = ()
    remote_ip_blocks: Values = ()
    not_remote_ip_blocks: Values = ()

    def problems(self, path: str) -> Iterator[FieldIssue]:
        set_fields = [name for name in type(self).model_fields if getattr(self, name)]
        if not set_fields:
            yield FieldIssue(path, "`from.source` must not be empty")
        identity = {"principals", "not_principals", "namespaces", "not_namespaces"}
        if identity & set(set_fields) and {"service_accounts", "not_service_accounts"} & set(set_fields):
            yield FieldIssue(path, "cannot set serviceAccounts with namespaces or principals")
        for name in set_fields:
            if (found := self._field_problem(name)) is not None:
                yield FieldIssue(f"{path}.{type(self).model_fields[name].alias or name}", found)

    def _field_problem(self, name: str) -> str | None:
        values: Values = getattr(self, name)
        label = "".join(part.capitalize() for part in name.split("_"))
        if name.endswith("ip_blocks"):
            return empty_value(values, label) or ip_problems(values)
        if name.endswith("service_accounts"):
            return service_account_problem(values, label)
        if name.endswith("trust_domains"):
            found = wildcard_problem(values, label) or empty_value(values, label)
            if found is None and any("/" in v for v in values):
                return f"trust domain must not contain '/', found in {label}"
            return found
        return empty_value(values, label)


class Operation(IstioModel):
    """``to.operation``: what the request asks for. Ports are strings, as in Istio's schema."""

    hosts: Values = ()
    not_hosts: Values = ()
    ports: Values = ()
    not_ports: Values = ()
    methods: Values = ()
    not_methods: Values = ()
    paths: Values = ()
    not_paths: Values = ()

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not any(getattr(self, name) for name in type(self).model_fields):
            yield FieldIssue(path, "`to.operation` must not be empty")
        for name in type(self).model_fields:
            values: Values = getattr(self, name)
            label = "".join(part.capitalize() for part in name.split("_"))
            found = empty_value(values, label)
            if found is None and name.endswith("ports"):
                found = port_problems(values)
            if found is None and name.endswith("paths"):
                found = path_template_problem(values, label)
            if found is not None:
                yield FieldIssue(f"{path}.{type(self).model_fields[name].alias or name}", found)


class RuleFrom(IstioModel):
    source: Source | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if self.source is None:
            yield FieldIssue(f"{path}.source", "`from.source` must not be nil")


class RuleTo(IstioModel):
    operation: Operation | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if self.operation is None:
            yield FieldIssue(f"{path}.operation", "`to.operation` must not be nil")


class Condition(IstioModel):
    """``when``: an attribute (``request.headers[x-user]``, ``source.ip``, ...) and its values."""

    key: str = ""
    values: Values = ()
    not_values: Values = ()

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.key:
            yield FieldIssue(f"{path}.key", "`key` must not be empty")
            return
        if not self.values and not self.not_values:
            yield FieldIssue(path, f"at least one of `values` or `notValues` must be set for key {self.key}")
            return
        for field, values in (("values", self.values), ("notValues", self.not_values)):
            if values and (found := attribute_problem(self.key, values)) is not None:
                word = "value" if field == "values" else "notValue"
                yield FieldIssue(f"{path}.{field}", f"invalid `{word}` for `key` {self.key}: {found}")


class Rule(IstioModel):
    from_: tuple[RuleFrom, ...] = Field(default=(), alias="from")
    to: tuple[RuleTo, ...] = ()
    when: tuple[Condition, ...] = ()

    @property
    def tcp_sources(self) -> bool:
        """Whether some source names an L4 attribute (an identity or an address)."""
        l4 = ("principals", "not_principals", "namespaces", "not_namespaces", "ip_blocks", "not_ip_blocks",
              "remote_ip_blocks", "not_remote_ip_blocks", "service_accounts", "not_service_accounts")
        return any(f.source is not None and any(getattr(f.source, n) for n in l4) for f in self.from_)

    @property
    def tcp_operations(self) -> bool:
        return any(t.operation is not None and (t.operation.ports or t.operation.not_ports) for t in self.to)


class ExtensionProvider(IstioModel):
    name: str = ""


class AuthorizationPolicySpec(IstioModel):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    rules: tuple[Rule, ...] = ()
    action: Action = Action.ALLOW
    provider: ExtensionProvider | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        yield from selection_problems(path, self.selector, self.target_ref, self.target_refs)
        if self.action in (Action.CUSTOM, Action.DENY) and not self.rules:
            yield FieldIssue(
                f"{path}.rules",
                f"{self.action.value} action without `rules` is meaningless as it will never be triggered, "
                "add an empty rule `{}` if you want it be triggered for every request",
            )
        if self.action == Action.CUSTOM:
            if self.rules and (self.provider is None or not self.provider.name):
                yield FieldIssue(f"{path}.provider.name", "`provider.name` must not be empty")
            yield from self._custom_problems(path)
        elif self.provider is not None:
            yield FieldIssue(f"{path}.provider", f"`provider` must not be with non CUSTOM action, found {self.action}")

    def _custom_problems(self, path: str) -> Iterator[FieldIssue]:
        """Istio's CUSTOM action cannot match on identities (the authorizer sees the request only)."""
        identity_fields = ("namespaces", "not_namespaces", "service_accounts", "not_service_accounts",
                           "trust_domains", "not_trust_domains", "principals", "not_principals",
                           "request_principals", "not_request_principals")
        identity_keys = ("source.namespace", "source.serviceAccount", "source.trustDomain", "source.principal")
        for i, rule in enumerate(self.rules):
            for j, src in enumerate(rule.from_):
                for name in identity_fields:
                    if src.source is not None and getattr(src.source, name):
                        alias = Source.model_fields[name].alias or name
                        label = "From." + alias[0].upper() + alias[1:]
                        yield FieldIssue(f"{path}.rules[{i}].from[{j}].source.{alias}",
                                         f"{label} is currently not supported with CUSTOM action")
            for j, cond in enumerate(rule.when):
                if cond.key in identity_keys or cond.key.startswith("request.auth."):
                    yield FieldIssue(f"{path}.rules[{i}].when[{j}].key",
                                     f"{cond.key} is currently not supported with CUSTOM action")

    def advisories(self, path: str) -> Iterator[FieldIssue]:
        if self.action != Action.DENY:
            return
        for i, rule in enumerate(self.rules):
            from_only_http = bool(rule.from_) and not rule.to and not rule.tcp_sources
            if from_only_http or (rule.to and not rule.tcp_operations):
                yield FieldIssue(
                    f"{path}.rules[{i}]",
                    "configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to the "
                    "use of only HTTP attributes in a DENY rule; it is recommended to explicitly specify the port",
                )


class AuthorizationPolicy(ApiObject):
    KIND = "AuthorizationPolicy"
    kind: Literal["AuthorizationPolicy"]
    spec: AuthorizationPolicySpec = AuthorizationPolicySpec()

    @property
    def dry_run(self) -> bool:
        """``istio.io/dry-run: "true"``: evaluated and logged (shadow rules), never enforced."""
        return _GO_BOOLS.get(self.metadata.annotations.get(DRY_RUN_ANNOTATION, ""), False)

    def problems(self, path: str) -> Iterator[FieldIssue]:
        value = self.metadata.annotations.get(DRY_RUN_ANNOTATION)
        if value is None:
            return
        where = f"metadata.annotations.{DRY_RUN_ANNOTATION}"
        if self.spec.action not in (Action.ALLOW, Action.DENY):
            yield FieldIssue(where, f"the annotation {DRY_RUN_ANNOTATION} currently only supports action "
                                    f"ALLOW/DENY, found action {self.spec.action}")
        elif value not in _GO_BOOLS:
            yield FieldIssue(where, f"annotation {DRY_RUN_ANNOTATION} with invalid value ({value})")


# The spellings Go's strconv.ParseBool accepts, as Istio reads the dry-run annotation.
_GO_BOOLS = {v: True for v in ("1", "t", "T", "TRUE", "true", "True")} | {
    v: False for v in ("0", "f", "F", "FALSE", "false", "False")}
