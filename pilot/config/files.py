"""The file source: a directory of Istio YAML, loaded into the ConfigStore and kept in sync.

Watching: the operating system's file events (inotify, FSEvents, ... through `watchfiles`)
wake a reload within a few milliseconds and cost nothing while nothing changes; a stat()
sweep every ``rescan`` seconds catches what events miss (network file systems, a directory
replaced under the watch, writes between the first load and the watch being armed). Where
events cannot be had, or with ``watch="poll"``, the sweep runs every ``interval`` seconds
instead. Every reload, however woken, is the same `_scan`: a stat() fingerprint, then only
files whose bytes changed are parsed again. Concurrency: `FileSource.run` is one task on the
store's loop; reading and parsing happen in a worker thread, and only the final
`replace_source` touches the store, on the loop thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Literal

import yaml
from watchfiles._rust_notify import RustNotify

from pilot.api import ApiError, ApiObject, parse_object
from pilot.config.documents import DocumentError, LoadResult
from pilot.config.store import ConfigStore

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml")
# A line that starts a new YAML document: "---", optionally followed by a comment.
_DOC_START = re.compile(r"^---[ \t]*(?:#.*)?$", re.MULTILINE)
# Files modified this recently may still change within the same mtime tick: look again.
_RACY_SECONDS = 2.0

Fingerprint = tuple[tuple[str, int, int, int], ...]
# libyaml's safe loader when present: the same documents, parsed about 8x faster.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def yaml_files(directory: Path) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` under ``directory``, recursively, sorted; dotfiles skipped."""
    return [Path(path) for _, path in yaml_paths(directory)]


