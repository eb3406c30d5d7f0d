"""The launcher's sweeper (shoal/runtime/sweeper.py): what a SIGKILLed launcher leaves behind,
beyond the reach of the parent-death guard, is killed by the environment marker it inherited."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

# Started by the stand-in launcher: starts a sleeper in its own session, prints its pid and
# exits, so the sleeper is an orphan in no process group of the launcher's.
_MIDDLE = (
    "import subprocess, sys\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
    " start_new_session=True)\n"
    "print(p.pid, flush=True)\n"
)
# A stand-in launcher: starts its sweeper (argv[1] == "sweep"), then the middle process above
# with a bare Popen (no parent-death guard anywhere), passes the sleeper's pid on, and waits.
_LAUNCHER = textwrap.dedent(
    f"""
    import subprocess, sys, time
    from shoal.runtime.sweeper import start_sweeper
    if sys.argv[1] == "sweep":
        start_sweeper()
    middle = subprocess.Popen([sys.executable, "-c", {_MIDDLE!r}], stdout=subprocess.PIPE,
                              text=True)
    print(middle.stdout.readline().strip(), flush=True)
    middle.wait()
    time.sleep(120)
    """
)


def _start(mode: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, mode], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    orphan = int(proc.stdout.readline())
    return proc, orphan


def _gone_within(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_sigkilled_launcher_s_detached_grandchild_is_killed_by_its_sweeper() -> None:
    proc, orphan = _start("sweep")
    sweeper = [c for c in psutil.Process(proc.pid).children() if c.pid != orphan]
    assert sweeper, "no sweeper child"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert _gone_within(orphan, 10), "the detached grandchild outlived the launcher"
    assert all(_gone_within(p.pid, 10) for p in sweeper), "the sweeper did not exit"


def test_without_the_sweeper_the_same_grandchild_survives() -> None:
    # The control: shows the case is real (the guard alone does not reach it).
    proc, orphan = _start("none")
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert not _gone_within(orphan, 1.0)
    finally:
        os.kill(orphan, signal.SIGKILL)
        _gone_within(orphan, 10)
