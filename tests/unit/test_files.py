"""Loading YAML directories and watching them: bad documents cost only themselves."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest

from pilot.config import ConfigStore, FileSource, files, load_dir, load_text
from pilot.config.yaml_dir import walk_yaml

SE = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{host}]
  ports: [{{number: {port}, name: http}}]
"""


def se(name: str, host: str = "a.example.com", port: int = 80) -> str:
    return SE.format(name=name, host=host, port=port)


def test_multi_document_file_keeps_valid_documents(tmp_path: Path) -> None:
    text = "---\n" + se("one") + "---\n" + se("two", port=0) + "---\n# only a comment\n---\n" + se("three")
    (tmp_path / "mesh.yaml").write_text(text)
    result = load_dir(tmp_path)
    assert [o.metadata.name for o in result.objects] == ["one", "three"]
    (err,) = result.errors
    assert (err.file, err.index, err.kind, err.namespace, err.name) == (
        "mesh.yaml",
        1,
        "ServiceEntry",
        "default",
        "two",
    )
    assert "spec.ports[0].number: must be between 1 and 65535" in err.message


def test_yaml_syntax_error_costs_only_its_document() -> None:
    text = se("one") + "---\nkind: [unclosed\n---\n" + se("three")
    result = load_text(text, "x.yaml")
    assert [o.metadata.name for o in result.objects] == ["one", "three"]
    assert result.errors[0].index == 1 and "invalid YAML" in result.errors[0].message


