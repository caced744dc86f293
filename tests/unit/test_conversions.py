"""Conversions carried between builds: the same mesh as a fresh build, with unchanged parts reused."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pilot.api import ApiObject
from pilot.config.yaml_dir import load_dir
from pilot.model.build import build_mesh
from pilot.model.conversions import Conversions, changed_keys, position, same_objects

EXAMPLES = sorted(p for p in (Path(__file__).resolve().parents[2] / "examples").iterdir() if p.is_dir())
Edit = Callable[[ApiObject], ApiObject | None]


def _spec(obj: ApiObject, **update: Any) -> ApiObject:
    return obj.model_copy(update={"spec": obj.spec.model_copy(update=update)})  # type: ignore[attr-defined]


def _move_workload(obj: ApiObject) -> ApiObject | None:
    if obj.kind == "WorkloadEntry":
        return _spec(obj, address="127.0.9.9", labels={**obj.spec.labels, "version": "moved"})  # type: ignore[attr-defined]
    return obj


def _drop_first_service(objs: list[ApiObject]) -> list[ApiObject]:
    first = next((o for o in objs if o.kind == "ServiceEntry"), None)
    return [o for o in objs if o is not first]


def _reweigh(obj: ApiObject) -> ApiObject | None:
    if obj.kind == "VirtualService" and obj.spec.http:  # type: ignore[attr-defined]
        first = obj.spec.http[0]  # type: ignore[attr-defined]
        route = tuple(r.model_copy(update={"weight": None}) for r in first.route[:1])
        return _spec(obj, http=(first.model_copy(update={"route": route}), *obj.spec.http[1:]))  # type: ignore[attr-defined]
    return obj


def _drop_subsets(obj: ApiObject) -> ApiObject | None:
    return _spec(obj, subsets=()) if obj.kind == "DestinationRule" else obj


EDITS: list[Callable[[list[ApiObject]], list[ApiObject]]] = [
    lambda objs: [e for o in objs if (e := _move_workload(o)) is not None],
    _drop_first_service,
    lambda objs: [e for o in objs if (e := _reweigh(o)) is not None],
    lambda objs: [e for o in objs if (e := _drop_subsets(o)) is not None],
]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_a_carried_memo_builds_the_same_mesh_as_a_fresh_build(example: Path) -> None:
    memo = Conversions()
    objects = list(load_dir(example).objects)
    assert build_mesh(objects, conversions=memo) == build_mesh(objects)
    for edit in EDITS:  # each edit on top of the previous ones, as config evolves
        objects = edit(objects)
        assert build_mesh(objects, conversions=memo) == build_mesh(objects), edit
        assert build_mesh(objects, conversions=memo) == build_mesh(objects), "a second identical build"


def test_unchanged_objects_keep_their_converted_form_and_edited_ones_do_not() -> None:
    memo = Conversions()
    objects = list(load_dir(EXAMPLES[0]).objects)
    before = build_mesh(objects, conversions=memo)
    edited = [_spec(o, address="127.0.9.9") if o.key == ("WorkloadEntry", "default", "reviews-v1") else o
              for o in objects]
    hits = memo.hits
    after = build_mesh(edited, conversions=memo)

    assert memo.hits > hits
    assert after.workload("default", "reviews-v1") is not before.workload("default", "reviews-v1")
    assert after.workload("default", "reviews-v1").address == "127.0.9.9"  # type: ignore[union-attr]
    assert after.workload("default", "reviews-v2") is before.workload("default", "reviews-v2")
    assert after.virtual_services == before.virtual_services
    assert all(after.virtual_services[h] is before.virtual_services[h] for h in before.virtual_services)


def test_the_memo_keeps_only_what_the_last_builds_used() -> None:
    memo = Conversions()
    objects = list(load_dir(EXAMPLES[0]).objects)
    build_mesh(objects, conversions=memo)
    one_build = len(memo)
    for i in range(10):  # every build sees new instances of every WorkloadEntry
        objects = [_spec(o, weight=i + 1) if o.kind == "WorkloadEntry" else o for o in objects]
        build_mesh(objects, conversions=memo)
    assert len(memo) <= 2 * one_build


def _classes(mesh: Any) -> list[Any]:
    """A class for every workload of the mesh (local-mesh sidecars and Kubernetes-style ones)."""
    from pilot.model.proxy import ProxyClass, ProxyKind

    out = []
    for wl in mesh.workloads.values():
        labels = tuple(sorted(wl.labels.items()))
        out.append(ProxyClass(ProxyKind.SIDECAR, wl.namespace, labels, wl.address, wl.name))
        out.append(ProxyClass(ProxyKind.SIDECAR, wl.namespace, labels))
        out.append(ProxyClass(ProxyKind.ROUTER, wl.namespace, labels, wl.address, wl.name))
    return out


def _serialized(resources: Any) -> dict[str, dict[str, bytes]]:
    return {t: {n: m.SerializeToString(deterministic=True) for n, m in r.items()} for t, r in resources.items()}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_generation_carried_across_mesh_versions_equals_a_fresh_generation(example: Path) -> None:
    """What generators carry from one mesh version to the next (keyed by their inputs' identity)
    never changes what they produce: every class of every example, through every edit."""
    from pilot.translate import generate

    conversions, carry = Conversions(), Conversions()
    objects = list(load_dir(example).objects)
    for edit in [lambda objs: objs, *EDITS]:
        objects = edit(objects)
        carried = build_mesh(objects, conversions=conversions, carry=carry)
        fresh = build_mesh(objects)
        classes = _classes(fresh)
        assert classes or not fresh.workloads
        for key in classes:
            assert _serialized(generate(carried, key)) == _serialized(generate(fresh, key)), (edit, key)
    assert carry.hits > 0  # not vacuous: something was carried


def test_staged_and_patched_builds_equal_fresh_builds_through_random_edits(tmp_path: Path) -> None:
    """Build stages are skipped or patched (workloads, their index, precedence order) when few
    inputs changed; through a random walk of edits every build equals a fresh one."""
    import random

    from benchmarks import meshgen

    config = meshgen.generate(tmp_path, services=12)
    objects = list(load_dir(config.directory).objects)
    rng = random.Random(7)
    memo = Conversions()
    build_mesh(objects, conversions=memo)

    def workloads(objs: list[ApiObject]) -> list[int]:
        return [i for i, o in enumerate(objs) if o.kind == "WorkloadEntry"]

    for step in range(60):
        choice = rng.choice(["move", "relabel", "add", "remove", "reweigh", "two"])
        objs = list(objects)
        picked = rng.choice(workloads(objs))
        wl = objs[picked]
        if choice in ("move", "two"):
            objs[picked] = _spec(wl, address=f"10.9.{step}.{rng.randrange(1, 250)}")
        if choice in ("relabel", "two"):
            other = objs[rng.choice(workloads(objs))]
            objs[picked] = _spec(objs[picked], labels=dict(other.spec.labels))  # type: ignore[attr-defined]
        if choice == "add":
            meta = wl.metadata.model_copy(update={"name": f"extra-{step}"})
            objs.append(wl.model_copy(update={"metadata": meta}))
        if choice == "remove":
            del objs[picked]
        if choice == "reweigh":
            objs = [e for o in objs if (e := _reweigh(o)) is not None] if step % 7 == 0 else objs
        objects = objs
        fresh = build_mesh(objects)
        assert build_mesh(objects, conversions=memo) == fresh, (step, choice)
    assert memo.hits > 0


def test_an_endpoint_change_reuses_the_scoping_and_routing_stages() -> None:
    memo = Conversions()
    objects = list(load_dir(EXAMPLES[0]).objects)
    before = build_mesh(objects, conversions=memo)
    after = build_mesh([e for o in objects if (e := _move_workload(o)) is not None], conversions=memo)
    assert after.workloads != before.workloads
    assert after.scoping is before.scoping  # not rebuilt: it reads no workload
    assert after.virtual_services is before.virtual_services


def _overlapping_mesh(workloads: list[tuple[str, str, dict[str, str], str]]) -> list[ApiObject]:
    """ServiceEntries whose selectors overlap, share hosts, span namespaces or are empty, over
    `workloads` (namespace, name, labels, address)."""
    from pilot.config.yaml_text import load_text

    entries = [
        ("a", "web", ["web.a", "shared.example"], {"app": "web"}),
        ("a", "web-v1", ["web-v1.a", "shared.example"], {"app": "web", "version": "v1"}),  # loses shared.example
        ("a", "everything", ["all.a"], {}),
        ("b", "web", ["web.b"], {"app": "web"}),
        ("b", "v2", ["v2.b"], {"version": "v2"}),
    ]
    docs = []
    for ns, name, hosts, selector in entries:
        docs.append(f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: {hosts}
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {selector}}}
""")
    for ns, name, labels, address in workloads:
        docs.append(f"""apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}, namespace: {ns}}}
spec: {{address: {address}, labels: {labels}}}
""")
    loaded = load_text("---\n".join(docs))
    assert not loaded.errors, loaded.errors
    return list(loaded.objects)


