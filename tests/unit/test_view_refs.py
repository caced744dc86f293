"""Views answer "are all my references subscribed" per shared part, once per subscription."""

from __future__ import annotations

import pytest

from pilot.xds.resources import Resource, ResourceSet, View
from pilot.xds.typeurls import CLUSTER


def _clusters(*pairs: tuple[str, str]) -> ResourceSet:
    return ResourceSet(CLUSTER, [Resource(CLUSTER, name, "v1", name.encode(), (eds,)) for name, eds in pairs])


def test_refs_within_matches_the_subset_test_and_is_shared_between_views(monkeypatch: pytest.MonkeyPatch) -> None:
    shared = _clusters(("a", "eds-a"), ("b", "eds-b"))
    mine, theirs = View((shared, _clusters(("c", "eds-c")))), View((shared, _clusters()))
    some, every = frozenset({"eds-a", "eds-b"}), frozenset({"eds-a", "eds-b", "eds-c"})
    for view in (mine, theirs):
        for names in (some, every, frozenset()):
            assert view.refs_within(names) == (view.refs() <= names), (view.refs(), names)

    calls = 0
    real = ResourceSet.refs

    def counting(self: ResourceSet) -> frozenset[str]:
        nonlocal calls
        calls += self is shared
        return real(self)

    monkeypatch.setattr(ResourceSet, "refs", counting)
    fresh = frozenset(set(every))  # a new subscription object: asked once, then remembered
    assert mine.refs_within(fresh) and theirs.refs_within(fresh)
    assert calls == 1
