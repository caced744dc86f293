"""Structural OpenAPI v3 schemas for the mesh CRDs, generated from the pydantic API models.

Kubernetes stores a custom resource only if its CRD schema is *structural*: every node typed
(or explicitly ``x-kubernetes-preserve-unknown-fields`` / ``x-kubernetes-int-or-string``), no
``$ref``, no ``type`` inside ``anyOf``/``oneOf``, never ``properties`` beside
``additionalProperties``. Pydantic's ``model_json_schema()`` breaks all of those rules, so this
module rewrites it: ``$ref`` inlined, ``X | None`` reduced to ``X`` (Kubernetes prunes nulls of
non-nullable fields, which is what "not set" means here), unions of one type merged, ``int | str``
made int-or-string, ``Any`` kept verbatim (preserve-unknown-fields), enums and bounds kept,
durations plain strings (the models parse them; Go's and Python's duration grammars differ at
the edges, so the schema does not judge them). Titles, defaults and descriptions are dropped:
defaults are the pipeline's business (a stored default would freeze today's default into
etcd), and the docstrings are written for Python readers.

The models accept unknown fields with a warning; the CRDs do not preserve them (the API server
prunes them, and ``kubectl apply`` reports them), as Istio's CRDs do.

Pure functions of the model classes; generating every kind costs a few milliseconds.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

JsonSchema = dict[str, Any]
_PRESERVE = "x-kubernetes-preserve-unknown-fields"
_SCALARS = ("string", "integer", "number", "boolean")
# Keywords a structural schema may carry over from pydantic's output, per node.
_KEPT = ("enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength",
         "minItems", "maxItems", "required")
_FORMATS = frozenset({"int32", "int64", "float", "double"})  # formats the API server and the models agree on


class CrdSchemaError(ValueError):
    """A model field that has no structural OpenAPI form; the message names the model and field path."""


def crd_schema(model: type[BaseModel]) -> JsonSchema:
    """The ``openAPIV3Schema`` of a kind: its ``spec`` as the model types it, ``status`` kept as written.

    Raises ``CrdSchemaError`` naming the field when a model uses a type Kubernetes cannot
    express structurally (a union of an object and a list, a recursive model).
    """
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs: Mapping[str, JsonSchema] = raw.get("$defs", {})
    where = model.__name__
    spec = _convert(raw["properties"]["spec"], defs, f"{where}.spec", ())
    schema: JsonSchema = {
        "type": "object",
        "properties": {"spec": spec, "status": {"type": "object", _PRESERVE: True}},
    }
    if "spec" in raw.get("required", ()):
        schema["required"] = ["spec"]
    return schema


def _convert(node: JsonSchema, defs: Mapping[str, JsonSchema], path: str, seen: tuple[str, ...]) -> JsonSchema:
    """One node of pydantic's schema as a structural node (recursively)."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            raise CrdSchemaError(f"{path}: model {name} contains itself; a CRD schema cannot recurse")
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return _convert({**defs[name], **rest}, defs, path, (*seen, name))
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in node:
            branches = [b for b in node[combinator] if b.get("type") != "null"]
            converted = [_convert(b, defs, path, seen) for b in branches]
            return _merge(converted, path, all_required=combinator == "allOf")
    if "const" in node:
        node = {**node, "enum": [node["const"]]}
    kind = node.get("type")
    if kind is None:  # `Any`: kept as written, like Istio's google.protobuf.Struct fields
        return {_PRESERVE: True}
    out: JsonSchema = {"type": kind}
    out.update({k: copy.deepcopy(node[k]) for k in _KEPT if k in node})  # never share lists between nodes
    if node.get("format") in _FORMATS:
        out["format"] = node["format"]
    if kind == "array":
        out["items"] = _convert(node.get("items", {}), defs, f"{path}[]", seen)
    elif kind == "object":
        out.update(_object_members(node, defs, path, seen))
    elif kind not in _SCALARS:
        raise CrdSchemaError(f"{path}: type {kind!r} has no OpenAPI v3 form")
    return out


def _object_members(node: JsonSchema, defs: Mapping[str, JsonSchema], path: str,
                    seen: tuple[str, ...]) -> JsonSchema:
    """``properties`` (a model), ``additionalProperties`` (a map) or preserve-unknown (``dict[str, Any]``)."""
    props = node.get("properties")
    extra = node.get("additionalProperties")
    if props:  # a model: unknown keys are pruned by the API server, never preserved
        return {"properties": {k: _convert(v, defs, f"{path}.{k}", seen) for k, v in props.items()}}
    if isinstance(extra, dict) and extra:
        return {"additionalProperties": _convert(extra, defs, f"{path}.*", seen)}
    return {_PRESERVE: True}


def _merge(branches: list[JsonSchema], path: str, *, all_required: bool) -> JsonSchema:
    """One structural node standing for a union (or intersection) of converted branches."""
    if not branches:
        return {_PRESERVE: True}
    if len(branches) == 1:
        return branches[0]
    if any(_PRESERVE in b and "type" not in b for b in branches):
        return {_PRESERVE: True}
    kinds = {b.get("type") for b in branches}
    if kinds == {"integer", "string"}:  # e.g. a port given as a number or a name
        return {"x-kubernetes-int-or-string": True}
    if len(kinds) != 1:
        shown = ", ".join(sorted(str(k) for k in kinds))
        raise CrdSchemaError(f"{path}: a union of {shown} has no structural OpenAPI form")
    kind = kinds.pop()
    if kind == "object":
        return _merge_objects(branches, path, all_required=all_required)
    if kind == "array":
        return {"type": "array", "items": _merge([b["items"] for b in branches], f"{path}[]",
                                                 all_required=all_required)}
    out: JsonSchema = {"type": kind}
    enums = [b.get("enum") for b in branches]
    if all(e is not None for e in enums):
        out["enum"] = sorted({v for e in enums for v in e or ()}, key=str)
    return out


def _merge_objects(branches: list[JsonSchema], path: str, *, all_required: bool) -> JsonSchema:
    """Objects of a union: every property any branch names (each merged), required only if all require it."""
    props: dict[str, list[JsonSchema]] = {}
    for branch in branches:
        for key, value in branch.get("properties", {}).items():
            props.setdefault(key, []).append(value)
    if not props:
        values = [b["additionalProperties"] for b in branches if "additionalProperties" in b]
        if len(values) == len(branches):
            return {"type": "object",
                    "additionalProperties": _merge(values, f"{path}.*", all_required=all_required)}
        return {"type": "object", _PRESERVE: True}
    out: JsonSchema = {"type": "object", "properties": {
        k: _merge(v, f"{path}.{k}", all_required=all_required) for k, v in props.items()}}
    required = [set(b.get("required", ())) for b in branches]
    common = set.union(*required) if all_required else set.intersection(*required)
    if common:
        out["required"] = sorted(common)
    return out
