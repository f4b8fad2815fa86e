"""Every folder in tests/bad_configs holds one broken mailgate.toml (plus the files it names)
and an `expected` regex: `mailgate check-config` must exit non-zero and print exactly one line on
stderr, which the regex matches in full. Runs the command in-process through cli.main, on a copy
of the folder (check-config may leave SQLite's -wal/-shm files behind)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from mailgate import cli

BAD_CONFIGS = Path(__file__).resolve().parent.parent / "bad_configs"
CASES = sorted(p.name for p in BAD_CONFIGS.iterdir() if (p / "mailgate.toml").is_file())


def test_the_cases_are_there() -> None:
    assert len(CASES) >= 11
    for name in CASES:
        assert (BAD_CONFIGS / name / "expected").is_file(), name


@pytest.mark.parametrize("name", CASES)
def test_check_config_names_the_problem(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / name
    shutil.copytree(BAD_CONFIGS / name, folder)
    expected = (folder / "expected").read_text(encoding="utf-8").strip()

    status = cli.main(["-c", str(folder / "mailgate.toml"), "check-config"])

    out, err = capsys.readouterr()
    assert status != 0
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert re.fullmatch(expected, lines[0]), f"{lines[0]!r} does not match {expected!r}"
