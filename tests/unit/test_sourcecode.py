"""The quality gates as tests (uvloop's test_sourcecode.py): the linter, the formatter and the
type checker all pass on the tree as it stands. Their versions are pinned in the test extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [("ruff", "check", "."), ("ruff", "format", "--check", ".")],
    ids=["ruff-check", "ruff-format"],
)
def test_ruff_finds_nothing(command):
    out = _run(*command)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_finds_nothing_in_fastq():
    out = _run("mypy", "--strict", "fastq")
    assert out.returncode == 0, out.stdout + out.stderr
