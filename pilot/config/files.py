"""The file source: a directory of Istio YAML, loaded into the ConfigStore and kept in sync.

Watching: the operating system's file events (inotify, FSEvents, ... through `watchfiles`)
wake a reload within a few milliseconds and cost nothing while nothing changes; a stat()
sweep every ``rescan`` seconds catches what events miss (network file systems, a directory
replaced under the watch, writes between the first load and the watch being armed). Where
events cannot be had, or with ``watch="poll"``, the sweep runs every ``interval`` seconds
instead. Every reload, however woken, is the same `_scan`: a stat() fingerprint, then only
files whose bytes changed are parsed again. A file rewritten with the same objects in the same
order (the usual edit) patches the last merge and names its keys to the store, which then compares
only those (`Merged.patched`); anything else merges every file again. At 1,000 files a one-file
edit costs ~10 ms from event to store, most of it the stat() sweep. Concurrency: `FileSource.run` is one task on the
store's loop; reading and parsing happen in a worker thread, and only the final
`replace_source` touches the store, on the loop thread.

Bad input never costs good config (see `FileSource`): a file's edit applies at once only when it
parses cleanly and removes nothing; otherwise it waits until the file has been stable for a
settle time, and a file that does not parse removes nothing. Limits: 1.5 MiB per document
(Kubernetes' object size), 10,000 entries per list, a total for all files.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml
from watchfiles._rust_notify import RustNotify

from pilot.api import ApiError, parse_object
from pilot.api.errors import object_ref
from pilot.config.documents import DocumentError, LoadResult
from pilot.config.merge import Located, Merged, ParseEntry, merge
from pilot.config.store import SERVING_PREVIOUS, ConfigStore

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml")
# A line that starts a new YAML document: "---", optionally followed by a comment.
_DOC_START = re.compile(r"^---[ \t]*(?:#.*)?$", re.MULTILINE)
# Files modified this recently may still change within the same mtime tick: look again.
_RACY_SECONDS = 2.0
# Kubernetes stores an object in one etcd request, limited to 1.5 MiB: the same limit per document.
MAX_DOCUMENT_BYTES = 1_572_864
# Entries in any one list of a document (routes, hosts, matches, ...).
MAX_LIST_ITEMS = 10_000
# A list of MAX_LIST_ITEMS entries takes at least two characters each ("- " or ", ").
_SMALLEST_LONG_LIST = 2 * MAX_LIST_ITEMS
# Parser events `identify` reads at most (a few milliseconds).
_IDENTIFY_EVENTS = 20_000
# All YAML files of a directory together; `file_max_total_mb` in the settings.
MAX_TOTAL_BYTES = 64 * 2**20
# Seconds a file must stay unchanged before it may remove objects; `file_settle_ms` in the settings.
# Longer than the half second a shell redirect or a slow generator may leave a file empty.
DEFAULT_SETTLE = 0.7

Fingerprint = tuple[tuple[str, int, int, int], ...]
# libyaml's safe loader when present: the same documents, parsed about 8x faster.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def yaml_files(directory: Path) -> list[Path]:
    """Every ``*.yaml``/``*.yml`` under ``directory``, recursively, sorted; dotfiles skipped."""
    return [Path(path) for _, path in yaml_paths(directory)]


def yaml_paths(directory: Path) -> list[tuple[str, str]]:
    """(name relative to ``directory``, path) of every YAML file, in `yaml_files` order."""
    return walk_yaml(directory)[0]


def walk_yaml(directory: Path) -> tuple[list[tuple[str, str]], list[DocumentError]]:
    """`yaml_paths`, and one error per directory not entered: a symlink loop, or a directory
    reached a second time through another symlink.

    Symlinked directories are followed, but each real directory (device, inode) is entered once:
    a loop would otherwise be walked until the kernel's 40-level symlink limit, and every file
    in it read again under a longer name. os.scandir and plain strings rather than Path.rglob:
    this runs on every reload (1,000 files at mission scale); its DirEntry answers is_dir from
    the directory read itself, so the walk costs one stat() per directory.
    """
    top = str(directory)
    found: list[tuple[tuple[str, ...], str, str]] = []
    problems: list[DocumentError] = []
    try:
        st = os.stat(top)
    except OSError:
        return [], []
    entered: dict[tuple[int, int], str] = {(st.st_dev, st.st_ino): "."}
    stack: list[tuple[str, tuple[str, ...], frozenset[tuple[int, int]]]] = [
        (top, (), frozenset(entered))]
    while stack:
        path, parts, ancestors = stack.pop()
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = (*parts, entry.name)
            try:
                is_dir = entry.is_dir()
            except OSError as exc:  # ELOOP: a link to itself
                problems.append(_walk_error(rel, f"not followed: {_one_line(exc)}"))
                continue
            if not is_dir:
                if entry.name.endswith(SUFFIXES) and _is_file(entry):
                    found.append((rel, os.path.join(*rel), entry.path))
                continue
            try:
                dst = entry.stat()
            except OSError:
                continue
            ident = (dst.st_dev, dst.st_ino)
            if ident in ancestors:
                problems.append(_walk_error(rel, f"symlink loop: it is {entered[ident]} again; not followed"))
            elif ident in entered:
                problems.append(_walk_error(rel, f"same directory as {entered[ident]}; not read twice"))
            else:
                entered[ident] = os.path.join(*rel)
                subdirs.append((entry.path, rel, ancestors | {ident}))
        stack.extend(reversed(subdirs))
    found.sort(key=lambda item: item[0])
    problems.sort()
    return [(name, path) for _, name, path in found], problems


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _walk_error(rel: tuple[str, ...], message: str) -> DocumentError:
    return DocumentError(os.path.join(*rel), 0, None, None, None, message)


def load_dir(path: Path | str) -> LoadResult:
    """Parse every YAML file under ``path``; valid objects are kept, bad documents reported.

    An object defined twice (same kind, namespace and name) keeps its first definition in
    file order; the later one is reported as an error.
    """
    return load_dir_cached(Path(path), {})[0]


ParseCache = dict[str, ParseEntry]  # file name -> its latest parse


def load_dir_cached(
    directory: Path, cache: ParseCache, unchanged: Collection[str] = (), paths: list[tuple[str, str]] | None = None,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> tuple[LoadResult, bool]:
    """`load_dir`, re-parsing only files whose bytes changed since they were put in `cache`.

    Returns the result and whether anything differs from what the cache held (a file was
    added, removed or rewritten with other bytes). `cache` is updated in place. Files named in
    `unchanged` (relative names the caller knows were not written since they were cached, by
    their stat) are not even read: a change to one file of a thousand reads one file. `paths` is
    the directory's `yaml_paths` when the caller has listed it already.
    """
    if not directory.is_dir():
        return LoadResult(errors=(_not_a_directory(directory),)), True
    problems: list[DocumentError] = []
    if paths is None:
        paths, problems = walk_yaml(directory)
    changed = refresh_cache(cache, paths, unchanged, max_total_bytes)
    entries = [(cache[name], ()) for name, _ in paths]
    return merge(entries, problems), bool(changed)


def _not_a_directory(directory: Path) -> DocumentError:
    return DocumentError(str(directory), 0, None, None, None, "not a directory")


def refresh_cache(
    cache: ParseCache, paths: list[tuple[str, str]], unchanged: Collection[str] = (),
    max_total_bytes: int = MAX_TOTAL_BYTES, total: int | None = None,
) -> set[str]:
    """Bring `cache` up to date with the files in `paths`; the names whose entry changed.

    When the files' sizes (`total`, else a stat() of each) add up past `max_total_bytes`, the
    files that cross it, in file order, are not read: their entry is an error, looked at again
    on every call.
    """
    if total is None:
        total = sum(_size(path) for _, path in paths)
    budget = 0 if total > max_total_bytes else None  # counted file by file only when over the limit
    changed: set[str] = set()
    for name, path in paths:
        cached = cache.get(name)
        if budget is not None and (budget := budget + _size(path)) > max_total_bytes:
            entry = _over_total(name, cached, max_total_bytes)
        elif cached is not None and name in unchanged and cached[0]:
            entry = cached
        else:
            entry = _parse_file(Path(path), name, cached)
        if entry is not cached:
            cache[name] = entry
            changed.add(name)
    listed = {name for name, _ in paths}
    for gone in [name for name in cache if name not in listed]:
        del cache[gone]
        changed.add(gone)
    return changed


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _over_total(name: str, cached: ParseEntry | None, limit: int) -> ParseEntry:
    message = (f"not loaded: the config files would exceed the total limit of {limit / 2**20:g} MiB "
               "(setting file_max_total_mb)")
    if cached is not None and not cached[0] and cached[2] and cached[2][0].message == message:
        return cached
    return b"", [], [DocumentError(name, 0, None, None, None, message)], True


def _parse_file(file: Path, name: str, cached: ParseEntry | None) -> ParseEntry:
    try:
        data = file.read_bytes()
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if cached is not None and cached[0] == digest:
            return cached
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return b"", [], [DocumentError(name, 0, None, None, None, f"cannot read: {_one_line(exc)}")], True
    located: list[Located] = []
    errors: list[DocumentError] = []
    _parse_text(text, name, located, errors)
    # A writer caught mid-write has most likely not finished its last line.
    return digest, located, errors, not data or data.endswith(b"\n")


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
    located: list[Located] = []
    errors: list[DocumentError] = []
    _parse_text(text, file, located, errors)
    return merge([((b"", located, errors, True), ())])


# (file, document index, object, its store key): the key is read once, at parse time; a reload
# of a thousand unchanged files then handles ~9,000 keys without asking each object again.


def _parse_text(text: str, file: str, located: list[Located], errors: list[DocumentError]) -> None:
    index = 0
    for chunk in _DOC_START.split(text):
        # A character is at most 4 bytes: shorter chunks cannot be over the limit, and are not encoded.
        if len(chunk) * 4 > MAX_DOCUMENT_BYTES and (size := len(chunk.encode("utf-8"))) > MAX_DOCUMENT_BYTES:
            kind, namespace, name = identify(chunk)
            ref = f"{object_ref(kind, namespace, name)}: " if kind or name else ""
            errors.append(DocumentError(file, index, kind, namespace, name, (
                f"{ref}document is {size / 2**20:.1f} MiB, over the 1.5 MiB limit of a Kubernetes object "
                "(etcd's request size); split it into smaller objects")))
            index += 1
            continue
        try:
            docs = [d for d in yaml.load_all(chunk, Loader=_LOADER) if d is not None]
        except (yaml.YAMLError, RecursionError, ValueError) as exc:
            if chunk.strip():
                errors.append(DocumentError(file, index, None, None, None, f"invalid YAML: {_one_line(exc)}"))
                index += 1
            continue
        for doc in docs:
            try:
                if len(chunk) > _SMALLEST_LONG_LIST:
                    _check_counts(doc)
                obj = parse_object(doc)
                located.append((file, index, obj, obj.key))
            except ApiError as exc:
                errors.append(DocumentError(file, index, exc.kind, exc.namespace, exc.name, str(exc)))
            except RecursionError:
                errors.append(DocumentError(file, index, None, None, None, "document is nested too deeply"))
            index += 1


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
    ) -> None:
        self.store = store
        self.directory = Path(directory)
        self.source_id = source_id or f"file:{self.directory}"
        self.interval = interval  # seconds between sweeps when polling
        self.watch = watch
        self.rescan = rescan  # seconds between safety sweeps when file events wake reloads
        self.settle = settle  # seconds a file must stay unchanged before it may remove objects
        self.max_total_bytes = max_total_bytes
        self.failures = 0
        self.last_result = LoadResult()
        self._seen: Fingerprint | None = None
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
                            self.directory, _one_line(exc), self.interval * 1000)
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
                    await asyncio.to_thread(notify.watch, 100, 5, max(1, int(timeout * 1000)), stop)
                    await self._reload()
            finally:
                stop.set()  # a cancelled wait leaves the thread in watch(); this ends it within 5 ms

    def _until_settled(self) -> float:
        """Seconds until the first waiting file has been stable for `settle` (inf if none waits)."""
        if not self._pending:
            return float("inf")
        since = min(since for _, since in self._pending.values())
        return max(0.005, since + self.settle - time.monotonic() + 0.005)

    async def _reload(self) -> None:
        """One `_scan` in a worker thread; a failure is logged and counted, the store keeps its config."""
        try:
            scanned = await asyncio.to_thread(self._scan)
            if scanned is not None:
                self._apply(scanned)
        except Exception:
            self.failures += 1
            log.exception("file source %s: reload failed (failure %d)", self.directory, self.failures)

    def _scan(self) -> _Scanned | None:
        """What the store should hold (and whether a file was written), or None if nothing to do.

        After a change the files are read again on every pass while their mtimes are recent
        enough that a second write could hide in the same timestamp tick.
        """
        if self.directory.is_dir():
            paths, problems = walk_yaml(self.directory)
        else:
            paths, problems = [], [_not_a_directory(self.directory)]
        seen, racy = fingerprint(self.directory, paths)
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
