"""Field types for Istio's namespace-aware host syntax: ``exportTo``, ``ns/host``, gateway refs.

Istio spells visibility and scope the same way in several kinds: ``exportTo`` lists namespaces
(``.`` for the object's own, ``*`` for all, ``~`` for none), Gateway and Sidecar hosts are
``namespace/dnsName`` and VirtualService ``gateways`` are ``mesh`` or ``[namespace/]name``.
The checks live here once so every kind words its errors the same way.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from pilot.api.base import check_host, rule_error

MESH_GATEWAY = "mesh"
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _check_export_to(values: tuple[str, ...]) -> tuple[str, ...]:
    seen: set[str] = set()
    for value in values:
        if value not in (".", "*", "~") and not _LABEL.match(value):
            raise rule_error(f"{value!r} is not '.', '*', '~' or a namespace name")
        if value in seen:
            raise rule_error(f"duplicate entry {value!r}")
        seen.add(value)
    for reserved in ("*", "~"):
        if reserved in seen and len(seen) > 1:
            raise rule_error(f"{reserved!r} cannot be combined with other entries")
    return values


def _check_namespaced_host(value: str, *, namespace_required: bool, allow_none: bool) -> str:
    namespace, sep, host = value.rpartition("/")
    if not sep and namespace_required:
        raise rule_error(f"{value!r} must be namespace/dnsName (namespace '.', '*', '~' or a name)")
    if sep:
        allowed = (".", "*", "~") if allow_none else (".", "*")
        if namespace not in allowed and not _LABEL.match(namespace):
            raise rule_error(f"{value!r}: namespace {namespace!r} is not {', '.join(allowed)} or a namespace name")
    try:
        check_host(host)
    except ValueError:
        raise rule_error(f"{value!r}: {host!r} is not a host name, '*' or '*.domain'") from None
    return value


def _check_gateway_host(value: str) -> str:
    return _check_namespaced_host(value, namespace_required=False, allow_none=False)


def _check_sidecar_host(value: str) -> str:
    return _check_namespaced_host(value, namespace_required=True, allow_none=True)


def _check_gateway_ref(value: str) -> str:
    if value == MESH_GATEWAY:
        return value
    namespace, sep, name = value.rpartition("/")
    if (sep and not _LABEL.match(namespace)) or not _SUBDOMAIN.match(name):
        raise rule_error(f"{value!r} is not 'mesh', a Gateway name or namespace/name")
    return value


ExportTo = Annotated[tuple[str, ...], AfterValidator(_check_export_to)]
GatewayHost = Annotated[str, AfterValidator(_check_gateway_host)]
SidecarHost = Annotated[str, AfterValidator(_check_sidecar_host)]
GatewayRef = Annotated[str, AfterValidator(_check_gateway_ref)]