def yaml_paths(directory: Path) -> list[tuple[str, str]]:
    """(name relative to ``directory``, path) of every YAML file, in `yaml_files` order.

    os.walk and plain strings rather than Path.rglob and Path objects: this runs on every reload
    (1,000 files at mission scale), and it is several times cheaper.
    """
    top = str(directory)
    found: list[tuple[tuple[str, ...], str, str]] = []
    for root, dirs, files in os.walk(top, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(root, top)
        parts = () if rel == os.curdir else tuple(rel.split(os.sep))
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(SUFFIXES) and not name.startswith(".") and os.path.isfile(path):
                found.append(((*parts, name), os.path.join(*parts, name), path))
    found.sort(key=lambda item: item[0])
    return [(name, path) for _, name, path in found]


def load_dir(path: Path | str) -> LoadResult:
    """Parse every YAML file under ``path``; valid objects are kept, bad documents reported.

    An object defined twice (same kind, namespace and name) keeps its first definition in
    file order; the later one is reported as an error.
    """
    return load_dir_cached(Path(path), {})[0]


# file name -> (content digest, its parsed objects, its errors)
ParseCache = dict[str, tuple[bytes, list["_Located"], list[DocumentError]]]


def load_dir_cached(
    directory: Path, cache: ParseCache, unchanged: Collection[str] = (), paths: list[tuple[str, str]] | None = None,
) -> tuple[LoadResult, bool]:
    """`load_dir`, re-parsing only files whose bytes changed since they were put in `cache`.

    Returns the result and whether anything differs from what the cache held (a file was
    added, removed or rewritten with other bytes). `cache` is updated in place. Files named in
    `unchanged` (relative names the caller knows were not written since they were cached, by
    their stat) are not even read: a change to one file of a thousand reads one file. `paths` is
    the directory's `yaml_paths` when the caller has listed it already.
    """
    if not directory.is_dir():
        return LoadResult(errors=(DocumentError(str(directory), 0, None, None, None, "not a directory"),)), True
    located: list[_Located] = []
    errors: list[DocumentError] = []
    names = []
    changed = False
    for name, path in yaml_paths(directory) if paths is None else paths:
        names.append(name)
        cached = cache.get(name)
        entry = cached if cached is not None and name in unchanged else _parse_file(Path(path), name, cached)
        changed = changed or entry is not cache.get(name)
        cache[name] = entry
        located += entry[1]
        errors += entry[2]
    for gone in set(cache) - set(names):
        del cache[gone]
        changed = True
    return _without_duplicates(located, errors), changed


def _parse_file(
    file: Path, name: str, cached: tuple[bytes, list[_Located], list[DocumentError]] | None
) -> tuple[bytes, list[_Located], list[DocumentError]]:
    try:
        data = file.read_bytes()
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if cached is not None and cached[0] == digest:
            return cached
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return b"", [], [DocumentError(name, 0, None, None, None, f"cannot read: {_one_line(exc)}")]
    located: list[_Located] = []
    errors: list[DocumentError] = []
    _parse_text(text, name, located, errors)
    return digest, located, errors


def load_file(path: Path | str, *, display_name: str | None = None) -> LoadResult:
    """Parse one (multi-document) YAML file."""
    name = display_name or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return LoadResult(errors=(DocumentError(name, 0, None, None, None, f"cannot read: {_one_line(exc)}"),))
    return load_text(text, name)


def load_text(text: str, file: str = "<text>") -> LoadResult:
    """Parse multi-document YAML text; a syntax error costs only the document it is in."""
    located: list[_Located] = []
    errors: list[DocumentError] = []
    _parse_text(text, file, located, errors)
    return _without_duplicates(located, errors)


# (file, document index, object, its store key): the key is read once, at parse time; a reload
# of a thousand unchanged files then handles ~9,000 keys without asking each object again.
_Located = tuple[str, int, ApiObject, tuple[str, str, str]]


def _parse_text(text: str, file: str, located: list[_Located], errors: list[DocumentError]) -> None:
    index = 0
    for chunk in _DOC_START.split(text):
        try:
            docs = [d for d in yaml.load_all(chunk, Loader=_LOADER) if d is not None]
        except (yaml.YAMLError, RecursionError, ValueError) as exc:
            if chunk.strip():
                errors.append(DocumentError(file, index, None, None, None, f"invalid YAML: {_one_line(exc)}"))
                index += 1
            continue
        for doc in docs:
            try:
                obj = parse_object(doc)
                located.append((file, index, obj, obj.key))
            except ApiError as exc:
                errors.append(DocumentError(file, index, exc.kind, exc.namespace, exc.name, str(exc)))
            except RecursionError:
                errors.append(DocumentError(file, index, None, None, None, "document is nested too deeply"))
            index += 1


def _without_duplicates(located: list[_Located], errors: list[DocumentError]) -> LoadResult:
    first: dict[tuple[str, str, str], tuple[str, int]] = {}
    kept: dict[tuple[str, str, str], ApiObject] = {}
    for file, index, obj, key in located:
        if key in first:
            where = "{}[{}]".format(*first[key])
            kind, namespace, name = key
            errors.append(DocumentError(file, index, kind, namespace, name, f"{obj.ref}: already defined at {where}"))
            continue
        first[key] = (file, index)
        kept[key] = obj
    return LoadResult(tuple(kept.values()), tuple(errors), keyed=kept)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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


class FileSource:
    """Keeps a ConfigStore source equal to the YAML files in one directory."""

    def __init__(
        self,
        store: ConfigStore,
        directory: Path | str,
        *,
        source_id: str | None = None,
        interval: float = 0.1,
        watch: Literal["events", "poll"] = "events",
        rescan: float = 1.0,
    ) -> None:
        self.store = store
        self.directory = Path(directory)
        self.source_id = source_id or f"file:{self.directory}"
        self.interval = interval  # seconds between sweeps when polling
        self.watch = watch
        self.rescan = rescan  # seconds between safety sweeps when file events wake reloads
        self.failures = 0
        self.last_result = LoadResult()
        self._seen: Fingerprint | None = None
        self._trusted = False
        self._cache: ParseCache = {}

    def sync(self) -> bool:
        """Load the directory now if it changed; True if the revision moved. For tests and startup."""
        scanned = self._scan()
        return scanned is not None and self._apply(*scanned)

    async def run(self) -> None:
        """Keep the store in sync forever: file events when available, else polling."""
        if self.watch == "events":
            try:
                await self._watch_events()
            except Exception as exc:
                log.warning("file source %s: file events unavailable (%s); polling every %.0f ms",
                            self.directory, _one_line(exc), self.interval * 1000)
        while True:
            await self._reload()
            await asyncio.sleep(self.interval)

    async def _watch_events(self) -> None:
        """Reload on every batch of file events and every `rescan` seconds without one.

        A reload right after the watch is armed covers writes made before it. The watch is
        re-armed when the directory itself is replaced (its inode changes), as a watch
        follows the old directory; while it is missing, the sweeps report that.
        """
        while True:
            try:
                armed = self.directory.stat().st_ino
            except OSError:
                await self._reload()
                await asyncio.sleep(self.rescan)
                continue
            # watchfiles' documented Rust backend: arming is synchronous, unlike `awatch`.
            notify = await asyncio.to_thread(RustNotify, [str(self.directory)], False, False, 0, True, True)
            stop = threading.Event()
            try:
                await self._reload()
                while _same_inode(self.directory, armed):
                    # Returns after events went quiet for 5 ms (at most 100 ms of them), or the timeout.
                    await asyncio.to_thread(notify.watch, 100, 5, int(self.rescan * 1000), stop)
                    await self._reload()
            finally:
                stop.set()  # a cancelled wait leaves the thread in watch(); this ends it within 5 ms

    async def _reload(self) -> None:
        """One `_scan` in a worker thread; a failure is logged and counted, the store keeps its config."""
        try:
            scanned = await asyncio.to_thread(self._scan)
            if scanned is not None:
                self._apply(*scanned)
        except Exception:
            self.failures += 1
            log.exception("file source %s: reload failed (failure %d)", self.directory, self.failures)

    def _scan(self) -> tuple[LoadResult, bool] | None:
        """(what the files hold, whether the files changed) or None if nothing to do.

        After a change the files are read again on every pass while their mtimes are recent
        enough that a second write could hide in the same timestamp tick.
        """
        paths = yaml_paths(self.directory) if self.directory.is_dir() else []
        seen, racy = fingerprint(self.directory, paths)
        touched = seen != self._seen
        if not touched and self._trusted:
            return None
        # The fingerprint was taken first: later writes show next pass. Only files whose bytes
        # changed are parsed again, so re-reading racy files costs a read and a hash; files whose
        # stat is the same as last pass and not recent enough to hide a second write are not read.
        unchanged = _stat_unchanged(self.directory, self._seen or (), seen)
        loaded, changed = load_dir_cached(self.directory, self._cache, unchanged, paths)
        self._seen, self._trusted = seen, not racy
        if not touched and not changed:
            return None
        return loaded, touched

    def _apply(self, loaded: LoadResult, touched: bool) -> bool:
        if loaded.errors != self.last_result.errors:
            for err in loaded.errors:
                log.warning("file source %s: rejected %s", self.directory, err)
        self.last_result = loaded
        if self.store.replace_source(self.source_id, loaded.keyed or loaded.objects, loaded.errors):
            return True
        if touched:
            # A file was written without changing any object: the operator asked for a rebuild.
            self.store.touch()
        return touched
