"""A VirtualService edit patches the build's routing passes (`pilot.model.route_patches`): the same
mesh as a fresh build, and none of the three passes runs in full for an edit that keeps its place."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from benchmarks import meshgen
from pilot.api import ApiObject
from pilot.config.yaml_dir import load_dir
from pilot.config.yaml_text import load_text
from pilot.model import build
from pilot.model.build import build_mesh
from pilot.model.conversions import Conversions, changed_positions

# Beside the generated services: a delegate and its root, a Gateway-bound route, and two
# VirtualServices on one host (the older one routes it; the later one is reported and ignored).
EXTRA = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: ns-0}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*/*"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: root, namespace: ns-0, creationTimestamp: "2020-01-01T00:00:00Z"}
spec:
  hosts: [root.example]
  http:
  - {match: [{uri: {prefix: /a}}], delegate: {name: leaf, namespace: ns-0}}
  - {route: [{destination: {host: root.example}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: leaf, namespace: ns-0, creationTimestamp: "2020-01-01T00:00:01Z"}
spec:
  http: [{match: [{uri: {prefix: /a/b}}], route: [{destination: {host: root.example}}], timeout: 3s}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: at-edge, namespace: ns-0, creationTimestamp: "2020-01-01T00:00:02Z"}
spec:
  hosts: [edge.example]
  gateways: [edge]
  http: [{route: [{destination: {host: root.example}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: second, namespace: ns-0}
spec:
  hosts: [root.example]
  http: [{route: [{destination: {host: root.example}}], timeout: 2s}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: root, namespace: ns-0}
spec:
  hosts: [root.example]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 10.9.0.1}]
"""


def _mesh_objects(tmp_path: Path, services: int = 12, extra: bool = True) -> list[ApiObject]:
    config = meshgen.generate(tmp_path, services=services, namespaces=2)
    loaded = load_text(EXTRA if extra else "")
    assert not loaded.errors, loaded.errors
    return [*load_dir(config.directory).objects, *loaded.objects]


def _spec(obj: ApiObject, **update: Any) -> ApiObject:
    return obj.model_copy(update={"spec": obj.spec.model_copy(update=update)})  # type: ignore[attr-defined]


def _with_route_field(obj: ApiObject, **update: Any) -> ApiObject:
    http = obj.spec.http  # type: ignore[attr-defined]
    return _spec(obj, http=(http[0].model_copy(update=update), *http[1:])) if http else obj


def _retimed(obj: ApiObject, step: int) -> ApiObject:
    return _with_route_field(obj, timeout=f"{step % 9 + 1}s")


def _dangling(obj: ApiObject, step: int) -> ApiObject:
    first = obj.spec.http[0]  # type: ignore[attr-defined]
    if not first.route:
        return obj
    dest = first.route[0].destination.model_copy(update={"subset": f"missing-{step % 3}"})
    return _with_route_field(obj, route=(first.route[0].model_copy(update={"destination": dest}), *first.route[1:]))


def _rehosted(obj: ApiObject, step: int) -> ApiObject:
    return _spec(obj, hosts=(*obj.spec.hosts, f"alias-{step}.example"))  # type: ignore[attr-defined]


def _exported(obj: ApiObject, step: int) -> ApiObject:
    return _spec(obj, export_to=(".",) if step % 2 else ())


def _renamed(obj: ApiObject, step: int) -> ApiObject:
    return obj.model_copy(update={"metadata": obj.metadata.model_copy(update={"name": f"renamed-{step}"})})


# Edits of one VirtualService: the first two keep its place (patched), the others do not.
EDITS: dict[str, Callable[[ApiObject, int], ApiObject]] = {
    "retime": _retimed, "dangle": _dangling, "rehost": _rehosted, "export": _exported, "rename": _renamed,
}


