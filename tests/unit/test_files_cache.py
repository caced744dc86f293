"""The file source parses a file again only when its bytes change."""

from __future__ import annotations

from pathlib import Path

from pilot.config.files import ParseCache, load_dir_cached

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
