"""Good config is never lost to bad input, and limits are enforced with clear errors.

Per object: an invalid new version leaves the last good version serving. Per file: a file caught
mid-write, truncated, emptied or removed removes nothing until it has been stable for the settle
time, and a file that does not parse removes nothing at all. Symlink loops are reported once.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from pilot.api import ApiObject, parse_object
from pilot.config import ConfigStore, DocumentError, FileSource, load_dir
from pilot.config.yaml_text import MAX_DOCUMENT_BYTES, identify

SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec: {{hosts: [{name}.example.com], ports: [{{number: {port}, name: http, protocol: HTTP}}]}}
"""
SETTLE = 0.2


def se(name: str, port: int = 80) -> str:
    return SE.format(name=name, port=port)


def obj(name: str, port: int = 80) -> ApiObject:
    import yaml

    return parse_object(yaml.safe_load(se(name, port)))


def port_of(store: ConfigStore, name: str) -> int | None:
    found = store.get("ServiceEntry", "default", name)
    return None if found is None else int(found.to_dict()["spec"]["ports"][0]["number"])


def names(store: ConfigStore) -> list[str]:
    return sorted(o.metadata.name for o in store.objects())


def settled(source: FileSource) -> bool:
    """Sync after the settle time has passed with no change to the files."""
    time.sleep(source.settle)
    return source.sync()


# ---- per object: the store keeps the last good version ----

def test_store_keeps_the_last_good_version_of_a_rejected_object() -> None:
    store = ConfigStore()
    store.replace_source("files", [obj("a"), obj("b")])
    rev = store.revision
    bad = DocumentError("m.yaml", 0, "ServiceEntry", "default", "a", "ServiceEntry default/a: spec.ports[0]: bad")
    assert store.replace_source("files", [obj("b")], [bad]) is False, "nothing changed for the mesh"
    assert store.revision == rev and port_of(store, "a") == 80
    assert store.serving_previous("files") == {("ServiceEntry", "default", "a"): bad}
    dump = store.debug_dump()
    (rejected,) = dump["rejected"]
    assert rejected["serving_previous_version"] is True
    assert rejected["message"].endswith("spec.ports[0]: bad; serving the previous version")
    entry = next(o for o in dump["objects"] if o["name"] == "a")
    assert entry["serving_previous_version"] is True and "spec.ports[0]: bad" in entry["rejected_update"]
    # Still invalid on the next load: still served. Fixed: the new version serves.
    assert store.replace_source("files", [obj("b")], [bad]) is False and port_of(store, "a") == 80
    assert store.replace_source("files", [obj("a", 81), obj("b")]) is True and port_of(store, "a") == 81
    assert store.serving_previous("files") == {}
    # The document gone altogether (no error names it): the object goes.
    assert store.replace_source("files", [obj("b")]) is True and names(store) == ["b"]


def test_store_invents_nothing_for_an_object_that_was_never_valid() -> None:
    store = ConfigStore()
    bad = DocumentError("m.yaml", 0, "ServiceEntry", "default", "new", "ServiceEntry default/new: bad")
    store.replace_source("files", [obj("b")], [bad])
    assert names(store) == ["b"]
    (rejected,) = store.debug_dump()["rejected"]
    assert rejected["serving_previous_version"] is False and "serving" not in rejected["message"]


def test_a_live_object_edited_to_be_invalid_keeps_serving_and_the_log_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(se("a") + "---\n" + se("b"))
    store = ConfigStore()
    source = FileSource(store, tmp_path, settle=SETTLE)
    source.sync()
    path.write_text(se("a", port=0) + "---\n" + se("b", port=82))
    caplog.set_level(logging.WARNING)
    source.sync()
    assert port_of(store, "b") == 80, "a file holding a rejected document waits until it is stable"
    settled(source)
    assert port_of(store, "a") == 80 and port_of(store, "b") == 82
    (line,) = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert "ServiceEntry default/a" in line and "must be between 1 and 65535" in line
    assert line.endswith("serving the previous version")
    assert store.debug_dump()["rejected"][0]["serving_previous_version"] is True
    source.sync()
    settled(source)
    assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 1, "reported once"


