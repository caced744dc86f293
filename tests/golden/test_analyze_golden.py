"""Golden tests for `meshctl analyze`: one directory per check, ``analyze/<check>/input.yaml`` and
``expected.txt``, what ``meshctl analyze -f input.yaml`` prints (run from the case directory, so
origins read ``input.yaml[N]``). Every check in `pilot.analysis.CHECKS` must have a case, every
case must be a check, and each case's check must report something of its own codes on its input.
Regenerate with ``pytest tests/golden/test_analyze_golden.py --update-goldens`` and review the diff.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from meshctl.analyze import EXIT_FOUND_ISSUES
from meshctl.cli import cli
from pilot.analysis import CHECKS, Level, analyze
from pilot.analysis.load import Collector, add_paths

CASES = Path(__file__).parent / "analyze"


def cases() -> list[str]:
    return sorted(p.name for p in CASES.iterdir() if p.is_dir())


def test_every_check_has_a_case_and_every_case_a_check() -> None:
    assert sorted(CHECKS) == cases()
    missing = [c for c in cases() if not (CASES / c / "input.yaml").is_file()]
    assert not missing, f"cases without input.yaml: {missing}"


@pytest.mark.parametrize("case", cases())
def test_check_reports_its_own_codes(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES / case)
    collector = Collector()
    add_paths(collector, ["input.yaml"])
    codes, _ = CHECKS[case]
    found = analyze(collector.result(), only=[case])
    assert found, f"check {case} reports nothing on its own golden input"
    assert {m.type for m in found} <= set(codes)


@pytest.mark.parametrize("case", cases())
def test_analyze_matches_golden(case: str, update_goldens: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES / case)
    result = CliRunner().invoke(cli, ["analyze", "-f", "input.yaml"], catch_exceptions=False)
    assert result.exit_code in (0, EXIT_FOUND_ISSUES), result.output
    errors = any(line.startswith(f"{Level.ERROR.label} [") for line in result.output.splitlines())
    assert (result.exit_code == EXIT_FOUND_ISSUES) == errors, result.output
    golden = CASES / case / "expected.txt"
    if update_goldens:
        golden.write_text(result.output)
        return
    assert golden.exists(), f"no golden for {case}: run with --update-goldens"
    assert result.output == golden.read_text()
