"""YAML text to Istio objects: documents split, parsed and limited, one bad document costing only itself.

Limits: 1.5 MiB per document (Kubernetes' object size) and 10,000 entries per list; a document
over the first is named (`identify` reads its kind and name without building it) and skipped.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from pilot.api import ApiError, parse_object
from pilot.api.errors import object_ref
from pilot.config.documents import DocumentError, LoadResult
from pilot.config.merge import Located, merge

# A line that starts a new YAML document: "---", optionally followed by a comment.
_DOC_START = re.compile(r"^---[ \t]*(?:#.*)?$", re.MULTILINE)
# Kubernetes stores an object in one etcd request, limited to 1.5 MiB: the same limit per document.
MAX_DOCUMENT_BYTES = 1_572_864
# Entries in any one list of a document (routes, hosts, matches, ...).
MAX_LIST_ITEMS = 10_000
# A list of MAX_LIST_ITEMS entries takes at least two characters each ("- " or ", ").
_SMALLEST_LONG_LIST = 2 * MAX_LIST_ITEMS
# Parser events `identify` reads at most (a few milliseconds).
_IDENTIFY_EVENTS = 20_000
# libyaml's safe loader when present: the same documents, parsed about 8x faster.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_text(text: str, file: str = "<text>") -> LoadResult:
    """Parse multi-document YAML text; a syntax error costs only the document it is in."""
    located: list[Located] = []
    errors: list[DocumentError] = []
    parse_text(text, file, located, errors)
    return merge([((b"", located, errors, True), ())])



# (file, document index, object, its store key): the key is read once, at parse time; a reload
# of a thousand unchanged files then handles ~9,000 keys without asking each object again.


@dataclass(frozen=True)
class YamlDocument:
    """One document of a multi-document YAML text, decoded, or why it could not be.

    `index` counts documents from 0 in the text; an over-size or invalid part counts as one.
    """

    index: int
    chunk: str  # the text of the `---`-separated part it came from
    value: Any = None  # the decoded document, when there is no problem
    too_large: int = 0  # the part's size in bytes, when over MAX_DOCUMENT_BYTES (not decoded)
    invalid: str = ""  # the YAML error on one line, when the part is not YAML


def documents(text: str) -> Iterator[YamlDocument]:
    """The documents of a YAML text: the one splitter behind pilot's file source and `meshctl analyze`,
    so both count documents, limit their size and report broken YAML alike. A part over the size
    limit is not decoded; a part that is not YAML is one problem and the next part is read."""
    index = 0
    for chunk in _DOC_START.split(text):
        # A character is at most 4 bytes: shorter chunks cannot be over the limit, and are not encoded.
        if len(chunk) * 4 > MAX_DOCUMENT_BYTES and (size := len(chunk.encode("utf-8"))) > MAX_DOCUMENT_BYTES:
            yield YamlDocument(index, chunk, too_large=size)
            index += 1
            continue
        try:
            docs = [d for d in yaml.load_all(chunk, Loader=_LOADER) if d is not None]
        except (yaml.YAMLError, RecursionError, ValueError) as exc:
            if chunk.strip():
                yield YamlDocument(index, chunk, invalid=one_line(exc))
                index += 1
            continue
        for doc in docs:
            yield YamlDocument(index, chunk, doc)
            index += 1


def parse_text(text: str, file: str, located: list[Located], errors: list[DocumentError]) -> None:
    for found in documents(text):
        index = found.index
        if found.too_large:
            kind, namespace, name = identify(found.chunk)
            ref = f"{object_ref(kind, namespace, name)}: " if kind or name else ""
            errors.append(DocumentError(file, index, kind, namespace, name, (
                f"{ref}document is {found.too_large / 2**20:.1f} MiB, over the 1.5 MiB limit of a Kubernetes "
                "object (etcd's request size); split it into smaller objects")))
        elif found.invalid:
            errors.append(DocumentError(file, index, None, None, None, f"invalid YAML: {found.invalid}"))
        else:
            try:
                if len(found.chunk) > _SMALLEST_LONG_LIST:
                    _check_counts(found.value)
                obj = parse_object(found.value)
                located.append((file, index, obj, obj.key))
            except ApiError as exc:
                errors.append(DocumentError(file, index, exc.kind, exc.namespace, exc.name, str(exc)))
            except RecursionError:
                errors.append(DocumentError(file, index, None, None, None, "document is nested too deeply"))


def identify(text: str) -> tuple[str | None, str | None, str | None]:
    """(kind, namespace, name) of a YAML document without building it: its parser events are read
    until ``kind`` and ``metadata`` are seen (they come first in practice), so a 20 MB document
    costs microseconds here, not the seconds and gigabytes a full load would. At most
    `_IDENTIFY_EVENTS` events are read: past them, what was not seen stays None."""
    kind: str | None = None
    meta: dict[str, str] = {}
    # Open collections: [is a mapping, its current key, a key comes next].
    stack: list[list[Any]] = []
    try:
        for event in itertools.islice(yaml.parse(text, Loader=_LOADER), _IDENTIFY_EVENTS):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                is_map = isinstance(event, yaml.MappingStartEvent)
                stack.append([is_map, None, is_map])
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                stack.pop()
                if len(stack) == 1 and stack[0][1] == "metadata" and kind is not None:
                    break
                _value_done(stack)
            elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)) and stack:
                top = stack[-1]
                if top[2]:
                    top[1], top[2] = getattr(event, "value", None), False
                    continue
                value = getattr(event, "value", None)
                if not isinstance(value, str):
                    pass
                elif len(stack) == 1 and top[1] == "kind":
                    kind = value
                    if "name" in meta:
                        break
                elif len(stack) == 2 and stack[0][1] == "metadata" and top[0] and top[1] in ("name", "namespace"):
                    meta[top[1]] = value
                _value_done(stack)
    except yaml.YAMLError:
        pass
    name = meta.get("name")
    return kind, (meta.get("namespace", "default") if name else None), name


def _value_done(stack: list[list[Any]]) -> None:
    if stack and stack[-1][0]:
        stack[-1][2] = True


def _check_counts(doc: object) -> None:
    """Refuse a document holding a list longer than `MAX_LIST_ITEMS`, naming the field."""
    stack: list[tuple[object, str]] = [(doc, "")]
    seen: set[int] = set()  # YAML aliases share a node: each is walked once
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict | list):
            if id(node) in seen:
                continue
            seen.add(id(node))
        if isinstance(node, dict):
            stack += [(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()]
        elif isinstance(node, list):
            if len(node) > MAX_LIST_ITEMS:
                kind, namespace, name = _identity(doc)
                raise ApiError(f"{where}: {len(node):,} entries, over the limit of {MAX_LIST_ITEMS:,} per list",
                               kind=kind, namespace=namespace, name=name)
            stack += [(v, f"{where}[{i}]") for i, v in enumerate(node)]


def _identity(doc: object) -> tuple[str | None, str | None, str | None]:
    if not isinstance(doc, dict):
        return None, None, None
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    kind, name, namespace = doc.get("kind"), meta.get("name"), meta.get("namespace", "default")
    return (kind if isinstance(kind, str) else None, namespace if isinstance(namespace, str) else None,
            name if isinstance(name, str) else None)


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, for log lines and document errors."""
    return " ".join(str(exc).split())

