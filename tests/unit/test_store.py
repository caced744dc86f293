"""ConfigStore: revisions, sources, change notification and the debug view."""

from __future__ import annotations

import asyncio

import pytest

from pilot.api import ApiObject, parse_object
from pilot.config import ConfigStore, DocumentError


def we(name: str, address: str = "127.0.0.5", namespace: str = "default") -> ApiObject:
    return parse_object(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadEntry",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"address": address, "bogus": 1},
        }
    )


def test_apply_get_delete_and_revisions() -> None:
    store = ConfigStore()
    assert store.revision == 0
    assert store.apply(we("a")) is True
    assert store.revision == 1
    assert store.get("WorkloadEntry", "default", "a") == we("a")
    assert store.apply(we("a")) is False, "identical content is not a change"
    assert store.revision == 1
    assert store.apply(we("a", "127.0.0.6")) is True
    assert store.revision == 2
    assert store.delete("WorkloadEntry", "default", "a") is True
    assert store.delete("WorkloadEntry", "default", "a") is False
    assert store.revision == 3
    assert store.objects() == []


def test_replace_source_adds_changes_and_removes() -> None:
    store = ConfigStore()
    store.replace_source("files", [we("a"), we("b")])
    assert [o.metadata.name for o in store.objects()] == ["a", "b"]
    rev = store.revision
    assert store.replace_source("files", [we("b"), we("a")]) is False
    assert store.revision == rev
    assert store.replace_source("files", [we("b", "127.0.0.9")]) is True
    assert store.revision == rev + 1, "one replace is one revision, however many objects changed"
    assert [o.metadata.name for o in store.objects()] == ["b"]


def test_objects_follow_edits_additions_and_removals_in_key_order() -> None:
    """The sorted list is kept while no key comes or goes and edited in place: every read equals
    the effective objects in key order."""
    store = ConfigStore()
    objs = {name: we(name) for name in "dbca"}
    store.replace_source("files", list(objs.values()))
    assert [o.metadata.name for o in store.objects()] == ["a", "b", "c", "d"]
    edited = we("c", "127.0.0.7")
    store.replace_source("files", {**{o.key: o for o in objs.values()}, edited.key: edited}, changed=[edited.key])
    assert store.objects()[2] is edited
    store.apply(we("bb"), source_id="api")
    store.apply(we("a", "127.0.0.8"), source_id="api")  # "api" < "files": it wins key a
    assert [(o.metadata.name, o.spec.address) for o in store.objects()] == [  # type: ignore[attr-defined]
        ("a", "127.0.0.8"), ("b", "127.0.0.5"), ("bb", "127.0.0.5"), ("c", "127.0.0.7"), ("d", "127.0.0.5")]
    store.delete("WorkloadEntry", "default", "a", source_id="api")
    store.delete("WorkloadEntry", "default", "bb", source_id="api")
    assert [o.spec.address for o in store.objects()] == ["127.0.0.5", "127.0.0.5", "127.0.0.7", "127.0.0.5"]  # type: ignore[attr-defined]
    assert store.objects("WorkloadEntry")[2] is edited


def test_a_source_naming_its_changed_keys_is_compared_on_those_only() -> None:
    store = ConfigStore()
    a, b = we("a"), we("b")
    store.replace_source("files", [a, b])
    rev = store.revision
    b2 = we("b", "127.0.0.9")
    assert store.replace_source("files", {a.key: a, b.key: b2}, changed=[b.key]) is True
    assert store.revision == rev + 1 and store.get(*b.key) is b2
    assert store.replace_source("files", {a.key: a, b.key: b2}, changed=[]) is False


