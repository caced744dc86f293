"""The CRDs' structural OpenAPI schemas, generated from the API models (pilot/api/crd_schema.py).

`manifests/crds.yaml` is the committed render; regenerate with `pytest --update-goldens`.
The API server's own verdict on these schemas is tests/k8s/test_install.py; here, a small
type checker (the subset of OpenAPI the schemas use) runs every example against them in
milliseconds, so a model change that the schema no longer matches fails fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from meshctl.crds import crds
from meshctl.render import to_yaml
from pilot.api.base import IstioModel
from pilot.api.crd_schema import CrdSchemaError, crd_schema
from pilot.api.parse import KINDS, parse_object
from pilot.api.security_kinds import SECURITY_KINDS

ROOT = Path(__file__).resolve().parents[2]
CRDS_YAML = ROOT / "manifests" / "crds.yaml"
COMBINATORS = ("anyOf", "oneOf", "allOf", "not", "$ref", "$defs", "title", "default", "const")


def example_documents() -> list[tuple[str, dict[str, Any]]]:
    """Every mesh object in examples/ and in the golden cases (which hold the security kinds)."""
    files = sorted(ROOT.glob("examples/*/*.yaml")) + sorted(ROOT.glob("tests/golden/cases/*/input.yaml"))
    out = []
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and ".istio.io/" in str(doc.get("apiVersion", "")):
                out.append((f"{path.relative_to(ROOT)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return out


def _nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for key, child in schema.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _nodes(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _nodes(schema["additionalProperties"], f"{path}.*")


def type_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Where `value` breaks `schema`'s types, enums, bounds or required fields (unknown fields: pruned)."""
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, int | str) and not isinstance(value, bool)
        return [] if ok else [f"{path}: not int-or-string"]
    kind = schema.get("type")
    if kind is None:
        return []
    checks = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": int | float}
    if not isinstance(value, checks[kind]) or (kind in ("integer", "number") and isinstance(value, bool)):
        return [f"{path}: {value!r} is not {kind}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if ("minimum" in schema and value < schema["minimum"]) or ("maximum" in schema and value > schema["maximum"]):
        errors.append(f"{path}: {value!r} out of bounds")
    if kind == "array":
        assert isinstance(value, list)
        for i, item in enumerate(value):
            errors += type_errors(item, schema["items"], f"{path}[{i}]")
    if kind == "object":
        assert isinstance(value, dict)
        errors += [f"{path}.{k}: required" for k in schema.get("required", ()) if k not in value]
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                errors += type_errors(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                errors += type_errors(item, extra, f"{path}.{key}")
    return errors


def test_crds_yaml_is_the_current_render(update_goldens: bool) -> None:
    text = to_yaml(crds())
    if update_goldens:
        CRDS_YAML.write_text(text)
    assert CRDS_YAML.read_text() == text, "manifests/crds.yaml is stale: run pytest --update-goldens"


@pytest.mark.parametrize("kind", sorted({**KINDS, **SECURITY_KINDS}))
def test_every_node_is_structural(kind: str) -> None:
    schema = crd_schema({**KINDS, **SECURITY_KINDS}[kind])
    for path, node in _nodes(schema):
        assert not set(node) & set(COMBINATORS), f"{kind}{path}: {sorted(set(node) & set(COMBINATORS))}"
        typed = "type" in node or node.get("x-kubernetes-preserve-unknown-fields") or node.get(
            "x-kubernetes-int-or-string")
        assert typed, f"{kind}{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), f"{kind}{path}"
    assert schema["properties"]["status"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def test_every_kind_has_a_crd_with_every_version_served_and_v1_stored() -> None:
    by_kind = {c["spec"]["names"]["kind"]: c for c in crds()}
    assert set(by_kind) == set(KINDS) | set(SECURITY_KINDS)
    vs = by_kind["VirtualService"]
    assert vs["metadata"]["name"] == "virtualservices.networking.istio.io"
    assert vs["spec"]["names"]["shortNames"] == ["vs"]
    assert vs["spec"]["names"]["categories"] == ["istio-io", "networking-istio-io"]
    assert [(v["name"], v["storage"]) for v in vs["spec"]["versions"]] == [
        ("v1", True), ("v1alpha3", False), ("v1beta1", False)]
    assert [c["name"] for c in vs["spec"]["versions"][0]["additionalPrinterColumns"]] == ["Gateways", "Hosts", "Age"]
    pa = by_kind["PeerAuthentication"]
    assert [v["name"] for v in pa["spec"]["versions"]] == ["v1", "v1beta1"]
    assert pa["spec"]["versions"][0]["additionalPrinterColumns"][0]["jsonPath"] == ".spec.mtls.mode"
    for crd in by_kind.values():
        assert all(v["served"] and v["subresources"] == {"status": {}} for v in crd["spec"]["versions"])


def test_enums_and_durations() -> None:
    spec = crd_schema(KINDS["ServiceEntry"])["properties"]["spec"]["properties"]
    assert spec["resolution"] == {"type": "string", "enum": ["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"]}
    route = crd_schema(KINDS["VirtualService"])["properties"]["spec"]["properties"]["http"]["items"]
    assert route["properties"]["timeout"] == {"type": "string"}  # a duration: the models judge its grammar


def test_examples_fit_the_schemas() -> None:
    docs = example_documents()
    assert len(docs) > 80  # examples and golden cases, security kinds included
    kinds = {d["kind"] for _, d in docs}
    assert {"VirtualService", "AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication"} <= kinds
    schemas = {k: crd_schema(m) for k, m in {**KINDS, **SECURITY_KINDS}.items()}
    for where, doc in docs:
        parse_object(doc)  # the models accept it ...
        assert type_errors(doc, schemas[doc["kind"]]) == [], where  # ... and so does its CRD schema


def test_a_wrongly_typed_field_breaks_the_schema() -> None:
    schema = crd_schema(KINDS["VirtualService"])
    bad = {"spec": {"hosts": "reviews", "http": [{"route": [{"destination": {"host": "r"}, "weight": "50"}]}]}}
    assert type_errors(bad, schema) == [".spec.hosts: 'reviews' is not array",
                                        ".spec.http[0].route[0].weight: '50' is not integer"]


class _Leaf(IstioModel):
    name: str


class _Tree(IstioModel):
    child: _Tree | None = None


class _Other(IstioModel):
    child: str | None = None


class _Bad(IstioModel):
    value: list[str] | _Leaf


def _wrap(spec: type[BaseModel]) -> type[BaseModel]:
    return type("Kind", (IstioModel,), {"__annotations__": {"spec": spec}})


def test_a_union_without_a_structural_form_names_the_field() -> None:
    with pytest.raises(CrdSchemaError, match=r"Kind\.spec\.value: a union of array, object"):
        crd_schema(_wrap(_Bad))


def test_a_recursive_model_names_the_field() -> None:
    with pytest.raises(CrdSchemaError, match=r"Kind\.spec\.child: model _Tree contains itself"):
        crd_schema(_wrap(_Tree))


def test_int_or_string_and_merged_objects() -> None:
    class Either(IstioModel):
        port: int | str
        target: _Leaf | _Other | None = None

    spec = crd_schema(_wrap(Either))["properties"]["spec"]
    assert spec["properties"]["port"] == {"x-kubernetes-int-or-string": True}
    assert spec["required"] == ["port"]
    assert set(spec["properties"]["target"]["properties"]) == {"name", "child"}
    assert "required" not in spec["properties"]["target"]  # `name` is required by one branch only
