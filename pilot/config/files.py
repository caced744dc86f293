"""The file source: a directory of Istio YAML, loaded into the ConfigStore and kept in sync.

Watching: the operating system's file events (inotify, FSEvents, ... through `watchfiles`)
wake a reload within a few milliseconds and cost nothing while nothing changes; a stat()
sweep every ``rescan`` seconds catches what events miss (network file systems, a directory
replaced under the watch, writes between the first load and the watch being armed). Where
events cannot be had, or with ``watch="poll"``, the sweep runs every ``interval`` seconds
instead. Every reload, however woken, is the same `_scan`: a stat() fingerprint, then only
files whose bytes changed are parsed again; when the events name only files it already lists,
the last listing is reused and only those are stat()ed (no walk). A file rewritten with the same objects in the same
order (the usual edit) patches the last merge and names its keys to the store, which then compares
only those (`Merged.patched`); anything else merges every file again. At 1,000 files a one-file
edit cost ~10 ms from event to store, most of it the walk and stat() sweep; named by an event it
costs reading that file (~5 ms, a few recently written files are read again to rule out a second
write in the same mtime tick). Concurrency: `FileSource.run` is one task on the
store's loop; reading and parsing happen in a worker thread, and only the final
`replace_source` touches the store, on the loop thread.

Bad input never costs good config (see `FileSource`): a file's edit applies at once only when it
parses cleanly and removes nothing; otherwise it waits until the file has been stable for a
settle time, and a file that does not parse removes nothing. Reading a directory and parsing
its files is `pilot.config.yaml_dir` and `pilot.config.yaml_text` (limits: 1.5 MiB per document,
Kubernetes' object size; 10,000 entries per list; a total for all files); this module decides
when to read and what the store gets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from watchfiles._rust_notify import RustNotify

from pilot.config.documents import DocumentError, LoadResult
from pilot.config.merge import Located, Merged, ParseEntry
from pilot.config.store import SERVING_PREVIOUS, ConfigStore
from pilot.config.yaml_dir import (
    MAX_TOTAL_BYTES,
    SUFFIXES,
    ParseCache,
    not_a_directory,
    refresh_cache,
    walk_yaml,
    yaml_paths,
)
from pilot.config.yaml_text import one_line

log = logging.getLogger(__name__)

# Files modified this recently may still change within the same mtime tick: look again.
_RACY_SECONDS = 2.0
# Longest a safety sweep waits for pilot to stop pushing (`FileSource._sweep_waits`).
SWEEP_DEFERRAL = 10.0
# Seconds a file must stay unchanged before it may remove objects; `file_settle_ms` in the settings.
# Longer than the half second a shell redirect or a slow generator may leave a file empty.
DEFAULT_SETTLE = 0.7

Fingerprint = tuple[tuple[str, int, int, int], ...]


def _event_paths(events: object) -> frozenset[str] | None:
    """The paths a batch of `watchfiles` events names; None when it is not a batch (a timeout)."""
    if not isinstance(events, set):
        return None
    return frozenset(path for _, path in events)


def _same_inode(directory: Path, inode: int) -> bool:
    try:
        return directory.stat().st_ino == inode
    except OSError:
        return False


def fingerprint(directory: Path, paths: list[tuple[str, str]] | None = None) -> tuple[Fingerprint, bool]:
    """What changes when any YAML file is added, removed, rewritten or renamed over.

    The flag is True when some file changed so recently that a further write could land
    in the same timestamp tick; the caller should then not trust the fingerprint yet.
    """
    entries = []
    newest = 0
    if paths is None:
        paths = yaml_paths(directory) if directory.is_dir() else []
    for _, path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        entries.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        newest = max(newest, st.st_mtime_ns)
    racy = time.time_ns() - newest < _RACY_SECONDS * 1e9
    return tuple(entries), racy


def _stat_unchanged(directory: Path, before: Fingerprint, now: Fingerprint) -> set[str]:
    """Relative names of files with the same (mtime, size, inode) as before, written long enough ago
    that a second write within the same timestamp tick is ruled out."""
    recent = time.time_ns() - _RACY_SECONDS * 1e9
    prefix = len(str(directory)) + 1  # fingerprint paths are `directory/relative`
    return {e[0][prefix:] for e in set(before) & set(now) if e[1] < recent}


@dataclass(frozen=True)
class _Held:
    """What one file gives the store now: a parse of it, and objects of earlier versions still served
    (``waiting``: until the file is stable; otherwise: until it parses)."""

    entry: ParseEntry
    carried: tuple[Located, ...] = ()
    waiting: bool = False

    def objects(self) -> list[Located]:
        return [*self.entry[1], *self.carried]


def _next_held(parse: ParseEntry | None, held: _Held | None, stable: bool) -> _Held | None:
    """What a file gives the store after its latest parse (``held`` itself when nothing moves).

    A clean parse (no errors, a complete last line) applies at once; objects it no longer defines
    keep serving until the file is `stable`. A parse with errors or an unfinished last line (a
    rejected document, or a file caught mid-write) and a vanished file wait, whole, until the
    file is stable; then they apply, except that a file with a document that cannot even be
    identified (invalid YAML, unreadable) keeps giving the objects it gave before until it parses.
    """
    old = held.objects() if held is not None else []
    if parse is None:
        return None if stable or not old else held
    if held is not None and held.entry is parse and not (held.waiting and stable):
        return held
    new_keys = {loc[3] for loc in parse[1]}
    dropped = tuple(loc for loc in old if loc[3] not in new_keys)
    if not parse[2] and parse[3]:
        return _Held(parse) if stable or not dropped else _Held(parse, dropped, waiting=True)
    if not stable:
        return held
    unidentified = any(err.key is None for err in parse[2])
    return _Held(parse, dropped if unidentified else ())


def _waits(parse: ParseEntry | None, held: _Held | None) -> bool:
    """Whether a file's latest parse is not fully applied yet."""
    if held is None:
        return parse is not None
    return held.entry is not parse or held.waiting


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _file_order(name: str) -> list[str]:
    return name.split(os.sep)


