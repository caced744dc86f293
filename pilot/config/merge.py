"""Merging per-file parses into one directory's content (`merge`), and patching that merge when
files were only rewritten in place (`Merged.patched`), for the file source.

Cost: a full merge visits every object of every file (~9,000 at 1,000 services); a patch visits
the rewritten files' objects and copies one dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pilot.api import ApiObject
from pilot.config.documents import DocumentError, LoadResult

# One parsed document: (file, index in the file, the object, its store key).
Located = tuple[str, int, ApiObject, tuple[str, str, str]]
# One file's parse: (content digest, its parsed objects, its errors, whether its last line is complete).
ParseEntry = tuple[bytes, list[Located], list[DocumentError], bool]

# A part of the directory's content: a file's parse entry and objects carried over from an earlier
# version of that file (kept while their removal waits, or while the file does not parse).
Part = tuple[ParseEntry, Sequence[Located]]


def merge(parts: Iterable[Part], problems: Iterable[DocumentError] = ()) -> LoadResult:
    """One LoadResult from per-file parts, in file order.

    An object defined twice keeps its first definition and the second is reported; an object
    carried over from an earlier version of a file yields, silently, to any current definition.
    """
    return Merged.of(parts, problems).result


@dataclass(frozen=True)
class Merged:
    """A merge's result, and what lets the next one patch it instead of merging every file again."""

    result: LoadResult
    contested: frozenset[tuple[str, str, str]]  # keys defined more than once, or carried

    @staticmethod
    def of(parts: Iterable[Part], problems: Iterable[DocumentError] = ()) -> Merged:
        first: dict[tuple[str, str, str], tuple[str, int]] = {}
        kept: dict[tuple[str, str, str], ApiObject] = {}
        errors: list[DocumentError] = []
        carried: list[Located] = []
        contested: set[tuple[str, str, str]] = set()
        for (_, located, file_errors, _), carry in parts:
            errors += file_errors
            carried += carry
            for file, index, obj, key in located:
                if key in first:
                    where = "{}[{}]".format(*first[key])
                    kind, namespace, name = key
                    message = f"{obj.ref}: already defined at {where}"
                    errors.append(DocumentError(file, index, kind, namespace, name, message))
                    contested.add(key)
                    continue
                first[key] = (file, index)
                kept[key] = obj
        for _, _, obj, key in carried:
            kept.setdefault(key, obj)
            contested.add(key)
        errors += problems
        return Merged(LoadResult(tuple(kept.values()), tuple(errors), keyed=kept), frozenset(contested))

    def patched(self, edits: Iterable[tuple[Part, Part]]) -> tuple[Merged, list[tuple[str, str, str]]] | None:
        """This merge after files were rewritten in place, and the keys whose object changed; None
        unless every edit is a clean parse (no errors, nothing carried) defining the same keys, in
        the same order, as before, none of them defined elsewhere: then no error can appear or go,
        and each key keeps its place. The usual edit (an object's spec) then costs its own objects,
        not a merge of every file."""
        kept = dict(self.result.keyed or {})
        changed: list[tuple[str, str, str]] = []
        for (before, before_carried), (after, after_carried) in edits:
            if before_carried or after_carried or before[2] or after[2] or len(before[1]) != len(after[1]):
                return None
            for old, new in zip(before[1], after[1], strict=True):
                key = new[3]
                if old[3] != key or key in self.contested or kept.get(key) is not old[2]:
                    return None
                if new[2] is not old[2]:
                    kept[key] = new[2]
                    changed.append(key)
        result = LoadResult(tuple(kept.values()), self.result.errors, keyed=kept)
        return Merged(result, self.contested), changed