def test_suffixes_subdirectories_and_dotfiles(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yml").write_text(se("a"))
    (tmp_path / "sub" / "b.yaml").write_text(se("b"))
    (tmp_path / ".hidden.yaml").write_text(se("hidden"))
    (tmp_path / "notes.txt").write_text(se("txt"))
    assert sorted(o.metadata.name for o in load_dir(tmp_path).objects) == ["a", "b"]


def test_duplicate_object_keeps_first_and_reports_second(tmp_path: Path) -> None:
    (tmp_path / "1.yaml").write_text(se("dup", port=80))
    (tmp_path / "2.yaml").write_text(se("dup", port=81))
    result = load_dir(tmp_path)
    assert [o.to_dict()["spec"]["ports"][0]["number"] for o in result.objects] == [80]
    assert result.errors[0].file == "2.yaml" and "already defined at 1.yaml[0]" in result.errors[0].message


def test_unreadable_and_missing(tmp_path: Path) -> None:
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    assert "cannot read" in load_dir(tmp_path).errors[0].message
    assert load_dir(tmp_path / "nope").errors[0].message == "not a directory"


def test_sync_applies_to_store_with_errors(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(se("a") + "---\n" + se("bad", port=0))
    store = ConfigStore()
    source = FileSource(store, tmp_path, source_id="files")
    assert source.sync() is True
    assert [o.metadata.name for o in store.objects()] == ["a"]
    assert [r["name"] for r in store.debug_dump()["rejected"]] == ["bad"]


async def _until(predicate: Callable[[], object], timeout: float = 1.5) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "change not picked up in time"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("watch", ["events", "poll"])
async def test_watch_picks_up_add_change_fix_and_delete(tmp_path: Path, watch: Literal["events", "poll"]) -> None:
    store = ConfigStore()
    # With events, sweeps are a minute apart: only file events can make the deadlines.
    source = FileSource(store, tmp_path, interval=0.05, watch=watch, rescan=60, settle=0.2)
    task = asyncio.create_task(source.run())
    try:
        def names() -> list[str]:
            return sorted(o.metadata.name for o in store.objects())

        (tmp_path / "a.yaml").write_text(se("a"))
        await _until(lambda: names() == ["a"])
        (tmp_path / "b.yaml").write_text(se("b", port=0))  # bad at first
        await _until(lambda: len(store.debug_dump()["rejected"]) == 1)
        assert names() == ["a"]
        (tmp_path / "b.yaml").write_text(se("b", port=81))  # fixed
        await _until(lambda: names() == ["a", "b"])
        assert store.debug_dump()["rejected"] == []
        # Atomic replace, as editors do: write elsewhere, rename over.
        (tmp_path / ".a.tmp").write_text(se("a2"))
        os.replace(tmp_path / ".a.tmp", tmp_path / "a.yaml")
        await _until(lambda: names() == ["a2", "b"])
        (tmp_path / "b.yaml").unlink()
        await _until(lambda: names() == ["a2"])
    finally:
        task.cancel()
    assert source.failures == 0


async def test_unchanged_files_cause_no_revision(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(se("a"))
    store = ConfigStore()
    source = FileSource(store, tmp_path, interval=0.02)
    source.sync()
    rev = store.revision
    task = asyncio.create_task(source.run())
    await asyncio.sleep(0.2)
    task.cancel()
    assert store.revision == rev


async def test_touching_a_file_asks_for_a_rebuild_but_rechecks_do_not(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(se("a"))
    store = ConfigStore()
    source = FileSource(store, tmp_path, interval=0.02)
    source.sync()
    rev = store.revision
    (tmp_path / "note.yaml").write_text("# only a comment\n")
    assert source.sync() is True
    assert store.revision == rev + 1
    assert source.sync() is False, "re-reading recently written files is not a new change"
    assert store.revision == rev + 1


async def test_a_replaced_directory_is_watched_again(tmp_path: Path) -> None:
    """A watch follows the old directory; the sweep notices the new one and re-arms on it."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "a.yaml").write_text(se("a"))
    store = ConfigStore()
    source = FileSource(store, config, rescan=0.2, settle=0.2)
    source.sync()
    task = asyncio.create_task(source.run())
    try:
        def names() -> list[str]:
            return sorted(o.metadata.name for o in store.objects())

        await asyncio.sleep(0.1)  # let the watch arm on the first directory
        replacement = tmp_path / "next"
        replacement.mkdir()
        (replacement / "b.yaml").write_text(se("b"))
        config.rename(tmp_path / "old")
        replacement.rename(config)
        await _until(lambda: names() == ["b"])
        (config / "c.yaml").write_text(se("c", host="c.example.com"))
        await _until(lambda: names() == ["b", "c"])
    finally:
        task.cancel()
    assert source.failures == 0


async def test_without_file_events_the_source_polls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise OSError("inotify watch limit reached")

    monkeypatch.setattr(files, "RustNotify", unavailable)
    store = ConfigStore()
    source = FileSource(store, tmp_path, interval=0.02, rescan=60)
    task = asyncio.create_task(source.run())
    try:
        (tmp_path / "a.yaml").write_text(se("a"))
        await _until(lambda: [o.metadata.name for o in store.objects()] == ["a"])
    finally:
        task.cancel()
    assert "file events unavailable (inotify watch limit reached); polling every 20 ms" in caplog.text


async def test_an_edit_named_by_file_events_is_read_without_walking_the_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Events name the edited file: the source reuses its last listing and stat()s that file only.
    A new file, a removed one and a directory moved away need the walk, and get it."""
    config = tmp_path / "config"
    (config / "sub").mkdir(parents=True)
    for i in range(20):
        (config / f"s{i:02d}.yaml").write_text(se(f"s{i:02d}", host=f"s{i}.example.com"))
    (config / "sub" / "deep.yaml").write_text(se("deep", host="deep.example.com"))
    walks: list[Path] = []
    real_walk = walk_yaml

    def counting(directory: Path) -> Any:
        walks.append(directory)
        return real_walk(directory)

    monkeypatch.setattr(files, "walk_yaml", counting)
    store = ConfigStore()
    source = FileSource(store, config, rescan=60)  # no periodic sweep in this test: events only

    def ports() -> dict[str, int]:
        objects: list[Any] = list(store.objects())
        return {o.metadata.name: o.spec.ports[0].number for o in objects}

    task = asyncio.create_task(source.run())
    try:
        await _until(lambda: len(store.objects()) == 21)
        await asyncio.sleep(0.2)
        walked = len(walks)
        temporary = config / "s03.yaml.tmp"  # written beside, then renamed over (an atomic edit)
        temporary.write_text(se("s03", host="s3.example.com", port=8080))
        temporary.rename(config / "s03.yaml")
        await _until(lambda: ports()["s03"] == 8080)
        (config / "s07.yaml").write_text(se("s07", host="s7.example.com", port=9090))  # in place
        await _until(lambda: ports()["s07"] == 9090)
        assert len(walks) == walked, "an edit of known files walked the directory"
        (config / "new.yaml").write_text(se("new", host="new.example.com"))
        await _until(lambda: "new" in ports())
        (config / "s11.yaml").unlink()
        await _until(lambda: "s11" not in ports(), timeout=3)  # a removal waits for the settle time
        (config / "sub").rename(tmp_path / "elsewhere")  # a directory moved away: its file goes
        await _until(lambda: "deep" not in ports(), timeout=3)
        assert len(walks) > walked
    finally:
        task.cancel()
    assert source.failures == 0
    assert ports()["s03"] == 8080 and len(store.objects()) == 20


async def test_the_safety_sweep_waits_while_pilot_pushes_but_file_events_do_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep (a walk of the directory) only catches what events missed: while `busy` says pilot
    is writing a push it waits, at most `SWEEP_DEFERRAL`; an edit named by an event is read at once."""
    (tmp_path / "a.yaml").write_text(se("a"))
    walks: list[float] = []
    real_walk = walk_yaml

    def counting(directory: Path) -> Any:
        walks.append(0.0)
        return real_walk(directory)

    monkeypatch.setattr(files, "walk_yaml", counting)
    pushing = [True]
    store = ConfigStore()
    source = FileSource(store, tmp_path, rescan=0.05, settle=0.05, busy=lambda: pushing[0])
    task = asyncio.create_task(source.run())
    def names() -> list[str]:
        return sorted(o.metadata.name for o in store.objects())

    try:
        await _until(lambda: names() == ["a"])  # the first reload, when the watch is armed, walks
        await asyncio.sleep(0.3)  # the files settle; no sweep may run from here while pushing
        before = len(walks)
        (tmp_path / "b.yaml").write_text(se("b", host="b.example.com"))  # a new file: events name it
        await _until(lambda: names() == ["a", "b"])
        after_event = len(walks)  # a new file needs a walk: the event reload made it
        await asyncio.sleep(0.5)  # ten sweep periods while pushing
        assert len(walks) == after_event and after_event <= before + 1
        pushing[0] = False  # quiet again: the sweeps resume
        await _until(lambda: len(walks) > after_event)
        # Pushes that never stop hold the sweep back for SWEEP_DEFERRAL at most.
        pushing[0] = True
        monkeypatch.setattr(files, "SWEEP_DEFERRAL", 0.2)
        resumed = len(walks)
        await _until(lambda: len(walks) >= resumed + 2)
    finally:
        task.cancel()
    assert source.failures == 0