def test_conflicting_sources_resolve_deterministically_and_show_on_debug_page() -> None:
    store = ConfigStore()
    store.replace_source("b-source", [we("a", "127.0.0.2")])
    store.replace_source("a-source", [we("a", "127.0.0.1")])
    obj = store.get("WorkloadEntry", "default", "a")
    assert obj is not None and obj.to_dict()["spec"]["address"] == "127.0.0.1"
    dump = store.debug_dump()
    assert dump["shadowed"] == [
        {"source": "b-source", "kind": "WorkloadEntry", "namespace": "default", "name": "a", "winner": "a-source"}
    ]
    store.replace_source("a-source", [])
    obj = store.get("WorkloadEntry", "default", "a")
    assert obj is not None and obj.to_dict()["spec"]["address"] == "127.0.0.2"


def test_debug_dump_has_objects_warnings_and_rejections() -> None:
    store = ConfigStore()
    error = DocumentError("mesh.yaml", 2, "ServiceEntry", "default", "bad", "ServiceEntry default/bad: spec.hosts: x")
    store.replace_source("files", [we("a")], [error])
    dump = store.debug_dump()
    assert dump["revision"] == 1
    (entry,) = dump["objects"]
    assert entry["source"] == "files"
    assert entry["warnings"] == ["spec.bogus: unknown field, ignored"]
    assert entry["object"]["spec"]["address"] == "127.0.0.5"
    assert dump["rejected"] == [{"source": "files", **error.to_dict(), "serving_previous_version": False}]


async def test_wait_for_change_wakes_on_change_only() -> None:
    store = ConfigStore()
    waiter = asyncio.create_task(store.wait_for_change(0))
    await asyncio.sleep(0)
    assert not waiter.done()
    store.apply(we("a"))
    assert await asyncio.wait_for(waiter, 1) == 1
    # Already past the revision: returns at once.
    assert await asyncio.wait_for(store.wait_for_change(0), 1) == 1
    waiter = asyncio.create_task(store.wait_for_change(1))
    store.apply(we("a"))  # no change
    await asyncio.sleep(0.01)
    assert not waiter.done()
    store.delete("WorkloadEntry", "default", "a")
    assert await asyncio.wait_for(waiter, 1) == 2


async def test_many_waiters_all_wake() -> None:
    store = ConfigStore()
    waiters = [asyncio.create_task(store.wait_for_change(0)) for _ in range(5)]
    await asyncio.sleep(0)
    store.apply(we("a"))
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [1] * 5


@pytest.mark.parametrize("kind", ["WorkloadEntry", "ServiceEntry"])
def test_objects_filters_by_kind(kind: str) -> None:
    store = ConfigStore()
    store.apply(we("a"))
    assert len(store.objects(kind)) == (1 if kind == "WorkloadEntry" else 0)


async def test_touch_wakes_waiters_without_changing_objects() -> None:
    store = ConfigStore()
    store.apply(we("a"))
    waiter = asyncio.create_task(store.wait_for_change(1))
    await asyncio.sleep(0)
    assert store.touch() == 2
    assert await asyncio.wait_for(waiter, 1) == 2
    assert [o.metadata.name for o in store.objects()] == ["a"]


def test_objects_of_a_kind_whose_name_begins_another_kind_are_exactly_its_own() -> None:
    """One kind's objects are one run of the sorted list ("Service" sorts right before "ServiceEntry"
    and "ServiceEndpoints"), sliced out by bisection: each kind gets all of its own and nothing else."""
    from pilot.kube.registry import KubeService

    store = ConfigStore()
    spec = {"hosts": ["a.example"], "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}]}
    entry = {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "spec": spec}
    for ns in ("a", "b"):
        meta = {"name": "s", "namespace": ns}
        store.apply(parse_object({**entry, "metadata": meta}))
        store.apply(KubeService.model_validate({**entry, "kind": "Service", "metadata": meta}))
        store.apply(we("w", namespace=ns))
    every = store.objects()
    for kind in ("Service", "ServiceEntry", "WorkloadEntry", "Gateway", "Serv", "A", "Z"):
        assert store.objects(kind) == [o for o in every if o.kind == kind], kind
    assert [o.metadata.namespace for o in store.objects("Service")] == ["a", "b"]
