"""Per-object conversions carried from one `build_mesh` to the next.

Why: a push usually changes a few objects out of thousands, and the store hands unchanged
objects over as the very same (frozen) instances. Converting each API object into its model
form once, and reusing the result while the object is the same instance, makes a rebuild
cost roughly what changed plus indexing. The result of `build_mesh` is the same with or
without this memo (tests check both); it only saves work. Memory stays bounded: only the
entries used by the latest build are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

R = TypeVar("R")


Key = tuple[Callable[..., Any], int, tuple[Hashable, ...]]


class Conversions:
    """(conversion, object identity, other arguments) -> result, for the current and last build."""

    def __init__(self) -> None:
        self._last: dict[Key, tuple[Any, Any]] = {}
        self._current: dict[Key, tuple[Any, Any]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._current.keys() | self._last.keys())

    def next_build(self) -> None:
        """Start a build: what the previous build used stays available, anything older goes."""
        if self._current:
            self._last, self._current = self._current, {}

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

