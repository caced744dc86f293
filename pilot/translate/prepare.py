"""What a full push generates before publishing, in its build thread: the parts classes share.

Why: a class's shared parts (the mesh its namespace sees, outbound clusters, endpoints, the outbound
route configuration) are memoized on the mesh, so the first class of each view pays for them and
the others find them. At 1,000 services that first class takes ~0.5 s; generated on the event loop,
where the pusher publishes and proxies connect, it held every stream that long (a fleet's first
connect waited on it, and so did every full push, once per view). Generating one class of each view
right after the mesh is built, in the same worker thread, leaves the event loop the cheap part:
each class's own listeners and clusters, and lookups.

Threads: only the build thread touches the new mesh's memos until the push publishes it. The
carry across mesh versions (`MeshSnapshot.carry`) is shared with the event loop, where a proxy
connecting meanwhile is generated from the current mesh. Each entry is one dictionary operation
under the GIL, and a patched result is exact from either mesh version's record. So an interleaving
costs work done twice at most, never a wrong part.

Cost: one generation per distinct (kind, namespace, mesh certificates, capture) among the connected
classes, which publishing would do anyway, moments later; with none connected yet (pilot starting),
one sidecar of the mesh's first workload, so the first proxies find the mesh-wide parts ready.
"""

from __future__ import annotations

from collections.abc import Sequence

from pilot.model.mesh import MeshSnapshot
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate.generate import generate_parts


def representatives(mesh: MeshSnapshot, classes: Sequence[ProxyClass]) -> list[ProxyClass]:
    """One class per (kind, namespace, mesh certificates, capture) among `classes`, in their order;
    with none, a plain sidecar labelled as the mesh's first workload (none without workloads)."""
    if not classes:
        first = min(mesh.workloads.values(), key=lambda w: (w.namespace, w.name), default=None)
        if first is None:
            return []
        return [ProxyClass(ProxyKind.SIDECAR, first.namespace, tuple(sorted(first.labels.items())))]
    picked: dict[tuple[object, ...], ProxyClass] = {}
    for key in classes:
        picked.setdefault((key.kind, key.namespace, key.mtls, key.captured), key)
    return list(picked.values())


def prepare_shared(mesh: MeshSnapshot, classes: Sequence[ProxyClass]) -> int:
    """Generate `representatives(mesh, classes)` now (their parts stay memoized on `mesh`); returns
    how many. A class that fails is left to publishing, which generates it again and reports why."""
    done = 0
    for key in representatives(mesh, classes):
        try:
            generate_parts(mesh, key)
        except Exception:  # reported when the class is published
            continue
        done += 1
    return done
