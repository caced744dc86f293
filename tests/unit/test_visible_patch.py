"""What an endpoint move patches from the last mesh version instead of computing again: the
visible mesh of a namespace (`pilot.translate.generate._visible`), the endpoint part
(`pilot.translate.endpoints.patched_assignments`) and its ResourceSet (`Serializer.set_of`).
Each must equal what computing afresh gives."""

from __future__ import annotations

from typing import Any

import pytest

from pilot.config.store import ConfigStore
from pilot.model.build import build_mesh
from pilot.model.conversions import Conversions
from pilot.model.mesh import MeshSnapshot
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate.common import sorted_by_name
from pilot.translate.endpoints import load_assignments
from pilot.translate.generate import _seen, generate_endpoints
from pilot.translate.memo import Patched
from pilot.translate.scope import proxy_view
from pilot.translate.visibility import visible_mesh
from pilot.xds.resources import ResourceSet
from pilot.xds.snapshot import Serializer
from pilot.xds.typeurls import ENDPOINT
from tests.unit.test_route_fast_path import CLASSES, objects


class Builds:
    """Successive meshes built as pilot builds them: conversions and generated parts carried."""

    def __init__(self) -> None:
        self.conversions, self.carry = Conversions(), Conversions()
        self.store = ConfigStore()  # keeps unchanged objects as the same instances

    def mesh(self, **edit: Any) -> MeshSnapshot:
        self.carry.advance(complete=True)
        self.store.replace_source("f", objects(**edit))
        return build_mesh(self.store.objects(), conversions=self.conversions, carry=self.carry)


def seen_and_fresh(mesh: MeshSnapshot, key: ProxyClass) -> tuple[MeshSnapshot, MeshSnapshot]:
    view = proxy_view(mesh, key)
    egress = None if key.kind == ProxyKind.ROUTER else view.egress
    return _seen(mesh, key, view), visible_mesh(mesh, key.namespace, egress, view.labels)


def test_an_endpoint_move_patches_the_last_visible_mesh_and_equals_a_fresh_one() -> None:
    builds = Builds()
    first = builds.mesh()
    before = {k: seen_and_fresh(first, k)[0] for k in CLASSES}
    moved = builds.mesh(moved=1)
    assert moved.scoping is first.scoping  # what lets the patch apply
    for key in CLASSES:
        seen, fresh = seen_and_fresh(moved, key)
        assert seen == fresh, key
        assert seen.services == fresh.services and list(seen.services) == list(fresh.services)
        assert seen.services["web.shop.svc.cluster.local"] is moved.services["web.shop.svc.cluster.local"]
        # Patched, not narrowed again: the rules are the last version's very objects.
        assert seen.destination_rules is before[key].destination_rules, key
        assert seen.virtual_services is before[key].virtual_services, key
    # Namespaces that shared one view share one after the move (patched once between them).
    alike = [k for k in CLASSES if k.kind == ProxyKind.SIDECAR and k.namespace in ("shop", "data", "other")]
    assert len({id(before[k]) for k in alike}) == 1
    assert len({id(seen_and_fresh(moved, k)[0]) for k in alike}) == 1
    # ... and made one services mapping between them: each view's three mappings had their
    # identities taken once (`generate._shared`), not once per namespace.
    views = {id(seen_and_fresh(moved, k)[0]) for k in CLASSES}
    taken = [k for k in moved.memo if isinstance(k, tuple) and k and k[0] == "identities"]
    assert len(taken) <= 3 * len(views), (len(taken), len(views))


def test_a_routing_change_matches_the_rules_to_hosts_again() -> None:
    """Not the endpoint patch: new routing rules are matched to hosts again (the routing patch,
    `tests/unit/test_route_patch.py`, keeps the services and DestinationRules)."""
    builds = Builds()
    first = builds.mesh()
    before = {k: seen_and_fresh(first, k)[0] for k in CLASSES}
    for edit in ({"export": '"."'}, {"cart_rule": False}, {"tcp": False}):
        mesh = builds.mesh(**edit)
        assert mesh.scoping is not first.scoping
        for key in CLASSES:
            seen, fresh = seen_and_fresh(mesh, key)
            assert seen == fresh, (edit, key)
            assert seen.virtual_services is not before[key].virtual_services


def test_without_a_carry_the_visible_mesh_is_narrowed_every_time() -> None:
    mesh = build_mesh(objects(moved=2))
    for key in CLASSES:
        seen, fresh = seen_and_fresh(mesh, key)
        assert seen == fresh


def test_an_endpoint_move_patches_the_endpoint_part_and_its_resource_set() -> None:
    builds = Builds()
    first = builds.mesh()
    before = {k: generate_endpoints(first, k) for k in CLASSES}
    serializer = Serializer()
    before_sets = {k: serializer.set_of(ENDPOINT, p) for k, p in before.items()}
    serializer.next_mesh()
    moved = builds.mesh(moved=1)
    for key in CLASSES:
        part = generate_endpoints(moved, key)
        view = proxy_view(moved, key)
        fresh_seen = visible_mesh(moved, key.namespace, None if key.kind == ProxyKind.ROUTER else view.egress,
                                  view.labels)
        fresh = sorted_by_name(load_assignments(fresh_seen, mtls=key.mtls))
        assert isinstance(part, Patched) and part.patched_from is before[key], key
        assert list(part) == list(fresh) and part == fresh, key  # same names, order and messages
        assert "outbound|8080|v1|web.shop.svc.cluster.local" in part.replaced_names or key.namespace == "narrow"
        patched_set = serializer.set_of(ENDPOINT, part)
        afresh = ResourceSet(ENDPOINT, [Serializer().resource(ENDPOINT, n, m) for n, m in fresh.items()])
        assert patched_set is not before_sets[key]
        assert patched_set.version == afresh.version
        assert b"".join(patched_set.sotw_pieces()) == b"".join(afresh.sotw_pieces())
        assert list(patched_set) == list(afresh)


def test_a_patched_part_never_keeps_more_than_its_own_base() -> None:
    base = {"a": 1, "b": 2}
    one = Patched(base, {"a": 3})
    two = Patched(one, {"b": 4})
    assert two == {"a": 3, "b": 4} and two.patched_from is one and one.patched_from is None
    with pytest.raises(KeyError):
        Patched(base, {"c": 5})  # a replacement, never an addition
