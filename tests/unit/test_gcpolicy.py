"""The pilot process's GC tuning: thresholds raised, start-up objects frozen, 0 keeps the default."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from pilot.gcpolicy import tune_gc
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

