"""Directories of YAML files: walked (symlinks followed once), read, parsed and merged.

A parse cache keyed by file name keeps each file's last parse, so a reload re-reads only the
files the caller cannot rule out by their stat and re-parses only those whose bytes changed.
Limits: a total for all files (`MAX_TOTAL_BYTES`); past it, the files that cross it are not read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection
from pathlib import Path

from pilot.config.documents import DocumentError, LoadResult
from pilot.config.merge import Located, ParseEntry, merge
from pilot.config.yaml_text import load_text, one_line, parse_text

SUFFIXES = (".yaml", ".yml")
# All YAML files of a directory together; `file_max_total_mb` in the settings.
MAX_TOTAL_BYTES = 64 * 2**20


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
                problems.append(_walk_error(rel, f"not followed: {one_line(exc)}"))
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
        return LoadResult(errors=(not_a_directory(directory),)), True
    problems: list[DocumentError] = []
    if paths is None:
        paths, problems = walk_yaml(directory)
    changed = refresh_cache(cache, paths, unchanged, max_total_bytes)
    entries = [(cache[name], ()) for name, _ in paths]
    return merge(entries, problems), bool(changed)


def not_a_directory(directory: Path) -> DocumentError:
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
        return b"", [], [DocumentError(name, 0, None, None, None, f"cannot read: {one_line(exc)}")], True
    located: list[Located] = []
    errors: list[DocumentError] = []
    parse_text(text, name, located, errors)
    # A writer caught mid-write has most likely not finished its last line.
    return digest, located, errors, not data or data.endswith(b"\n")


def load_file(path: Path | str, *, display_name: str | None = None) -> LoadResult:
    """Parse one (multi-document) YAML file."""
    name = display_name or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return LoadResult(errors=(DocumentError(name, 0, None, None, None, f"cannot read: {one_line(exc)}"),))
    return load_text(text, name)