def _counting(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count the full runs of the three passes a route edit patches."""
    calls: Counter[str] = Counter()
    for name in ("resolve_delegates", "build_scoping", "_virtual_services"):
        original = getattr(build, name)

        def counted(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(build, name, counted)
    return calls


def test_route_edits_build_the_same_mesh_as_fresh_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a random walk of edits (patched or not, delegation, a Gateway-bound route, a host two
    rules claim, destinations left dangling) every build equals a fresh one."""
    objects = _mesh_objects(tmp_path)
    calls = _counting(monkeypatch)
    rng = random.Random(11)
    memo = Conversions()
    build_mesh(objects, conversions=memo)
    full = 0
    for step in range(80):
        routes = [i for i, o in enumerate(objects) if o.kind == "VirtualService"]
        kind = rng.choice([*EDITS, "retime", "retime", "add", "remove"])
        objs = list(objects)
        picked = rng.choice(routes)
        if kind == "add":
            objs.append(_renamed(objs[picked], step))
        elif kind == "remove" and len(routes) > 8:
            del objs[picked]
        else:
            objs[picked] = EDITS.get(kind, _retimed)(objs[picked], step)
        objects = objs
        before = calls["build_scoping"]  # delegation (in this mesh) resolves in full every time
        patched = build_mesh(objects, conversions=memo)
        full += calls["build_scoping"] > before
        assert patched == build_mesh(objects), (step, kind, objs[picked].key if kind != "remove" else "")
    assert 0 < full < 80  # both ways were taken


@pytest.mark.parametrize("delegation", [False, True])
def test_a_route_edit_in_place_runs_none_of_the_routing_passes_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, delegation: bool
) -> None:
    """With delegation in the mesh, only its own pass runs again (a root's merged routes are new
    objects each time: they take the patch path as edits in place)."""
    objects = _mesh_objects(tmp_path, services=24, extra=delegation)  # an edit and a root: 2 of 27 changed
    memo = Conversions()
    before = build_mesh(objects, conversions=memo)
    calls = _counting(monkeypatch)
    position = next(i for i, o in enumerate(objects) if o.kind == "VirtualService" and o.metadata.name == "svc-003")
    edited = list(objects)
    edited[position] = _dangling(_retimed(objects[position], 4), 1)
    after = build_mesh(edited, conversions=memo)

    assert calls == (Counter({"resolve_delegates": 1}) if delegation else Counter())  # the rest was patched
    assert after == build_mesh(edited)
    assert any("missing-1" in w for w in after.warnings)  # the edited rule was checked again
    assert after.scoping is not before.scoping
    assert after.scoping.rules_by_host is before.scoping.rules_by_host  # the DestinationRule index is kept
    changed = [h for h in before.virtual_services if after.virtual_services[h] is not before.virtual_services[h]]
    merged = ["root.example"] if delegation else []  # a root's merged routes are converted again
    assert sorted(changed) == sorted([*objects[position].spec.hosts, *merged])  # type: ignore[attr-defined]

    edited[position] = _rehosted(edited[position], 5)  # another host: the passes run in full
    calls.clear()
    build_mesh(edited, conversions=memo)
    assert calls["build_scoping"] == 1 and calls["_virtual_services"] == 1
    assert build_mesh(edited, conversions=memo) == build_mesh(edited)


def test_changed_positions_gives_up_on_other_lengths_and_many_changes() -> None:
    a, b, c = object(), object(), object()
    assert changed_positions([a, b, c] * 4, [a, b, c] * 4) == []
    assert changed_positions([a, b, c] * 4, [a, a, c] + [a, b, c] * 3) == [1]
    assert changed_positions([a, b], [a, b, c]) is None
    assert changed_positions([a, b, c] * 4, [c, c, a] * 4) is None  # more than an eighth


def test_a_scoping_copy_keeps_its_indexes_only_while_the_rules_are_the_same(tmp_path: Path) -> None:
    scoping = build_mesh(_mesh_objects(tmp_path)).scoping
    copy = dataclasses.replace(scoping, routing_rules=())
    assert copy.rules_by_host is scoping.rules_by_host
    fewer = scoping.destination_rules[1:]
    narrowed = dataclasses.replace(scoping, destination_rules=fewer)
    assert narrowed.rules_by_host is not scoping.rules_by_host
    assert sum(len(r) for r in narrowed.rules_by_host.values()) + len(narrowed.wildcard_rules) == len(fewer)
    assert narrowed == dataclasses.replace(scoping, destination_rules=fewer, indexed_from=None)