def test_patched_services_equal_fresh_builds_with_overlapping_selectors_and_shared_hosts() -> None:
    """The services stage looks again only at the entries selecting a moved workload; with selectors
    that overlap, an empty selector, a host two entries define and two namespaces, every build
    through a random walk of workload edits equals a fresh one."""
    import random

    rng = random.Random(11)
    label_choices = [{"app": "web"}, {"app": "web", "version": "v1"}, {"app": "api", "version": "v2"},
                     {"version": "v2"}, {"app": "web", "version": "v2"}, {}]
    workloads = [(rng.choice("ab"), f"w{i}", dict(rng.choice(label_choices)), f"10.0.0.{i + 1}") for i in range(40)]
    memo = Conversions()
    objects = _overlapping_mesh(workloads)
    assert build_mesh(objects, conversions=memo) == build_mesh(objects)
    for step in range(80):
        ns, name, _, _ = rng.choice(workloads)
        wl = next(o for o in objects if o.key == ("WorkloadEntry", ns, name))
        choice = rng.choice(["move", "relabel", "unaddress"])
        if choice == "move":
            edited = _spec(wl, address=f"10.1.{step}.{rng.randrange(1, 250)}")
        elif choice == "relabel":
            edited = _spec(wl, labels=dict(rng.choice(label_choices)))
        else:
            edited = _spec(wl, address="")
        objects = [edited if o is wl else o for o in objects]
        fresh = build_mesh(objects)
        assert build_mesh(objects, conversions=memo) == fresh, (step, choice)
    assert any("shared.example" in w for w in fresh.warnings)  # the host conflict was there throughout


