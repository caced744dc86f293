"""Golden tests for `meshctl describe`: one directory per section kind, ``describe/<case>/input.yaml``,
``args`` (the command line after ``describe``, e.g. ``workload default/reviews-v2``) and
``expected.txt``, what ``meshctl describe <args> -f input.yaml`` prints (run from the case directory).
Regenerate with ``pytest tests/golden/test_describe_golden.py --update-goldens`` and review the diff.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshctl.cli import cli

CASES = Path(__file__).parent / "describe"


def cases() -> list[str]:
    return sorted(p.name for p in CASES.iterdir() if p.is_dir())


def test_every_case_is_complete() -> None:
    assert len(cases()) >= 10
    for case in cases():
        assert (CASES / case / "input.yaml").is_file(), case
        assert (CASES / case / "args").is_file(), case


@pytest.mark.parametrize("case", cases())
def test_describe_matches_golden(case: str, update_goldens: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(CASES / case)
    args = shlex.split((CASES / case / "args").read_text())
    result = CliRunner().invoke(cli, ["describe", *args, "-f", "input.yaml"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    golden = CASES / case / "expected.txt"
    if update_goldens:
        golden.write_text(result.output)
        return
    assert golden.exists(), f"no golden for {case}: run with --update-goldens"
    assert result.output == golden.read_text()
