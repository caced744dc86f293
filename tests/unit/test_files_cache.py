"""The file source parses a file again only when its bytes change."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from pilot.config import files
from pilot.config.files import FileSource, ParseCache, load_dir_cached
from pilot.config.store import ConfigStore

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
    real = files._parse_file

    def counting(file: Path, name: str, cached: Any) -> Any:
        read.append(name)
        return real(file, name, cached)

    monkeypatch.setattr(files, "_parse_file", counting)
    (tmp_path / "s07.yaml").write_text(SE.format(name="renamed"))
    source.sync()
    assert read == ["s07.yaml"]
    assert store.get("ServiceEntry", "default", "renamed") is not None
    assert store.get("ServiceEntry", "default", "s08") is not None  # the others stay, unread
