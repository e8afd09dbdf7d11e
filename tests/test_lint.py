"""Lint and type check, run first (tests/conftest.py): ruff's rules and format, and mypy.

Each runs the venv's tool from the repository root, so the configuration in pyproject.toml
applies; on failure the tool's own output is the assertion message.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGETS = ["src", "tests", "benchmarks"]


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"


def test_ruff_check():
    _run(str(BIN / "ruff"), "check", *TARGETS)


def test_ruff_format():
    _run(str(BIN / "ruff"), "format", "--check", *TARGETS)


def test_mypy():
    _run(str(BIN / "mypy"))
