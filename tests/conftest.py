"""Suite-wide checks: no test may leave a process or a shoal IPC socket file behind.

Every process the suite starts inherits SHOAL_TEST_MARKER, so a grandchild that escaped to
init is still found (psutil reads /proc/<pid>/environ).
"""

from __future__ import annotations

import contextlib
import multiprocessing.resource_tracker
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest

_MARKER = uuid.uuid4().hex
os.environ["SHOAL_TEST_MARKER"] = _MARKER
# A private base for IPC directories, so leftovers are attributable to this run.
_RPC_BASE = tempfile.mkdtemp(prefix="shoal-test-rpc-")
os.environ["SHOAL_RPC_BASE_PATH"] = _RPC_BASE
os.environ.setdefault("SHOAL_NO_USAGE_STATS", "1")

from shoal import envs  # noqa: E402

envs.refresh()


def _marked_processes() -> list[psutil.Process]:
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.pid == me or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if proc.environ().get("SHOAL_TEST_MARKER") == _MARKER:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _leftover_ipc_files() -> list[str]:
    leftovers = []
    for root, _dirs, files in os.walk(_RPC_BASE):
        leftovers.extend(os.path.join(root, f) for f in files)
    return leftovers


@pytest.fixture(scope="session", autouse=True)
def _resource_tracker_running() -> Iterator[None]:
    """The first spawn starts multiprocessing's resource tracker, which lives until the
    session ends; start it before any test's leak snapshot so it is not counted as a leak.
    At the end, remove the session's IPC base directory (empty unless a test failed)."""
    multiprocessing.resource_tracker.ensure_running()
    yield
    shutil.rmtree(_RPC_BASE, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest):
    """Fail the test if it leaves a process or an IPC socket file behind."""
    before = {p.pid for p in _marked_processes()}
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [p for p in _marked_processes() if p.pid not in before]
        files = _leftover_ipc_files()
        if (not leaked and not files) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if leaked or files:
        described = []
        for p in leaked:
            try:
                described.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            except psutil.Error:
                described.append(str(p.pid))
            with contextlib.suppress(psutil.Error):
                p.kill()
        for f in files:
            with contextlib.suppress(OSError):
                os.unlink(f)
        pytest.fail(f"test left behind processes {described} and IPC files {files}")