def test_an_endpoint_move_looks_again_only_at_the_entries_selecting_it(tmp_path: Path) -> None:
    """Cost follows change in the build: moving one workload of a 200-service mesh converts the one
    ServiceEntry that selects it, not all 200 (counted in the services stage's own memo)."""
    from benchmarks import meshgen

    config = meshgen.generate(tmp_path, services=200)
    objects = list(load_dir(config.directory).objects)
    memo = Conversions()
    before = build_mesh(objects, conversions=memo)
    stage_memo = memo._stages["services"][0]
    looked = stage_memo.hits + stage_memo.misses
    first = next(i for i, o in enumerate(objects) if o.kind == "WorkloadEntry")
    objects[first] = _spec(objects[first], address="10.250.0.1")
    after = build_mesh(objects, conversions=memo)

    assert memo._stages["services"][0] is stage_memo  # patched, not rebuilt
    assert stage_memo.hits + stage_memo.misses - looked <= 20  # one entry and its few endpoints, not 200 entries
    changed = [h for h in after.services if after.services[h] is not before.services[h]]
    assert len(changed) == 1 and any(e.address == "10.250.0.1" for e in after.services[changed[0]].endpoints)
    assert after == build_mesh(objects)


def test_changed_keys_finds_replaced_values_of_a_patched_copy_and_gives_up_otherwise() -> None:
    before = {f"host-{i}": object() for i in range(16)}
    after = dict(before)
    after["host-3"] = object()
    assert changed_keys(before, after) == ["host-3"]
    assert changed_keys(before, dict(before)) == []
    rekeyed = {"".join(k): v for k, v in before.items()}  # equal keys, other objects: not told apart in C
    assert changed_keys(before, rekeyed) is None
    assert changed_keys(before, dict(reversed(before.items()))) is None
    assert changed_keys(before, {k: object() for k in before}) is None  # more than an eighth


def test_position_is_by_identity() -> None:
    a, b = [1000, 2000], [1000, 2000]  # equal, not the same
    assert position([a, b], b) == 1
    with pytest.raises(ValueError):
        position([a], b)


def test_patched_stages_stay_bounded_under_endless_endpoint_moves(tmp_path: Path) -> None:
    """Patching only adds conversions to a stage's memo; past twice its inputs the stage runs in
    full (`Conversions.has_room`), which starts a new generation: memory stays bounded."""
    from benchmarks import meshgen

    config = meshgen.generate(tmp_path, services=20)
    objects = list(load_dir(config.directory).objects)
    entries = [i for i, o in enumerate(objects) if o.kind == "WorkloadEntry"]
    memo = Conversions()
    build_mesh(objects, conversions=memo)
    stage = memo._stages["workloads"][0]  # the stage's own memo
    sizes = [len(stage)]
    for n in range(6 * len(entries)):
        i = entries[n % len(entries)]
        objects[i] = _spec(objects[i], address=f"10.251.{n // 250}.{n % 250}")
        build_mesh(objects, conversions=memo)
        sizes.append(len(stage))
        assert sizes[-1] <= 2 * len(entries) + 64 + 1
    # Each patch added one conversion; a full run started over from one per entry.
    assert any(b < a for a, b in itertools.pairwise(sizes))
    assert build_mesh(objects, conversions=memo) == build_mesh(objects)


def test_same_objects_is_identity_in_order() -> None:
    a, b = [1000], [1000]  # equal, not the same
    assert same_objects((a, b), [a, b])
    assert not same_objects((a, b), (a, [1000]))
    assert not same_objects((a, b), (b, a))
    assert not same_objects((a,), (a, b))
