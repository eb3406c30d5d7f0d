"""The tree stays lint-, format- and type-clean: CI runs ruff and mypy through this test.

The tools come from the interpreter's own environment (the test extra of pyproject.toml) and
read their settings from pyproject.toml; a failure shows their output.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Not resolved: a venv's python is a symlink to the base interpreter, whose bin has no tools.
BIN = pathlib.Path(sys.executable).parent

CHECKS = {
    "ruff check": ["ruff", "check", "."],
    "ruff format": ["ruff", "format", "--check", "."],
    "mypy": ["mypy"],  # the packages listed under [tool.mypy]
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_tool_passes(name: str) -> None:
    tool, *args = CHECKS[name]
    executable = BIN / tool
    assert executable.exists(), (
        f"{executable} missing: install the test extra (pip install -e '.[test]')"
    )
    # mypy with a cold cache (a fresh checkout) takes tens of seconds.
    result = subprocess.run(
        [str(executable), *args], cwd=ROOT, capture_output=True, text=True, timeout=240
    )
    if result.returncode != 0:
        pytest.fail(f"`{' '.join([tool, *args])}` failed:\n{result.stdout}{result.stderr}")
