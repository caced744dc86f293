"""Memoization of generator parts that depend on the mesh alone, not on the proxy.

Many proxy classes share clusters, endpoints and route configs; computing them once per
mesh (and handing every class the same message objects, which the snapshot layer then
serializes once) keeps a push O(mesh + classes) instead of O(mesh x classes). The memo
lives on the MeshSnapshot itself, so its key is exactly the function's arguments: the mesh
object plus the key given here. Callers must treat results as read-only.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

from pilot.model.mesh import MeshSnapshot

T = TypeVar("T")


def memoized(mesh: MeshSnapshot, key: Hashable, compute: Callable[[], T]) -> T:
    """`compute()`, once per (mesh, key)."""
    try:
        found: T = mesh.memo[key]
    except KeyError:
        found = mesh.memo[key] = compute()
    return found
