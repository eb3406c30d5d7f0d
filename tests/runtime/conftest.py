"""Fixtures for the process-runtime tests."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

_FAKE_FRONTEND = Path(__file__).with_name("fake_frontend.py")


@pytest.fixture(scope="session")
def fake_frontend_binary(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An executable wrapper that runs the stand-in native frontend with this interpreter
    (exec, so the pid and the inherited fds are the frontend's)."""
    path = tmp_path_factory.mktemp("frontend") / "shoal-frontend"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{_FAKE_FRONTEND}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return os.fspath(path)
