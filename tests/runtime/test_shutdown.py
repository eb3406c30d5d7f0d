"""shutdown(): the caller's deadline, and whole process trees killed and reaped."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from shoal.runtime.procs import (
    SPAWN_CTX,
    _shutdown_subprocesses,
    _SubprocessWrapper,
    kill_process_tree,
    shutdown,
)

from . import stub_targets

# Well under the seed's 5 s floor, so a test that waits for it fails.
SEED_FLOOR_S = 5.0
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


def _start_tree(escapee_mode: str, ignore_sigterm: bool = True):
    recv, send = SPAWN_CTX.Pipe(duplex=False)
    proc = SPAWN_CTX.Process(
        target=stub_targets.start_grandchildren,
        name="Stubborn",
        args=(send, escapee_mode, ignore_sigterm),
    )
    proc.start()
    send.close()
    assert recv.poll(60), "stub did not report its grandchildren"
    report = recv.recv()
    recv.close()
    return proc, [pid for pid in report.values() if pid is not None]


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a zombie is dead, awaiting its reaper)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_caller_timeout_is_honoured_for_a_process_ignoring_sigterm() -> None:
    proc, _ = _start_tree("none")
    start = time.monotonic()
    shutdown([proc], timeout=0.5)
    assert time.monotonic() - start < SEED_FLOOR_S - 1
    assert proc.exitcode == -9  # killed at the deadline, and reaped


def test_caller_timeout_is_honoured_for_a_subprocess_ignoring_sigterm() -> None:
    popen = subprocess.Popen(
        [sys.executable, "-c", STUBBORN], process_group=0, stdout=subprocess.PIPE, text=True
    )
    wrapper = _SubprocessWrapper(popen, "Stubborn")
    assert popen.stdout is not None and popen.stdout.readline() == "ready\n"
    popen.stdout.close()
    start = time.monotonic()
    _shutdown_subprocesses([wrapper], timeout=0)
    assert time.monotonic() - start < SEED_FLOOR_S - 1
    assert wrapper.exitcode == -9 and not wrapper.is_alive()


@pytest.mark.parametrize("escapee_mode", ["group", "setsid"])
def test_stubborn_tree_is_killed_by_the_deadline_and_reaped(escapee_mode: str) -> None:
    proc, descendants = _start_tree(escapee_mode)
    assert len(descendants) == 2 and all(_running(pid) for pid in descendants)
    # The escapee's intermediate parent is gone: it was re-parented away.
    escapee = psutil.Process(descendants[1])
    assert escapee.ppid() != os.getpid()
    shutdown([proc], timeout=0.5)
    assert proc.exitcode == -9
    assert not any(_running(pid) for pid in descendants)


def test_grandchildren_of_a_child_that_exits_on_sigterm_are_killed() -> None:
    proc, descendants = _start_tree("group", ignore_sigterm=False)
    shutdown([proc], timeout=5)
    assert proc.exitcode == 0
    # The grandchildren ignored SIGTERM and lost their parent; shutdown still found them.
    assert not any(_running(pid) for pid in descendants)


def test_grandchildren_of_a_child_that_already_died_are_killed() -> None:
    proc, descendants = _start_tree("group")
    proc.kill()  # the child crashes; its children are re-parented away from it
    proc.join(5)
    assert all(_running(pid) for pid in descendants)
    shutdown([proc], timeout=0.5)
    # Found through the dead child's process group.
    assert not any(_running(pid) for pid in descendants)


def test_timeout_none_lets_an_obedient_child_exit_cleanly() -> None:
    proc = SPAWN_CTX.Process(target=stub_targets.exit_after, args=(60, 0), name="Obedient")
    proc.start()
    time.sleep(0.5)
    shutdown([proc])
    assert proc.exitcode == -15  # SIGTERM with the default disposition


def test_child_outside_its_own_group_is_stopped_without_touching_ours() -> None:
    recv, send = SPAWN_CTX.Pipe(duplex=False)
    proc = SPAWN_CTX.Process(target=stub_targets.plain_sleeper, args=(send,), name="Plain")
    proc.start()
    send.close()
    assert recv.recv() == os.getpgrp()  # no init_child_process: it shares our group
    recv.close()
    shutdown([proc], timeout=0)
    assert proc.exitcode is not None and proc.exitcode < 0


def test_unstarted_and_finished_processes_are_skipped() -> None:
    unstarted = SPAWN_CTX.Process(target=stub_targets.exit_after, args=(0, 0))
    finished = SPAWN_CTX.Process(target=stub_targets.exit_after, args=(0, 7))
    finished.start()
    finished.join(30)
    shutdown([unstarted, finished], timeout=0)
    assert unstarted.exitcode is None and finished.exitcode == 7


def test_kill_process_tree() -> None:
    proc, descendants = _start_tree("setsid")
    kill_process_tree(proc.pid)
    proc.join(5)
    assert proc.exitcode == -9
    assert not any(_running(pid) for pid in descendants)


def test_subprocess_wrapper_mirrors_a_process() -> None:
    popen = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(4)"])
    wrapper = _SubprocessWrapper(popen, "Four")
    from multiprocessing.connection import wait

    assert wait([wrapper.sentinel], timeout=30) == [wrapper.sentinel]
    wrapper.join(5)
    assert wrapper.exitcode == 4 and not wrapper.is_alive()
    assert wrapper.name == "Four" and wrapper.pid == popen.pid
    wrapper.join(0.01)  # never raises
