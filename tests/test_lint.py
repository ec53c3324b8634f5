"""Static checks as part of the suite (CI runs only the test command): ruff's rules and mypy's
type check over the package, both configured in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=280)


def test_ruff_finds_nothing() -> None:
    res = _run("ruff", "check", "stream_detector", "tests")
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]


def test_mypy_finds_nothing() -> None:
    res = _run("mypy", "stream_detector")
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]
