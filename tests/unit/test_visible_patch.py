"""The visible mesh of a namespace is patched from the last mesh version's when only services'
endpoints moved (`pilot.translate.generate._visible`): the result must equal narrowing afresh."""

from __future__ import annotations

from typing import Any

from pilot.config.store import ConfigStore
from pilot.model.build import build_mesh
from pilot.model.conversions import Conversions
from pilot.model.mesh import MeshSnapshot
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate.generate import _seen
from pilot.translate.scope import proxy_view
from pilot.translate.visibility import visible_mesh
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


def test_a_routing_or_service_change_narrows_afresh() -> None:
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
