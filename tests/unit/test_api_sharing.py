"""Parsed models share what they repeat (`IstioModel.model_post_init`), without changing what they say."""

from __future__ import annotations

from pilot.api import WorkloadEntry, parse_object
from pilot.config import load_text


def _entry(name: str, extra: str = "") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        f"metadata: {{name: {name}, namespace: shop}}\n"
        f"spec: {{address: 127.0.0.9, labels: {{app: cart, version: v1}}, ports: {{http: 8080}}{extra}}}\n"
    )


def _two(extra: str = "") -> tuple[WorkloadEntry, WorkloadEntry]:
    # Two separate texts: the YAML parser makes every string anew for each.
    (a,) = load_text(_entry("a", extra)).objects
    (b,) = load_text(_entry("b", extra)).objects
    assert isinstance(a, WorkloadEntry) and isinstance(b, WorkloadEntry)
    return a, b


def test_repeated_strings_are_one_object_across_parsed_models() -> None:
    a, b = _two()
    assert a.api_version is b.api_version
    assert a.metadata.namespace is b.metadata.namespace
    (ka, va), (kb, vb) = sorted(a.spec.labels.items())[0], sorted(b.spec.labels.items())[0]
    assert (ka, va) == (kb, vb) == ("app", "cart")
    assert ka is kb and va is vb
    assert next(iter(a.spec.ports)) is next(iter(b.spec.ports))
    assert a.metadata.name == "a" and b.metadata.name == "b"


def test_models_given_the_same_fields_share_one_field_set_and_no_empty_extras() -> None:
    a, b = _two()
    assert a.metadata.model_fields_set == {"name", "namespace"}
    assert a.metadata.__pydantic_fields_set__ is b.metadata.__pydantic_fields_set__
    assert a.spec.__pydantic_fields_set__ is b.spec.__pydantic_fields_set__
    assert a.model_extra is None and a.spec.model_extra is None
    assert a.model_dump() == b.model_dump() | {"metadata": a.metadata.model_dump()}


def test_a_copy_with_changes_leaves_the_shared_field_set_alone() -> None:
    a, b = _two()
    shared = set(b.metadata.model_fields_set)
    changed = a.metadata.model_copy(update={"labels": {"team": "x"}})
    assert "labels" in changed.model_fields_set
    assert b.metadata.model_fields_set == a.metadata.model_fields_set == shared
    # The exclude_unset dump reads the field set: still only what each document gave.
    assert b.metadata.model_dump(exclude_unset=True) == {"name": "b", "namespace": "shop"}
    assert a.content() == b.content().model_copy(update={"metadata": a.content().metadata})


def test_unknown_keys_keep_their_own_extras_and_still_warn() -> None:
    a, b = _two(extra=", colour: blue")
    assert a.spec.model_extra == {"colour": "blue"}
    assert a.spec.model_extra is not b.spec.model_extra
    assert [(w.path, w.message) for w in a.warnings] == [("spec.colour", "unknown field, ignored")]
    again = parse_object(a.to_dict())
    assert again == a and again.spec.model_extra == {"colour": "blue"}
