"""Per-object conversions carried from one `build_mesh` to the next.

Why: a push usually changes a few objects out of thousands, and the store hands unchanged
objects over as the very same (frozen) instances. Converting each API object into its model
form once, and reusing the result while the object is the same instance, makes a rebuild
cost roughly what changed plus indexing. The result of `build_mesh` is the same with or
without this memo (tests check both); it only saves work. Memory stays bounded: only the
entries used by the latest build are kept.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Mapping, Sequence
from itertools import compress, count, repeat
from typing import Any, TypeVar

R = TypeVar("R")


Key = Hashable


def same_objects(before: Sequence[Any], after: Sequence[Any]) -> bool:
    """Whether both hold the very same objects in the same order (identity, compared in C): what
    tells a build stage its inputs did not change."""
    return len(before) == len(after) and not any(map(operator.is_not, before, after))


def changed_positions(before: Sequence[Any], after: Sequence[Any]) -> list[int] | None:
    """Positions where `after` holds another object than `before` (identity, compared in C): what
    a patched stage redoes. None when the lengths differ or more than an eighth of them changed
    (a full pass is then about as cheap)."""
    if len(before) != len(after):
        return None
    changed = list(compress(count(), map(operator.is_not, before, after)))
    return changed if len(changed) <= max(len(after) // 8, 1) else None


def changed_keys(before: Mapping[Any, Any], after: Mapping[Any, Any]) -> list[Any] | None:
    """Keys whose value in `after` is another object than in `before`, when both hold the very same
    key objects in the same order (a dict copied and patched, as the build's stages make them);
    None otherwise, or when more than an eighth changed (`changed_positions`).

    Why: the build compares its maps of ~1,000 services and ~2,000 workloads with the last build's
    on every endpoint change; a Python loop over them was ~0.5 ms each, this compares in C.
    """
    keys = tuple(after)
    if not same_objects(tuple(before), keys):
        return None
    changed = changed_positions(tuple(before.values()), tuple(after.values()))
    return None if changed is None else [keys[i] for i in changed]


def position(items: Sequence[Any], obj: Any) -> int:
    """Where `obj` itself (identity, not equality) is in `items`, searched in C; ValueError if absent."""
    for found in compress(count(), map(operator.is_, items, repeat(obj))):
        return found
    raise ValueError("not in the sequence")


class Conversions:
    """(conversion, object identity, other arguments) -> result, for the current and last build."""

    def __init__(self) -> None:
        self._last: dict[Key, tuple[Any, Any]] = {}
        self._current: dict[Key, tuple[Any, Any]] = {}
        self.hits = 0
        self.misses = 0
        self._complete_size = 0  # entries a complete generation used, last time
        # Build stages (`stage`): tag -> (its own memo, (inputs, args, result) of its last run)
        self._stages: dict[Hashable, tuple[Conversions, tuple[tuple[Any, ...], tuple[Hashable, ...], Any] | None]] = {}

    def __len__(self) -> int:
        """Entries held, the stages' own memos included."""
        return len(self._current.keys() | self._last.keys()) + sum(len(memo) for memo, _ in self._stages.values())

    def next_build(self) -> None:
        """Start a build: what the previous build used stays available, anything older goes."""
        if self._current:
            self._last, self._current = self._current, {}

    def end_build(self) -> None:
        """End a build: what it did not use goes now, rather than at the next build.

        `next_build` keeps the previous build's entries only so that this build can reuse them;
        once it is done, those it left are objects no longer in the config. Dropping them at once
        is what lets memory return to its baseline after a large config is removed (else they
        stay until the next build, or, in a stage whose inputs do not change again, for good).
        """
        self._last = {}

    def advance(self, complete: bool) -> None:
        """End a generation. `complete`: everything still needed was asked for since the last one
        (a full push), so what was not can go. A partial one (the EDS fast path asks for endpoints
        only) keeps everything, unless what it added has grown past twice a complete generation:
        memory stays bounded under endless endpoint churn, at the price of a full rebuild then."""
        if complete:
            self._complete_size = len(self._current)
            self.next_build()
        elif len(self._current) > 2 * max(self._complete_size, 1024):
            self.next_build()

    def forget(self, drop: Callable[[Key, Any], bool]) -> None:
        """Drop from both generations the entries `drop(key, result)` picks: results the caller
        knows no longer serve (a partial `advance` keeps everything else)."""
        for generation in (self._current, self._last):
            for key in [k for k, (_, value) in generation.items() if drop(k, value)]:
                del generation[key]

    def of(self, convert: Callable[..., R], obj: Any, *args: Hashable) -> R:
        """`convert(obj, *args)`, or its result from an earlier call with this very `obj` and equal `args`."""
        key = (convert, id(obj), args)
        found = self._current.get(key) or self._last.get(key)
        if found is not None and found[0] is obj:  # the entry keeps `obj` alive, so its id is its own
            self._current[key] = found
            self.hits += 1
            return found[1]  # type: ignore[no-any-return]
        value = convert(obj, *args)
        self._current[key] = (obj, value)
        self.misses += 1
        return value

    def of_all(self, convert: Callable[..., R], objs: tuple[Any, ...], *args: Hashable) -> R:
        """`convert(*objs, *args)`, reused while every one of `objs` is the very same instance."""
        return self.keyed(convert, objs, args, lambda: convert(*objs, *args))

    def by_value(self, convert: Callable[..., R], *args: Hashable) -> R:
        """`convert(*args)` for hashable, immutable `args`, reused while they are equal."""
        key = (convert, args)
        found = self._current.get(key) or self._last.get(key)
        if found is not None:
            self._current[key] = found
            self.hits += 1
            return found[1]  # type: ignore[no-any-return]
        value = convert(*args)
        self._current[key] = (None, value)
        self.misses += 1
        return value

    def same(self, key: Hashable, value: R) -> R:
        """`value`, or the equal object the previous build recorded under `key`.

        Unchanged results keep their identity from build to build, so what is carried by
        identity further down the pipeline (generated messages, serialized resources) stays too.
        """
        found = self._current.get(key) or self._last.get(key)
        if found is not None and found[1] == value:
            value = found[1]
        self._current[key] = (None, value)
        return value

    def previous(self, key: Hashable) -> Any:
        """What `record` last kept under `key` in this or the previous generation (None if nothing),
        for results patched from their last version instead of computed again. Reading it keeps it."""
        found = self._current.get(key) or self._last.get(key)
        if found is None:
            return None
        self._current[key] = found
        return found[1]

    def record(self, key: Hashable, value: Any) -> None:
        """Keep `value` under `key` for `previous`; it goes when a generation no longer asks for it."""
        self._current[key] = (None, value)

    def keyed(self, tag: Hashable, objs: tuple[Any, ...], args: tuple[Hashable, ...], compute: Callable[[], R]) -> R:
        """`compute()`, reused while every one of `objs` is the same instance and `args` are equal.

        For results that read other objects through a container (a mesh): `objs` must then hold
        every object `compute` reads, so the key is exactly its inputs.
        """
        key = (tag, tuple(map(id, objs)), args)
        found = self._current.get(key) or self._last.get(key)
        if found is not None and same_objects(found[0], objs):
            self._current[key] = found
            self.hits += 1
            return found[1]  # type: ignore[no-any-return]
        value = compute()
        self._current[key] = (objs, value)  # keeps `objs` alive, so their ids stay theirs
        self.misses += 1
        return value

    def stage(self, tag: Hashable, objs: tuple[Any, ...], args: tuple[Hashable, ...],
              compute: Callable[[Conversions], R]) -> R:
        """A whole pass of a build, `compute(memo)`, reused while its inputs (`objs`, by identity,
        and `args`, by value) are those of its last run.

        Why: per-object conversions make a rebuild cheap per object, yet every pass still walks
        all of its ~thousands of inputs; a stage whose inputs did not change (the workloads on a
        route change, the routing rules on an endpoint change) costs one identity comparison.
        The stage keeps its own memo (`memo`), advanced only when the stage runs, so a skipped
        stage loses none of the conversions its next run will reuse. One result per tag is kept.
        """
        memo, last = self._stages.get(tag) or (Conversions(), None)
        if last is not None and last[1] == args and same_objects(last[0], objs):
            self.hits += 1
            return last[2]  # type: ignore[no-any-return]
        memo.next_build()
        value = compute(memo)
        memo.end_build()
        self._stages[tag] = (memo, (objs, args, value))
        self.misses += 1
        return value

    def stage_last(self, tag: Hashable) -> tuple[Conversions, tuple[Any, ...], Any] | None:
        """The memo, inputs and result of a stage's last run, for stages that patch their last
        result instead of recomputing it (see `stage_patched`)."""
        found = self._stages.get(tag)
        if found is None or found[1] is None:
            return None
        return found[0], found[1][0], found[1][2]

    def has_room(self, inputs: int) -> bool:
        """Whether a patched stage may add to this (its own) memo: patching only adds conversions, so
        past twice its `inputs` the stage runs in full, which starts a new generation.

        Counted without the union `__len__` makes (O(entries), twice per endpoint build): both
        generations' sizes added, which is exact for a stage's memo (a stage's run ends with its
        last generation dropped) and otherwise errs towards running in full."""
        return self._bound() < 2 * inputs + 64

    def _bound(self) -> int:
        """At least `len(self)`, in O(stages)."""
        return len(self._current) + len(self._last) + sum(memo._bound() for memo, _ in self._stages.values())

    def stage_args(self, tag: Hashable) -> tuple[Hashable, ...] | None:
        """The arguments of a stage's last run (None if it never ran): a patch applies only to equal ones."""
        found = self._stages.get(tag)
        return None if found is None or found[1] is None else found[1][1]

    def stage_store(self, tag: Hashable, memo: Conversions, objs: tuple[Any, ...], args: tuple[Hashable, ...],
                    value: Any) -> None:
        """Record a stage's result computed by patching (`stage_last`)."""
        self._stages[tag] = (memo, (objs, args, value))