class _Scanned(NamedTuple):
    """One scan's outcome (`FileSource._scan`)."""

    loaded: LoadResult  # what the store should hold
    touched: bool  # a file was written (a rewrite with the same objects asks for a rebuild)
    changed: list[tuple[str, str, str]] | None = None  # with `base`: the only keys that differ from it
    base: LoadResult | None = None  # the result this one was patched from


class FileSource:
    """Keeps a ConfigStore source equal to the YAML files in one directory, never losing good config.

    Per file, an edit that parses cleanly and removes nothing applies at once. A file that
    vanished, shrank, emptied or holds a rejected document is applied only once its stat (or
    its absence) has not changed for ``settle`` seconds, so a file caught mid-write or truncated
    and rewritten removes nothing; a file with a document that cannot be identified (invalid
    YAML, unreadable) keeps its earlier objects until it parses. Per object, the store keeps
    the last good version of an object whose new version is rejected. The cost: one stat() per
    waiting file per pass, and a wake-up when the first waiting file settles.
    """

    def __init__(
        self,
        store: ConfigStore,
        directory: Path | str,
        *,
        source_id: str | None = None,
        interval: float = 0.1,
        watch: Literal["events", "poll"] = "events",
        rescan: float = 1.0,
        settle: float = DEFAULT_SETTLE,
        max_total_bytes: int = MAX_TOTAL_BYTES,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.directory = Path(directory)
        self.source_id = source_id or f"file:{self.directory}"
        self.interval = interval  # seconds between sweeps when polling
        self.watch = watch
        self.rescan = rescan  # seconds between safety sweeps when file events wake reloads
        self.settle = settle  # seconds a file must stay unchanged before it may remove objects
        self.max_total_bytes = max_total_bytes
        # Whether pilot is pushing (`pilot.quiet.WhenQuiet.busy`): the safety sweep then waits, at
        # most `SWEEP_DEFERRAL` seconds (see `_sweep_waits`).
        self.busy = busy
        self._swept = time.monotonic()  # when the last sweep (a reload not woken by events) ran
        self.failures = 0
        self.last_result = LoadResult()
        self._seen: Fingerprint | None = None
        # The last walk: paths, its problems, and each file's position in `_seen` by absolute path
        # (built when a hint first needs it: the periodic sweep of an unchanged directory builds none).
        self._listing: tuple[list[tuple[str, str]], list[DocumentError], dict[str, int] | None] | None = None
        self._trusted = False
        self._cache: ParseCache = {}  # the latest parse of every file
        self._held: dict[str, _Held] = {}  # what each file gives the store now
        self._pending: dict[str, tuple[tuple[int, int, int] | None, float]] = {}  # name -> (stat, since)
        self._problems: list[DocumentError] = []
        self._loaded = False
        self._merged: Merged | None = None  # the last merge of every file's contribution
        self._stored: LoadResult | None = None  # what the store was last given (None: unknown)

    def sync(self) -> bool:
        """Load the directory now if it changed; True if the revision moved. For tests and startup."""
        scanned = self._scan()
        return scanned is not None and self._apply(scanned)

    @property
    def waiting(self) -> list[str]:
        """Files whose latest version waits to be applied until they are stable."""
        return sorted(self._pending)

    async def run(self) -> None:
        """Keep the store in sync forever: file events when available, else polling."""
        if self.watch == "events":
            try:
                await self._watch_events()
            except Exception as exc:
                log.warning("file source %s: file events unavailable (%s); polling every %.0f ms",
                            self.directory, one_line(exc), self.interval * 1000)
        while True:
            await self._reload()
            await asyncio.sleep(self.interval)

    async def _watch_events(self) -> None:
        """Reload on every batch of file events, every `rescan` seconds without one, and when the
        first waiting file has been stable for `settle`.

        A reload right after the watch is armed covers writes made before it. The watch is
        re-armed when the directory itself is replaced (its inode changes), as a watch
        follows the old directory; while it is missing, the sweeps report that.
        """
        while True:
            try:
                armed = self.directory.stat().st_ino
            except OSError:
                await self._reload()
                await asyncio.sleep(min(self.rescan, self._until_settled()))
                continue
            # watchfiles' documented Rust backend: arming is synchronous, unlike `awatch`.
            notify = await asyncio.to_thread(RustNotify, [str(self.directory)], False, False, 0, True, True)
            stop = threading.Event()
            try:
                await self._reload()
                while _same_inode(self.directory, armed):
                    timeout = min(self.rescan, self._until_settled())
                    # Returns after events went quiet for 5 ms (at most 100 ms of them), or the timeout.
                    events = await asyncio.to_thread(notify.watch, 100, 5, max(1, int(timeout * 1000)), stop)
                    hint = _event_paths(events)
                    if hint is None and self._sweep_waits():
                        continue
                    await self._reload(hint)
            finally:
                stop.set()  # a cancelled wait leaves the thread in watch(); this ends it within 5 ms

    def _sweep_waits(self) -> bool:
        """Whether the safety sweep due now waits for pilot to finish pushing.

        Why: at 1,000 files a sweep (walk, stat() every file, read the recently written ones again)
        takes 30-40 ms of CPU in a worker thread, holding the GIL for much of it, and the sweep after
        an edit fell inside the fan-out of that very edit (2,000 streams write a route change for
        about a second): 4-5% of pilot's CPU per mission-scale route change (py-spy, session 25's
        samples). It only catches what events missed, so it may wait; file events and a waiting
        file's settle time never do. Bounded: a sweep waits `SWEEP_DEFERRAL` seconds at most, so
        pushes that never stop (endpoint churn) cannot keep a missed edit out for longer.
        """
        now = time.monotonic()
        if self.busy is not None and not self._pending and self.busy() and now - self._swept < SWEEP_DEFERRAL:
            return True
        self._swept = now
        return False

    def _until_settled(self) -> float:
        """Seconds until the first waiting file has been stable for `settle` (inf if none waits)."""
        if not self._pending:
            return float("inf")
        since = min(since for _, since in self._pending.values())
        return max(0.005, since + self.settle - time.monotonic() + 0.005)

    async def _reload(self, hint: frozenset[str] | None = None) -> None:
        """One `_scan` in a worker thread; a failure is logged and counted, the store keeps its config.
        `hint`: the paths file events named (None: look at everything)."""
        try:
            scanned = await asyncio.to_thread(self._scan, hint)
            if scanned is not None:
                self._apply(scanned)
        except Exception:
            self.failures += 1
            log.exception("file source %s: reload failed (failure %d)", self.directory, self.failures)

    def _scan(self, hint: frozenset[str] | None = None) -> _Scanned | None:
        """What the store should hold (and whether a file was written), or None if nothing to do.

        After a change the files are read again on every pass while their mtimes are recent
        enough that a second write could hide in the same timestamp tick. With `hint` (the paths
        file events named) and only known YAML files among them, the last listing is reused and
        only those files are stat()ed (`_hinted`); anything else walks the directory.
        """
        known = self._hinted(hint) if hint is not None else None
        if known is not None:
            paths, problems, seen, racy = known
        else:
            if self.directory.is_dir():
                paths, problems = walk_yaml(self.directory)
            else:
                paths, problems = [], [not_a_directory(self.directory)]
            seen, racy = fingerprint(self.directory, paths)
            if (self._listing is None or self._listing[0] != paths
                    or [e[0] for e in seen] != [e[0] for e in self._seen or ()]):
                self._listing = (paths, problems, None)  # positions indexed when a hint first needs them
            else:
                self._listing = (paths, problems, self._listing[2])
        touched = seen != self._seen
        if not touched and self._trusted and not self._pending:
            return None
        # The fingerprint was taken first: later writes show next pass. Only files whose bytes
        # changed are parsed again, so re-reading racy files costs a read and a hash; files whose
        # stat is the same as last pass and not recent enough to hide a second write are not read.
        unchanged = _stat_unchanged(self.directory, self._seen or (), seen)
        total = sum(entry[2] for entry in seen)
        changed = refresh_cache(self._cache, paths, unchanged, self.max_total_bytes, total)
        self._seen, self._trusted = seen, not racy
        moves, held_back = self._decide(changed | self._pending.keys())
        if problems != self._problems:
            self._problems, self._merged = problems, None
        elif not moves:
            if touched and not held_back and not changed:
                return _Scanned(self.last_result, True)  # rewritten with the same bytes: asks for a rebuild
            return None
        base, found = self._merged, None
        edits = [((before.entry, before.carried), (after.entry, after.carried))
                 for before, after in moves if before is not None and after is not None]
        if base is not None and len(edits) == len(moves):
            found = base.patched(edits)
        if found is not None:
            self._merged, keys = found
        else:
            held = sorted(self._held.items(), key=lambda item: _file_order(item[0]))
            self._merged, keys, base = Merged.of(((h.entry, h.carried) for _, h in held), problems), None, None
        return _Scanned(self._merged.result, touched and not held_back, keys, base.result if base else None)

    def _hinted(self, hint: frozenset[str]) -> tuple[list[tuple[str, str]], list[DocumentError], Fingerprint,
                                                       bool] | None:
        """The last listing with the hinted files stat()ed again, or None when only a walk can tell
        (a new or vanished YAML file, a directory, a path under one it knows, no listing yet).

        Why: at 1,000 files the walk and a stat() of every file are most of an edit's ~10 ms from
        event to store; the edit itself names the one file. Paths that are not YAML files and no
        longer exist (an editor's or `sed -i`'s temporary file, renamed over the real one) are
        ignored, unless the listing has files under them (a directory moved away). Events can be
        lost or coalesced: the periodic sweep (`rescan`) still walks everything.
        """
        if self._listing is None or self._seen is None:
            return None
        paths, problems, index = self._listing
        if index is None:
            index = {os.path.abspath(e[0]): i for i, e in enumerate(self._seen)}
            self._listing = (paths, problems, index)
        entries = list(self._seen)
        for raw in hint:
            path = os.path.abspath(raw)
            position = index.get(path)
            if position is None:
                if path.endswith(SUFFIXES) or os.path.lexists(path) or any(p.startswith(path + os.sep) for p in index):
                    return None
                continue
            try:
                st = os.stat(path)
            except OSError:
                return None  # removed, or replaced by something unreadable: walk
            if not stat.S_ISREG(st.st_mode):
                return None  # replaced by a directory: walk
            entries[position] = (entries[position][0], st.st_mtime_ns, st.st_size, st.st_ino)
        newest = max((e[1] for e in entries), default=0)
        return paths, problems, tuple(entries), time.time_ns() - newest < _RACY_SECONDS * 1e9

    def _decide(self, names: Collection[str]) -> tuple[list[tuple[_Held | None, _Held | None]], bool]:
        """Move each named file's contribution on as far as its stability allows.

        Returns ((before, after) per file whose contribution changed, some file's latest version is
        held back). The very first load takes every file as stable: there is no earlier config to lose.
        """
        now = time.monotonic()
        moves: list[tuple[_Held | None, _Held | None]] = []
        held_back = False
        for name in names:
            parse, held = self._cache.get(name), self._held.get(name)
            if not _waits(parse, held):
                self._pending.pop(name, None)
                continue
            following = _next_held(parse, held, not self._loaded)
            since = None
            if _waits(parse, following):  # only a file that must wait is looked at again
                stat = _stat(os.path.join(self.directory, name))
                since = self._pending.get(name)
                if since is None or since[0] != stat:
                    since = (stat, now)
                if now - since[1] >= self.settle:
                    following = _next_held(parse, held, True)
            if following is not held:
                moves.append((held, following))
                if following is None:
                    del self._held[name]
                else:
                    self._held[name] = following
            if since is not None and _waits(parse, following):
                self._pending[name] = since
                held_back = True
            else:
                self._pending.pop(name, None)
        self._loaded = True
        return moves, held_back

    def _apply(self, scanned: _Scanned) -> bool:
        loaded, touched = scanned.loaded, scanned.touched
        before = self.last_result
        self.last_result = loaded
        # The keys a patched merge changed are all the store needs to compare, when the store holds
        # exactly what that merge started from.
        keys = scanned.changed if scanned.base is not None and scanned.base is self._stored else None
        self._stored = None
        changed = self.store.replace_source(self.source_id, loaded.keyed or loaded.objects, loaded.errors, keys)
        self._stored = loaded
        self._report(before, loaded)
        if changed:
            return True
        if touched:
            # A file was written without changing any object: the operator asked for a rebuild.
            self.store.touch()
        return touched

    def _report(self, before: LoadResult, now: LoadResult) -> None:
        """Log each new rejection once, saying what serves instead; warn when every object is gone."""
        known = set(before.errors)
        previous = self.store.serving_previous(self.source_id)
        for err in now.errors:
            if err in known:
                continue
            held = self._held.get(err.file)
            if err.key is not None and previous.get(err.key) == err:
                suffix = f"; {SERVING_PREVIOUS}"
            elif err.key is None and held is not None and held.carried:
                suffix = f"; the objects it defined before keep serving ({len(held.carried)})"
            else:
                suffix = ""
            log.warning("file source %s: rejected %s%s", self.directory, err, suffix)
        if before.objects and not now.objects:
            log.warning("file source %s: every object it defined is removed (%d): no YAML file under it "
                        "defines one any more", self.directory, len(before.objects))
