"""VirtualService delegation, resolved before conversion: roots take their delegates' routes.

A VirtualService without hosts is a delegate; a root's http route naming it (`delegate:
{name, namespace}`) stands for the delegate's http routes, each merged with the root route as
Istio merges them:

- matches: a delegate match must narrow one of the root's (same or longer prefix, equal exact,
  the same ignoreUriCase and port; regexes never narrow); each compatible pair becomes one
  match with the root's conditions filled in where the delegate sets none, headers and query
  parameters combined. A delegate route with a match that narrows none is left out. Without
  matches on one side, the other side's stand.
- names are joined `root-delegate`; rewrite, timeout, retries, fault, mirror(s), CORS and
  header edits come from the root when the delegate route sets none.

Only one level: a delegate's own `delegate` routes are refused by validation. A delegate that
does not exist, or is not exported to the root's namespace, costs only that root route.
Everything left out is reported in the mesh warnings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pilot.api import VirtualService
from pilot.api.http_route import HTTPMatchRequest, HTTPRoute
from pilot.api.route_common import StringMatch
from pilot.model.hosts import export_set, visible_to

# Route fields a merged route takes from the root when the delegate's route leaves them unset.
_INHERITED = ("rewrite", "timeout", "retries", "fault", "mirror", "mirror_percent", "mirror_percentage",
              "cors_policy", "headers")


def resolve_delegates(services: Sequence[VirtualService], warnings: list[str]) -> list[VirtualService]:
    """`services` with every root's delegate routes replaced by the merged ones, delegates removed."""
    delegates = {(vs.metadata.namespace, vs.metadata.name): vs for vs in services if vs.spec.is_delegate}
    out: list[VirtualService] = []
    for vs in services:
        if vs.spec.is_delegate:
            continue
        if any(route.delegate is not None for route in vs.spec.http):
            vs = _merged_root(vs, delegates, warnings)  # noqa: PLW2901
        out.append(vs)
    return out


def _merged_root(
    root: VirtualService, delegates: dict[tuple[str, str], VirtualService], warnings: list[str]
) -> VirtualService:
    namespace = root.metadata.namespace
    http: list[HTTPRoute] = []
    for i, route in enumerate(root.spec.http):
        if route.delegate is None:
            http.append(route)
            continue
        key = (route.delegate.namespace or namespace, route.delegate.name)
        where = f"{root.ref}: http[{i}].delegate {key[0]}/{key[1]}"
        target = delegates.get(key)
        if target is None:
            warnings.append(f"{where}: no delegate VirtualService (one without hosts) by that name; route left out")
            continue
        if not visible_to(export_set(target.spec.export_to, key[0]), namespace):
            warnings.append(f"{where}: not exported to namespace {namespace}; route left out")
            continue
        for j, sub in enumerate(target.spec.http):
            merged = _merge_route(route, sub)
            if merged is None:
                warnings.append(f"{where}: its http[{j}] has a match outside the root route's matches; left out")
            else:
                http.append(merged)
    return root.model_copy(update={"spec": root.spec.model_copy(update={"http": tuple(http)})})


def _merge_route(root: HTTPRoute, sub: HTTPRoute) -> HTTPRoute | None:
    matches = _merge_matches(root.match, sub.match)
    if matches is None:
        return None
    update: dict[str, Any] = {"match": matches, "name": _join(root.name, sub.name)}
    update |= {field: getattr(root, field) for field in _INHERITED if getattr(sub, field) is None}
    if not sub.mirrors:
        update["mirrors"] = root.mirrors
    return sub.model_copy(update=update)


def _merge_matches(
    root: tuple[HTTPMatchRequest, ...], sub: tuple[HTTPMatchRequest, ...]
) -> tuple[HTTPMatchRequest, ...] | None:
    """Every delegate match paired with each root match it narrows; None on a match that narrows none."""
    if not root:
        return sub
    if not sub:
        return root
    out: list[HTTPMatchRequest] = []
    for leaf in sub:
        pairs = [_merge_match(r, leaf) for r in root if not _conflict(r, leaf)]
        if not pairs:
            return None
        out += pairs
    return tuple(out)


def _merge_match(root: HTTPMatchRequest, leaf: HTTPMatchRequest) -> HTTPMatchRequest:
    update: dict[str, Any] = {"name": _join(root.name, leaf.name)}
    for field in ("uri", "scheme", "method", "authority"):
        if getattr(leaf, field) is None:
            update[field] = getattr(root, field)
    for field in ("headers", "without_headers", "query_params"):
        update[field] = {**getattr(root, field), **getattr(leaf, field)}
    if leaf.port is None:
        update["port"] = root.port
    return leaf.model_copy(update=update)


def _conflict(root: HTTPMatchRequest, leaf: HTTPMatchRequest) -> bool:
    """Whether `leaf` fails to narrow `root` (Istio's rule; sender conditions are not compared)."""
    for field in ("uri", "scheme", "method", "authority"):
        if _string_conflict(getattr(root, field), getattr(leaf, field)):
            return True
    # withoutHeaders are compared with the root's headers, as Istio does.
    for leaf_map, root_map in ((leaf.headers, root.headers), (leaf.without_headers, root.headers),
                               (leaf.query_params, root.query_params)):
        if any(_string_conflict(root_map.get(key), value) for key, value in leaf_map.items()):
            return True
    if root.ignore_uri_case != leaf.ignore_uri_case:
        return True
    return root.port is not None and leaf.port is not None and root.port != leaf.port


def _string_conflict(root: StringMatch | None, leaf: StringMatch | None) -> bool:
    if root is None or leaf is None:
        return False
    if root.regex or leaf.regex:
        return True  # no regex is known to narrow another
    if root.exact:
        return bool(leaf.prefix) or leaf.exact != root.exact
    if root.prefix:
        narrower = leaf.prefix or leaf.exact
        return not (narrower and narrower.startswith(root.prefix))
    return True


def _join(root: str | None, leaf: str | None) -> str | None:
    return f"{root}-{leaf}" if root and leaf else (leaf or root)
