"""Which namespaces the mesh watches: MeshConfig `discoverySelectors` over the namespaces' labels.

As Istio: with no selector every namespace is selected; otherwise a namespace is selected when any
selector matches its labels. `NamespaceFilter` is the `WatchHandler` of a Namespace watch; it
re-evaluates membership when a namespace's labels change or the selectors change, and tells its
subscribers which namespaces came in and went out, so each source re-filters what it holds
without listing again. One filter serves every consumer (config source, service registry).

Concurrency: called on the event loop by the Namespace watch and the mesh config handler;
subscribers are called synchronously after the membership changed. Cost: a label change
evaluates the selectors for one namespace; a selector change for every namespace.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pilot.kube.meshconfig import NamespaceSelector

Listener = Callable[[frozenset[str], frozenset[str]], None]  # (selected now, deselected now)


def selected(labels: Mapping[str, str], selectors: Sequence[NamespaceSelector]) -> bool:
    """Whether a namespace with `labels` is in the mesh under `selectors` (none: all are)."""
    return not selectors or any(s.matches(labels) for s in selectors)


class NamespaceFilter:
    """Namespace labels as watched, and the selected set under the current selectors."""

    def __init__(self, selectors: Sequence[NamespaceSelector] = ()) -> None:
        self._selectors: tuple[NamespaceSelector, ...] = tuple(selectors)
        self._labels: dict[str, dict[str, str]] = {}
        self._selected: frozenset[str] = frozenset()
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(added, removed)` whenever membership changes."""
        self._listeners.append(listener)

    def allows(self, namespace: str) -> bool:
        """Whether objects of `namespace` belong to the mesh now.

        With no selector every namespace does, even one not seen yet (an object may arrive
        before its namespace's event); with selectors only a selected, known namespace does.
        """
        return not self._selectors or namespace in self._selected

    @property
    def selected(self) -> frozenset[str]:
        """The known namespaces that `allows`."""
        return self._selected

    def set_selectors(self, selectors: Sequence[NamespaceSelector]) -> None:
        before = self._allowed()
        self._selectors = tuple(selectors)
        self._selected = frozenset(n for n, labels in self._labels.items() if selected(labels, self._selectors))
        self._notify(before)

    # WatchHandler of Namespaces
    def replace(self, objects: list[dict[str, Any]]) -> None:
        before = self._allowed()
        self._labels = {_name(o): _labels(o) for o in objects}
        self._selected = frozenset(n for n, labels in self._labels.items() if selected(labels, self._selectors))
        self._notify(before)

    def upsert(self, obj: dict[str, Any]) -> None:
        name, labels = _name(obj), _labels(obj)
        self._labels[name] = labels
        self._update(name, selected(labels, self._selectors))

    def delete(self, obj: dict[str, Any]) -> None:
        name = _name(obj)
        self._labels.pop(name, None)
        self._update(name, False)

    def _update(self, name: str, inside: bool) -> None:
        if inside == (name in self._selected):
            return
        self._selected = self._selected | {name} if inside else self._selected - {name}
        if self._selectors:  # without selectors every namespace is allowed anyway
            self._notify_all(frozenset({name}) if inside else frozenset(),
                             frozenset() if inside else frozenset({name}))

    def _allowed(self) -> frozenset[str] | None:
        """What `allows` says yes to: None for every namespace."""
        return self._selected if self._selectors else None

    def _notify(self, before: frozenset[str] | None) -> None:
        after = self._allowed()
        if before == after:
            return
        known = frozenset(self._labels)
        was = known if before is None else before
        now = known if after is None else after
        self._notify_all(now - was, was - now)

    def _notify_all(self, added: frozenset[str], removed: frozenset[str]) -> None:
        if added or removed:
            for listener in list(self._listeners):
                listener(added, removed)


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def _labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})
