"""Istio's host and namespace rules as pure functions: wildcards, ``ns/host``, ``exportTo``.

Used by `build_mesh` (resolving what each object names) and by the per-proxy scoping in
`pilot.translate.scope` (what each proxy may see). Nothing here knows about Envoy.
"""

from __future__ import annotations

from collections.abc import Iterable

ROOT_NAMESPACE = "istio-system"  # Istio's default config root namespace
MESH_GATEWAY = "mesh"  # VirtualService ``gateways`` keyword: every sidecar
ANY = "*"
NONE = "~"
EVERYWHERE = frozenset({ANY})


def export_set(export_to: Iterable[str], namespace: str) -> frozenset[str]:
    """``exportTo`` resolved for an object in ``namespace``: ``.`` becomes the namespace; empty means all."""
    values = frozenset(namespace if v == "." else v for v in export_to)
    return values or EVERYWHERE


def visible_to(export_to: frozenset[str], namespace: str) -> bool:
    """Whether an object exported to ``export_to`` is visible from ``namespace``."""
    return ANY in export_to or namespace in export_to


def exports_overlap(a: frozenset[str], b: frozenset[str]) -> bool:
    """Whether some namespace sees both objects (so they may conflict there)."""
    if NONE in a or NONE in b:
        return False
    return ANY in a or ANY in b or bool(a & b)


def host_matches(pattern: str, host: str) -> bool:
    """Istio's match: ``*`` matches everything, ``*.example.com`` any name under example.com.

    ``host`` may itself be a wildcard; it matches if everything it names is under ``pattern``.
    """
    if pattern in (ANY, host):
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and host != ANY
    return False


def host_intersection(a: str, b: str) -> str | None:
    """The more specific of two hosts when one lies within the other, else None."""
    if host_matches(a, b):
        return b
    if host_matches(b, a):
        return a
    return None


def specificity(pattern: str) -> tuple[int, int]:
    """Sort key: exact names first, then longer (narrower) wildcards, ``*`` last."""
    return (1 if pattern.startswith("*") else 0, -len(pattern))


def split_scoped_host(text: str, own_namespace: str) -> tuple[str, str]:
    """``ns/host`` -> (namespace, host); ``.`` is ``own_namespace``; no namespace means any (``*``)."""
    namespace, sep, host = text.rpartition("/")
    if not sep:
        return ANY, host
    return (own_namespace if namespace == "." else namespace), host


def namespace_allows(scope_namespace: str, namespace: str) -> bool:
    """Whether an ``ns/`` part of a Gateway or Sidecar host admits config from ``namespace``."""
    return scope_namespace in (ANY, namespace)
