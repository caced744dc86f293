"""The pilot process's GC tuning (thresholds raised, start-up objects frozen, 0 keeps the default)
and its allocator (glibc, or jemalloc on request; the operator's choice kept)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from pilot.gcpolicy import (
    JEMALLOC_CONF,
    QUIET_MINIMUM,
    allocator_environment,
    collect_when_quiet,
    find_jemalloc,
    forget_preload,
    tune_gc,
)
from pilot.settings import PilotSettings


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restore_gc")
def test_tune_gc_raises_the_young_threshold_and_freezes_what_exists() -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    survivor = [object()]  # alive across the freeze

    previous = tune_gc(50_000)

    assert previous == before
    assert gc.get_threshold() == (50_000, before[1], before[2])
    assert gc.get_freeze_count() > 0
    assert not any(o is survivor for o in gc.get_objects())  # frozen: no collection scans it again


@pytest.mark.usefixtures("restore_gc")
def test_zero_keeps_pythons_thresholds() -> None:
    before = gc.get_threshold()
    tune_gc(0)
    assert gc.get_threshold() == before


def test_the_threshold_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert PilotSettings().gc_young_threshold == 50_000
    monkeypatch.setenv("MESHCTL_PILOT_GC_YOUNG_THRESHOLD", "0")
    assert PilotSettings().gc_young_threshold == 0



class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """The automatic collector off, so allocation counts are what the test made them."""
    was, thresholds = gc.isenabled(), gc.get_threshold()
    gc.collect()
    gc.disable()
    yield
    gc.set_threshold(*thresholds)
    if was:
        gc.enable()


@pytest.mark.usefixtures("no_automatic_gc")
def test_a_quiet_moment_collects_the_cycles_left_by_a_burst_and_then_nothing_until_the_next() -> None:
    cycle = _Cycle()
    gone = weakref.ref(cycle)
    del cycle
    kept: list[list[object]] = [[] for _ in range(QUIET_MINIMUM)]  # a burst of allocations (tracked lists)
    assert gc.get_count()[0] >= QUIET_MINIMUM and gone() is not None
    assert collect_when_quiet() == 1
    assert gone() is None  # reference counting alone never frees a cycle
    assert gc.get_count()[:2] == (0, 0)  # the next push starts the collector's counts from zero
    assert collect_when_quiet() is None  # the second quiet moment right after: nothing to do
    del kept


@pytest.mark.usefixtures("no_automatic_gc")
def test_a_quiet_moment_collects_everything_when_the_collector_would_have_done_so_next() -> None:
    gc.set_threshold(700, 10, 3)  # a full collection after every third middle one
    done = []
    kept: list[object] = []
    for _ in range(6):
        kept.append([[] for _ in range(QUIET_MINIMUM)])
        done.append(collect_when_quiet())
    assert done == [1, 1, 2, 1, 1, 2]


def test_pilot_collects_and_releases_when_its_streams_go_quiet() -> None:
    from pilot.app import Pilot
    from pilot.gcpolicy import release_when_quiet

    pilot = Pilot(PilotSettings())
    assert pilot.pusher.release_memory is release_when_quiet
    assert pilot.ads.quiet is pilot.pusher.quiet  # one release, after the pushes' writes too


# ---- the allocator `meshctl up` runs under ----

JEMALLOC = "libjemalloc.so.2"


def test_jemalloc_is_preloaded_with_its_release_settings_by_default_where_installed() -> None:
    jemalloc = {"PATH": "/bin", "PYTHONMALLOC": "malloc", "LD_PRELOAD": JEMALLOC, "MALLOC_CONF": JEMALLOC_CONF,
                "MESHCTL_MALLOC": "jemalloc"}
    assert allocator_environment({"PATH": "/bin"}, JEMALLOC) == jemalloc  # installed, nothing asked for
    assert allocator_environment({"PATH": "/bin", "MESHCTL_MALLOC": "jemalloc"}, JEMALLOC) == jemalloc
    assert "background_thread:true" in JEMALLOC_CONF and "muzzy_decay_ms:0" in JEMALLOC_CONF
    assert "narenas:1" in JEMALLOC_CONF


def test_glibc_with_two_arenas_when_asked_for_or_without_jemalloc_or_with_another_preload() -> None:
    glibc = {"PYTHONMALLOC": "malloc", "MALLOC_ARENA_MAX": "2", "MESHCTL_MALLOC": "glibc"}
    assert allocator_environment({"MESHCTL_MALLOC": "glibc"}, JEMALLOC) == glibc  # installed, glibc asked for
    assert allocator_environment({}, None) == glibc  # not installed
    assert allocator_environment({"MESHCTL_MALLOC": "jemalloc"}, None) == glibc  # asked for, not installed
    preload = {"LD_PRELOAD": "libfoo.so", "MESHCTL_MALLOC": "jemalloc"}
    assert allocator_environment(preload, JEMALLOC) == {"LD_PRELOAD": "libfoo.so", **glibc}
    assert allocator_environment({"MALLOC_ARENA_MAX": "8"}, None) == {**glibc, "MALLOC_ARENA_MAX": "8"}
    assert allocator_environment({"MESHCTL_MALLOC": "glibc", "MALLOC_ARENA_MAX": "8"}, JEMALLOC) == {
        **glibc, "MALLOC_ARENA_MAX": "8"}


def test_the_operators_choices_are_kept() -> None:
    assert allocator_environment({"PYTHONMALLOC": "pymalloc"}, JEMALLOC) is None  # runs as it is
    conf = {"MALLOC_CONF": "narenas:2", "MESHCTL_MALLOC": "jemalloc"}
    assert allocator_environment(conf, JEMALLOC)["MALLOC_CONF"] == "narenas:2"  # type: ignore[index]


def test_an_allocator_name_that_is_neither_is_refused_not_taken_for_glibc() -> None:
    for environ in ({"MESHCTL_MALLOC": "jemaloc"}, {"MESHCTL_MALLOC": "", "PYTHONMALLOC": "malloc"}):
        with pytest.raises(ValueError, match=r"MESHCTL_MALLOC=.*expected one of jemalloc, glibc"):
            allocator_environment(environ, JEMALLOC)


def test_meshctl_up_says_which_setting_is_wrong_before_it_starts_anything(tmp_path: Path) -> None:
    env = {**os.environ, "MESHCTL_MALLOC": "jemaloc", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("PYTHONMALLOC", None)
    out = subprocess.run([sys.executable, "-m", "meshctl.cli", "up", "--config-dir", str(tmp_path)], check=False,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "MESHCTL_MALLOC='jemaloc': expected one of jemalloc, glibc" in out.stderr


def test_the_preload_is_not_passed_on_to_programs_pilot_starts() -> None:
    environ = {"MESHCTL_MALLOC": "jemalloc", "LD_PRELOAD": JEMALLOC, "PYTHONMALLOC": "malloc"}
    forget_preload(environ)
    assert "LD_PRELOAD" not in environ
    theirs = {"MESHCTL_MALLOC": "glibc", "LD_PRELOAD": "libfoo.so"}
    forget_preload(theirs)
    assert theirs["LD_PRELOAD"] == "libfoo.so"


@pytest.mark.parametrize("asked", ["jemalloc", "glibc"])
def test_a_process_re_executes_itself_under_the_allocator_it_chose(asked: str) -> None:
    """Real processes: the re-executed interpreter maps jemalloc (or not), releases memory through
    it, and its own environment no longer preloads it. CI installs Debian's libjemalloc2."""
    if asked == "jemalloc":
        assert find_jemalloc(), "jemalloc is not installed: apt-get install libjemalloc2 (CI does)"
    code = (
        "import os, sys, json\n"
        "from pilot.gcpolicy import allocator_in_use, choose_allocator, forget_preload, release_free_memory\n"
        "choose_allocator(['-c', sys.argv[-1], 'x'], os.environ)\n"  # returns only once re-executed
        "forget_preload(os.environ)\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(json.dumps({'in_use': allocator_in_use(os.environ), 'mapped': 'jemalloc' in maps,\n"
        "                  'released': release_free_memory(), 'preload': os.environ.get('LD_PRELOAD', '')}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "LD_PRELOAD", "MALLOC_CONF")}
    env.update(MESHCTL_MALLOC=asked, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, "-c", code, code], check=False, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen == {"in_use": asked, "mapped": asked == "jemalloc", "released": True, "preload": ""}