# ---- per file: removals wait until the file is stable ----

def test_a_truncated_file_removes_nothing_until_stable_and_a_rewrite_in_time_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(se("a") + "---\n" + se("b"))
    store = ConfigStore()
    source = FileSource(store, tmp_path, settle=SETTLE)
    source.sync()
    rev = store.revision
    path.write_text("")  # truncated in place
    source.sync()
    assert names(store) == ["a", "b"] and store.revision == rev
    assert source.waiting == ["m.yaml"]
    path.write_text(se("a") + "---\n" + se("b"))  # rewritten within the settle time
    source.sync()
    settled(source)
    assert names(store) == ["a", "b"] and source.waiting == []  # (the rewrite asks for a rebuild: a touch)


def test_an_emptied_file_removes_its_objects_once_stable_and_warns_when_all_are_gone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(se("a"))
    store = ConfigStore()
    source = FileSource(store, tmp_path, settle=SETTLE)
    source.sync()
    path.write_text("")
    source.sync()
    assert names(store) == ["a"]
    assert settled(source) is True
    assert names(store) == [] and source.waiting == []
    assert any("every object it defined is removed (1)" in r.getMessage() for r in caplog.records)


def test_a_shrinking_file_applies_its_new_objects_at_once_and_its_removals_once_stable(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(se("a") + "---\n" + se("b"))
    store = ConfigStore()
    source = FileSource(store, tmp_path, settle=SETTLE)
    source.sync()
    path.write_text(se("a", port=81) + "---\n" + se("c"))  # b renamed to c, a edited
    source.sync()
    assert names(store) == ["a", "b", "c"] and port_of(store, "a") == 81
    settled(source)
    assert names(store) == ["a", "c"]


def test_a_removed_file_is_removed_once_its_absence_is_stable(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(se("a"))
    (tmp_path / "b.yaml").write_text(se("b"))
    store = ConfigStore()
    source = FileSource(store, tmp_path, settle=SETTLE)
    source.sync()
    (tmp_path / "b.yaml").unlink()
    source.sync()
    assert names(store) == ["a", "b"]
    settled(source)
    assert names(store) == ["a"]


def test_a_file_caught_mid_write_is_not_pushed_and_removed_mid_write_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(se("a"))
    store = ConfigStore()
    source = FileSource(store, tmp_path, settle=SETTLE)
    source.sync()
    full = se("b") + "---\n" + se("c")
    partial = full[: full.index("spec", len(se("b")))]  # b complete, c cut before its spec
    (tmp_path / "new.yaml").write_text(partial)
    assert source.sync() is False
    assert names(store) == ["a"] and store.debug_dump()["rejected"] == []
    (tmp_path / "new.yaml").unlink()  # the writer gave up
    source.sync()
    settled(source)
    assert names(store) == ["a"] and store.debug_dump()["rejected"] == []
    assert source.waiting == []


def test_a_file_that_does_not_parse_removes_nothing_even_once_stable(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(se("a") + "---\n" + se("b"))
    store = ConfigStore()
    source = FileSource(store, tmp_path, settle=SETTLE)
    source.sync()
    path.write_text(se("a", port=81) + "---\nkind: [unclosed\n")
    source.sync()
    settled(source)
    assert names(store) == ["a", "b"] and port_of(store, "a") == 81
    (line,) = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert "invalid YAML" in line and "the objects it defined before keep serving (1)" in line
    path.write_text(se("a", port=81))  # fixed, and b deliberately removed
    source.sync()
    settled(source)
    assert names(store) == ["a"]


def test_the_first_load_applies_everything_at_once(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(se("a") + "---\n" + se("bad", port=0))
    store = ConfigStore()
    source = FileSource(store, tmp_path, settle=60)
    source.sync()
    assert names(store) == ["a"] and len(store.debug_dump()["rejected"]) == 1


async def test_the_watch_applies_a_removal_once_the_file_settles_without_further_events(tmp_path: Path) -> None:
    import asyncio

    (tmp_path / "a.yaml").write_text(se("a"))
    (tmp_path / "b.yaml").write_text(se("b"))
    store = ConfigStore()
    source = FileSource(store, tmp_path, settle=SETTLE, rescan=60)  # no safety sweep to help
    source.sync()
    task = asyncio.create_task(source.run())
    try:
        await asyncio.sleep(0.1)
        (tmp_path / "b.yaml").unlink()
        for _ in range(100):
            if names(store) == ["a"]:
                break
            await asyncio.sleep(0.05)
        assert names(store) == ["a"]
    finally:
        task.cancel()


# ---- symlink loops ----

def test_a_directory_symlink_loop_is_walked_once_and_reported_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.yaml").write_text(se("a"))
    os.symlink("..", tmp_path / "sub" / "up")  # sub/up -> the config directory again
    os.symlink("self", tmp_path / "self")  # a link to itself
    result = load_dir(tmp_path)
    assert [o.metadata.name for o in result.objects] == ["a"]
    assert sorted((e.file, e.message) for e in result.errors) == [
        ("self", "not followed: [Errno 40] Too many levels of symbolic links: "
                 f"'{tmp_path / 'self'}'"),
        (os.path.join("sub", "up"), "symlink loop: it is . again; not followed"),
    ]
    store = ConfigStore()
    source = FileSource(store, tmp_path, settle=0)
    caplog.set_level(logging.WARNING)
    source.sync()
    (tmp_path / "sub" / "b.yaml").write_text(se("b"))
    source.sync()
    source.sync()
    assert names(store) == ["a", "b"]
    loops = [r.getMessage() for r in caplog.records if "symlink loop" in r.getMessage()]
    assert len(loops) == 1, loops
    assert not any("already defined" in r.getMessage() for r in caplog.records)


def test_a_directory_linked_twice_is_read_once(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "a.yaml").write_text(se("a"))
    os.symlink("shared", tmp_path / "twin")
    result = load_dir(tmp_path)
    assert [o.metadata.name for o in result.objects] == ["a"]
    assert [(e.file, e.message) for e in result.errors] == [("twin", "same directory as shared; not read twice")]


# ---- limits ----

def big_virtual_service(name: str, routes: int, pad: int = 0) -> str:
    lines = ["apiVersion: networking.istio.io/v1", "kind: VirtualService",
             f"metadata: {{name: {name}, namespace: default}}", "spec:", "  hosts: [a.example.com]", "  http:"]
    route = "    route: [{destination: {host: a.example.com}}]"
    lines += [f"  - match: [{{uri: {{exact: /p{i}{'x' * pad}}}}}]\n{route}" for i in range(routes)]
    return "\n".join(lines) + "\n"


def test_a_document_over_the_kubernetes_object_size_is_rejected_and_the_previous_version_serves(
        tmp_path: Path) -> None:
    path = tmp_path / "vs.yaml"
    path.write_text(se("a") + "---\n" + big_virtual_service("big", 3))
    store = ConfigStore()
    source = FileSource(store, tmp_path, settle=0)
    source.sync()
    assert store.get("VirtualService", "default", "big") is not None
    huge = big_virtual_service("big", 200_000)
    assert len(huge) > 10 * MAX_DOCUMENT_BYTES
    path.write_text(se("a") + "---\n" + huge)
    source.sync()
    (err,) = store.debug_dump()["rejected"]
    assert (err["file"], err["index"], err["kind"], err["name"]) == ("vs.yaml", 1, "VirtualService", "big")
    assert err["message"].startswith("VirtualService default/big: document is ")
    assert "over the 1.5 MiB limit of a Kubernetes object" in err["message"]
    assert err["message"].endswith("serving the previous version")
    found = store.get("VirtualService", "default", "big")
    assert found is not None and len(found.to_dict()["spec"]["http"]) == 3


def test_a_document_just_under_the_size_limit_is_accepted() -> None:
    from pilot.config import load_text

    text = big_virtual_service("v", 5_000, pad=200)
    assert 0.9 * MAX_DOCUMENT_BYTES < len(text) < MAX_DOCUMENT_BYTES
    result = load_text(text)
    assert result.errors == () and len(result.objects) == 1


def test_a_list_over_the_per_list_limit_is_rejected_naming_the_field() -> None:
    from pilot.config import load_text

    hosts = ", ".join(f"h{i}.example.com" for i in range(10_001))
    text = se("many").replace("hosts: [many.example.com]", f"hosts: [{hosts}]")
    result = load_text(text, "m.yaml")
    (err,) = result.errors
    assert (err.kind, err.namespace, err.name) == ("ServiceEntry", "default", "many")
    assert err.message == ("ServiceEntry default/many: spec.hosts: 10,001 entries, over the limit of 10,000 per list")


def test_files_past_the_total_limit_are_not_loaded_and_remove_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(se("a"))
    (tmp_path / "b.yaml").write_text(se("b"))
    store = ConfigStore()
    source = FileSource(store, tmp_path, settle=0, max_total_bytes=3 * len(se("b")) + 10)
    source.sync()
    assert names(store) == ["a", "b"]
    (tmp_path / "b.yaml").write_text(se("b") + "---\n" + se("c") + "---\n" + se("d"))
    source.sync()
    assert names(store) == ["a", "b"]
    (err,) = store.debug_dump()["rejected"]
    assert err["file"] == "b.yaml" and "exceed the total limit of" in err["message"]
    assert "file_max_total_mb" in err["message"]
    (tmp_path / "b.yaml").write_text(se("b") + "---\n" + se("c"))  # back under the limit
    source.sync()
    assert names(store) == ["a", "b", "c"] and store.debug_dump()["rejected"] == []


def test_identify_reads_kind_and_name_without_loading_the_document() -> None:
    assert identify("apiVersion: v\nkind: VirtualService\nmetadata:\n  name: x\n  labels: {name: y}\n") == (
        "VirtualService", "default", "x")
    assert identify("kind: Gateway\nspec: {a: [1, {b: c}]}\nmetadata: {namespace: ns, name: gw}\n") == (
        "Gateway", "ns", "gw")
    assert identify("kind: Gateway\nmetadata: {labels: {name: x}}\n") == ("Gateway", None, None)
    assert identify("kind: [unclosed") == (None, None, None)


# ---- memory: nothing of a removed config stays referenced ----

async def test_a_removed_virtual_service_is_no_longer_referenced_by_pilot(tmp_path: Path) -> None:
    """The build's memos let go of objects a build no longer used (`Conversions.end_build`), also in
    stages whose inputs do not change again; RSS is checked end to end in the e2e test."""
    import asyncio
    import gc

    from pilot.app import Pilot
    from pilot.settings import PilotSettings

    (tmp_path / "a.yaml").write_text(se("a"))
    (tmp_path / "vs.yaml").write_text(big_virtual_service("gone", 50))
    settings = PilotSettings(ads_port=0, debug_port=0, config_dir=tmp_path, debounce_ms=10, file_settle_ms=100)
    async with Pilot(settings) as pilot:
        def alive() -> int:
            gc.collect()
            return sum(1 for o in gc.get_objects()
                       if type(o).__name__ == "VirtualService" and getattr(o, "metadata", None) is not None
                       and o.metadata.name == "gone")

        assert alive() >= 1
        revision = pilot.store.revision
        (tmp_path / "vs.yaml").unlink()
        await asyncio.wait_for(pilot.store.wait_for_change(revision), 10)
        await asyncio.wait_for(pilot.pusher.wait_built(pilot.store.revision), 10)
        assert pilot.store.get("VirtualService", "default", "gone") is None
        assert alive() == 0
