"""The file source parses a file again only when its bytes change."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from pilot.config import yaml_dir
from pilot.config.files import FileSource
from pilot.config.store import ConfigStore
from pilot.config.yaml_dir import ParseCache, load_dir_cached

SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec: {{hosts: [{name}.example.com], ports: [{{number: 80, name: http, protocol: HTTP}}]}}
"""


def test_unchanged_bytes_reuse_the_parse_and_changed_bytes_reparse(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SE.format(name="a"))
    (tmp_path / "b.yaml").write_text(SE.format(name="b"))
    cache: ParseCache = {}
    first, changed = load_dir_cached(tmp_path, cache)
    assert changed and [o.key[2] for o in first.objects] == ["a", "b"]
    entry_a, entry_b = cache["a.yaml"], cache["b.yaml"]

    (tmp_path / "a.yaml").write_text(SE.format(name="a"))  # same bytes, new mtime
    again, changed = load_dir_cached(tmp_path, cache)
    assert not changed and cache["a.yaml"] is entry_a and again.objects == first.objects

    (tmp_path / "b.yaml").write_text(SE.format(name="c"))
    third, changed = load_dir_cached(tmp_path, cache)
    assert changed and cache["a.yaml"] is entry_a and cache["b.yaml"] is not entry_b
    assert [o.key[2] for o in third.objects] == ["a", "c"]

    (tmp_path / "a.yaml").unlink()
    fourth, changed = load_dir_cached(tmp_path, cache)
    assert changed and set(cache) == {"b.yaml"} and [o.key[2] for o in fourth.objects] == ["c"]


def test_a_change_to_one_file_of_many_reads_that_file_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source reads files whose stat changed (or is too recent to trust), not the whole directory."""
    old = time.time() - 60
    for i in range(30):
        path = tmp_path / f"s{i:02d}.yaml"
        path.write_text(SE.format(name=f"s{i:02d}"))
        os.utime(path, (old, old))
    store = ConfigStore()
    source = FileSource(store, tmp_path)
    source.sync()
    read: list[str] = []
    real = yaml_dir._parse_file

    def counting(file: Path, name: str, cached: Any) -> Any:
        read.append(name)
        return real(file, name, cached)

    monkeypatch.setattr(yaml_dir, "_parse_file", counting)
    (tmp_path / "s07.yaml").write_text(SE.format(name="renamed"))
    source.sync()
    assert read == ["s07.yaml"]
    assert store.get("ServiceEntry", "default", "renamed") is not None
    assert store.get("ServiceEntry", "default", "s08") is not None  # the others stay, unread


def _doc(name: str, port: int = 80) -> str:
    return SE.replace("number: 80", f"number: {port}").format(name=name)


def test_edits_in_place_patch_the_merge_and_every_reload_equals_a_fresh_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file rewritten with the same objects (specs edited) patches the last merge and hands the
    store only the keys it changed; any other change (an object added, removed or defined twice, a
    rejected document) merges every file again. Through a random walk of such edits, what the
    source hands the store equals a fresh load of the directory."""
    import random

    from pilot.config.yaml_dir import load_dir

    rng = random.Random(5)
    contents = {f"f{i}.yaml": [f"s{i}a", f"s{i}b"] for i in range(8)}
    ports = {name: 80 for names in contents.values() for name in names}

    def write(file: str, bad: bool = False) -> None:
        docs = [_doc(n, ports[n]) for n in contents[file]]
        if bad:
            docs.append(_doc("broken", port=0))  # port 0: a rejected document
        (tmp_path / file).write_text("---\n".join(docs))

    for file in contents:
        write(file)
    store = ConfigStore()
    source = FileSource(store, tmp_path, settle=0)
    source.sync()
    hints: list[Any] = []
    real = store.replace_source

    def recording(source_id: str, objects: Any, errors: Any = (), changed: Any = None) -> bool:
        hints.append(changed)
        return real(source_id, objects, errors, changed)

    monkeypatch.setattr(store, "replace_source", recording)
    kinds_seen = set()
    for step in range(120):
        file = rng.choice(sorted(contents))
        choice = rng.choice(["spec", "spec", "spec", "add", "remove", "duplicate", "reject"])
        names = contents[file]
        if choice == "spec":
            name = rng.choice(names)
            ports[name] = rng.choice([80, 81, 82, 83])
        elif choice == "add":
            names.append(f"n{step}")
            ports[f"n{step}"] = 80
        elif choice == "remove" and len(names) > 1:
            names.remove(rng.choice(names))
        elif choice == "duplicate":
            other = rng.choice([n for f, ns in contents.items() if f != file for n in ns])
            if other not in names:
                names.append(other)
        write(file, bad=choice == "reject")
        hints.clear()
        source.sync()
        fresh = load_dir(tmp_path)
        assert source.last_result == fresh, (step, choice)
        assert sorted(o.key for o in store.objects()) == sorted({o.key for o in fresh.objects}), (step, choice)
        for obj in fresh.objects:
            assert store.get(*obj.key) == obj, (step, choice)
        if hints and hints[-1] is not None:
            kinds_seen.add(choice)
            # Only the rewritten file's objects (re-parsed: new instances; the store keeps equal ones).
            assert choice == "spec" and {k[2] for k in hints[-1]} <= set(names), (step, choice, hints)
        elif hints:
            kinds_seen.add(f"full {choice}")
    assert "spec" in kinds_seen  # the patched path ran
    assert {"full add", "full duplicate", "full reject"} <= kinds_seen  # and the full merge did
