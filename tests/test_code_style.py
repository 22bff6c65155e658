"""The code is formatted by ruff and passes its lint (line length among the rules): both part of the tests, so
CI fails on a file either would change or flag. The version is pinned in the test extras: formatting changes
between ruff releases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("command", [["format", "--check", "--diff"], ["check"]])
def test_ruff_finds_nothing_to_change(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"ruff {' '.join(command)}:\n{result.stdout[-6000:]}{result.stderr[-2000:]}"
