"""The pusher's two fast paths, what they share: their kinds, the route fast path's halves, and
how classes that shared a part at their last generation share its next version.

A fast path (`pilot.push.Pusher._publish_endpoints`, `_publish_routes`) gives every watched class
its snapshot with one type replaced (routes: with a VHDS class's virtual hosts too) instead of
generating it in full. Classes holding the very same part object had equal inputs to it, so the
first class of each group makes the part's next version (`next_part`) and the others look it up:
one generation per group, a dictionary lookup per class. Pure; the pusher keeps the state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from pilot.model.proxy import ProxyClass
from pilot.xds import typeurls

# (mesh, proxy) -> the class's part of one type.
GeneratePart = Callable[[Any, ProxyClass], Mapping[str, Any]]


class RoutesFastPath(NamedTuple):
    """The route fast path's halves (`Pusher._publish_routes`)."""

    applies: Callable[[Any, Any], bool]  # (old mesh, new mesh): only HTTP routes changed
    generate: GeneratePart  # (mesh, proxy): a plain sidecar's route part alone
    # (mesh, route part) -> (route configurations naming VHDS, virtual hosts): how a VHDS class
    # (`ProxyClass.vhds`) takes the route part, exactly as `generate_parts` splits it.
    split: Callable[[Any, Mapping[str, Any]], tuple[Mapping[str, Any], Mapping[str, Any]]] | None = None


# One push's groups: id of a class's last part -> (that part, its next version), filled by the
# first class of each group. A part's ResourceSet is the serializer's, memoized per part.
Groups = dict[int, tuple[Mapping[str, Any], Mapping[str, Any]]]
# The two fast paths (`Pusher._build`): "" is a full push.
EDS_ONLY, ROUTES_ONLY = "eds", "routes"
DONE = {EDS_ONLY: "given new endpoints (EDS only)", ROUTES_ONLY: "given new routes (routes only)"}
REPLACED = {EDS_ONLY: (typeurls.ENDPOINT,), ROUTES_ONLY: (typeurls.ROUTE, typeurls.VIRTUAL_HOST)}  # what each replaces


def next_part(groups: Groups | None, old: Mapping[str, Any] | None,
              make: Callable[[], Mapping[str, Any]]) -> Mapping[str, Any]:
    """The next version of the part `old`: the one this push's first class with `old` made, or
    `make()` for that first class (always, without groups)."""
    found = groups.get(id(old)) if groups is not None and old is not None else None
    if found is not None and found[0] is old:  # the entry keeps `old` alive: ids stay its own
        return found[1]
    part = make()
    if groups is not None and old is not None:
        groups[id(old)] = (old, part)
    return part
