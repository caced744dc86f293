"""Memoization of generator parts that depend on the mesh alone, not on the proxy.

Many proxy classes share clusters, endpoints and route configs; computing them once per
mesh (and handing every class the same message objects, which the snapshot layer then
serializes once) keeps a push O(mesh + classes) instead of O(mesh x classes). The memo
lives on the MeshSnapshot itself, so its key is exactly the function's arguments: the mesh
object plus the key given here. Callers must treat results as read-only.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

from pilot.model.mesh import MeshSnapshot

T = TypeVar("T")


def memoized(mesh: MeshSnapshot, key: Hashable, compute: Callable[[], T]) -> T:
    """`compute()`, once per (mesh, key)."""
    try:
        found: T = mesh.memo[key]
    except KeyError:
        found = mesh.memo[key] = compute()
    return found


def memoized_for(mesh: MeshSnapshot, tag: Hashable, obj: Any, compute: Callable[[], T]) -> T:
    """`compute()`, once per (mesh, tag, the very object `obj`), for results derived from an object
    that is not hashable by value (a mapping). The entry keeps `obj` alive, so its id stays its own."""
    found: tuple[Any, T] = memoized(mesh, (tag, id(obj)), lambda: (obj, compute()))
    return found[1]


def carried(mesh: MeshSnapshot, compute: Callable[..., T], objs: tuple[Any, ...], *args: Hashable) -> T:
    """`compute(*objs, *args)`, reused from an earlier mesh version while `objs` are the same objects.

    Why: a rebuild makes a new MeshSnapshot, but the model objects of unchanged config are the
    very same frozen instances (see `pilot.model.conversions`), so what is generated from them
    (a service's clusters, its endpoints) is handed over unchanged, as the same message objects,
    which the snapshot layer then does not serialize again. `compute` must read only its
    arguments; the key is exactly those (identities of `objs`, values of `args`).
    """
    if mesh.carry is None:
        return compute(*objs, *args)
    return mesh.carry.of_all(compute, objs, *args)


def carried_value(mesh: MeshSnapshot, compute: Callable[..., T], *args: Hashable) -> T:
    """`compute(*args)` for hashable immutable arguments, reused across mesh versions while equal."""
    if mesh.carry is None:
        return compute(*args)
    return mesh.carry.by_value(compute, *args)


def carried_by(
    mesh: MeshSnapshot, tag: Hashable, objs: tuple[Any, ...], args: tuple[Hashable, ...], compute: Callable[[], T]
) -> T:
    """`compute()` reused across mesh versions while `objs` are the same objects and `args` equal.

    For generators that read a few objects out of the mesh: `objs` must list every one of them.
    """
    if mesh.carry is None:
        return compute()
    return mesh.carry.keyed(tag, objs, args, compute)


class Patched(dict[str, Any]):
    """A generated part made from an earlier version of itself, `patched_from`, by replacing the
    messages of `replaced_names` (same names, same order). Equal to generating it afresh; the
    snapshot layer uses the lineage to serialize it in O(replaced) (`pilot.xds.snapshot.Serializer`).

    The base is kept while this part lives (one mesh version); a patched base forgets its own
    base then, so versions never form a chain that would keep every earlier one alive.
    """

    __slots__ = ("patched_from", "replaced_names")

    def __init__(self, base: Mapping[str, Any], replacements: Mapping[str, Any]) -> None:
        super().__init__(base)
        missing = [n for n in replacements if n not in base]
        if missing:
            raise KeyError(f"not in the base part: {missing[:3]}")
        self.update(replacements)
        if isinstance(base, Patched):
            base.patched_from = None  # serialized already: its own lineage is no longer needed
        self.patched_from: Mapping[str, Any] | None = base
        self.replaced_names = tuple(replacements)
