"""No orphans whatever the target: every child a manager starts dies with its launcher.

The targets here never call init_child_process and ignore SIGTERM, so only the guard the
managers arm themselves (shoal.runtime.guard) can end them when the launcher is SIGKILLed.
Real processes: a stand-in launcher script, killed with SIGKILL; nothing may be left.
"""

from __future__ import annotations

import glob
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from shoal import envs
from shoal.runtime.guard import PARENT_GONE_EXIT_CODE, popen_guard, run_guarded
from shoal.runtime.managers import ProcessManager
from shoal.runtime.procs import SPAWN_CTX, shutdown

from . import stub_targets

TESTS_DIR = Path(__file__).resolve().parent.parent
# The kernel kills a guarded child as the launcher exits; the slack is for a loaded machine.
PARENT_DEATH_BOUND_S = 3.0
START_TIMEOUT_S = 60.0


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_not_running(procs: list[psutil.Process], bound_s: float) -> list[int]:
    deadline = time.monotonic() + bound_s
    while any(_running(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [p.pid for p in procs if _running(p)]


def _kill_leftovers(procs: list[psutil.Process]) -> None:
    """Whatever a failed test left running (psutil checks the pid still names the process)."""
    for proc in procs:
        if _running(proc):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)


class _Launcher:
    """A stand-in launcher script (`stub_targets.guard_launcher_main`) and what it started."""

    def __init__(self, mode: str, frontend_binary: str) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
        code = (
            "from runtime import stub_targets; "
            f"stub_targets.guard_launcher_main({mode!r}, {frontend_binary!r})"
        )
        self.popen = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True
        )
        self.children: list[psutil.Process] = []

    def read_children(self) -> list[psutil.Process]:
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], START_TIMEOUT_S)
        line = self.popen.stdout.readline() if ready else ""
        assert line, "the stand-in launcher did not report its children"
        self.children = [psutil.Process(pid) for pid in json.loads(line)["pids"]]
        return self.children

    def sigkill(self) -> None:
        os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.sigkill()
        assert self.popen.stdout is not None
        self.popen.stdout.close()
        _kill_leftovers(self.children)


@pytest.fixture
def launcher(fake_frontend_binary: str) -> Iterator[Callable[[str], _Launcher]]:
    """Starts stand-in launchers; kills them and anything they left after the test."""
    started: list[_Launcher] = []

    def start(mode: str) -> _Launcher:
        started.append(_Launcher(mode, fake_frontend_binary))
        return started[-1]

    yield start
    for each in started:
        each.close()


@pytest.mark.parametrize(
    ("mode", "count"),
    [
        ("api", 2),  # APIServerProcessManager, a target_server_fn that never arms
        ("spawn", 2),  # ProcessManager.spawn: a child and the helper it started itself
        ("engine", 1),  # CoreEngineProcManager.restart: the replacement engine
        ("frontend", 1),  # the native frontend (Popen), its own parent watch off
    ],
)
def test_every_child_dies_with_a_sigkilled_launcher_whatever_its_target(
    launcher: Callable[[str], _Launcher], mode: str, count: int
) -> None:
    stand_in = launcher(mode)
    children = stand_in.read_children()
    assert len(children) == count and all(_running(p) for p in children)
    stand_in.sigkill()
    assert _wait_not_running(children, PARENT_DEATH_BOUND_S) == []
    # No IPC address was used: the dead launcher left no run directory to sweep.
    pattern = os.path.join(envs.ENVS.rpc_base_path, f"shoal-{stand_in.popen.pid}-*")
    assert glob.glob(pattern) == []


def test_a_spawned_target_that_never_arms_runs_with_the_parent_death_signal() -> None:
    manager = ProcessManager()
    recv, send = SPAWN_CTX.Pipe(duplex=False)
    try:
        manager.spawn(stub_targets.bare_sleeper, "Bare", args=(send,))
        send.close()
        assert recv.poll(START_TIMEOUT_S)
        assert recv.recv()["pdeathsig"] == signal.SIGKILL
    finally:
        recv.close()
        manager.shutdown(0)


def test_a_bare_spawn_context_process_has_no_parent_death_signal() -> None:
    """The control for the test above: without the managers' guard nothing is armed."""
    recv, send = SPAWN_CTX.Pipe(duplex=False)
    proc = SPAWN_CTX.Process(target=stub_targets.bare_sleeper, args=(send,))
    proc.start()
    send.close()
    try:
        assert recv.poll(START_TIMEOUT_S)
        assert recv.recv()["pdeathsig"] == 0
    finally:
        recv.close()
        shutdown([proc], timeout=0)


def test_a_target_that_calls_init_child_process_too_still_sets_itself_up() -> None:
    """Armed twice (the guard, then init_child_process): same signal, and the rest of
    init_child_process (role, own process group) as before."""
    manager = ProcessManager()
    recv, send = SPAWN_CTX.Pipe(duplex=False)
    try:
        proc = manager.spawn(stub_targets.identity_and_pdeathsig, "Twice", args=(send,))
        send.close()
        assert recv.poll(START_TIMEOUT_S)
        report = recv.recv()
        assert report == {"role": "Twice", "pgid": proc.pid, "pdeathsig": signal.SIGKILL}
    finally:
        recv.close()
        manager.shutdown(0)


def test_a_child_whose_parent_is_gone_when_it_arms_exits_before_its_target(
    tmp_path: Path,
) -> None:
    """The fork-to-prctl window: a parent that died there leaves the child re-parented, which
    the guard sees (getppid is not the pid it was given) and exits without running the target.
    Simulated by naming a pid that is not the parent."""
    marker = tmp_path / "ran"
    not_the_parent = os.getpid() + 1_000_000
    proc = SPAWN_CTX.Process(
        target=run_guarded,
        args=(not_the_parent, stub_targets.write_marker, (str(marker),), {}),
    )
    proc.start()
    proc.join(START_TIMEOUT_S)
    assert proc.exitcode == PARENT_GONE_EXIT_CODE
    assert not marker.exists()


def test_popen_guard_arms_the_signal_before_exec_and_checks_the_parent(tmp_path: Path) -> None:
    code = "import sys; from runtime import stub_targets; print(stub_targets.pdeathsig())"
    env = dict(os.environ, PYTHONPATH=str(TESTS_DIR))
    out = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=popen_guard(),
        env=env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=True,
    )
    assert int(out.stdout) == signal.SIGKILL
    marker = tmp_path / "ran"
    gone = subprocess.run(
        [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"],
        preexec_fn=popen_guard(os.getpid() + 1_000_000),
        timeout=START_TIMEOUT_S,
    )
    assert gone.returncode == PARENT_GONE_EXIT_CODE and not marker.exists()


def test_without_prctl_the_shim_falls_back_to_the_watcher_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Off Linux (no prctl) the guard is the portable watcher; the target still runs."""
    from shoal.runtime import child, guard

    calls: list[bool] = []
    monkeypatch.setattr(guard, "_libc_prctl", lambda: None)
    monkeypatch.setattr(child, "watch_parent", lambda use_pdeathsig: calls.append(use_pdeathsig))
    assert run_guarded(os.getppid(), lambda x, y=0: x + y, (2,), {"y": 3}) == 5
    assert calls == [False]


def test_init_child_process_after_the_fallback_watcher_starts_no_second_one() -> None:
    recv, send = SPAWN_CTX.Pipe(duplex=False)
    proc = SPAWN_CTX.Process(target=stub_targets.count_parent_watchers, args=(send,))
    proc.start()
    send.close()
    try:
        assert recv.poll(START_TIMEOUT_S)
        assert recv.recv() == 1
    finally:
        recv.close()
        shutdown([proc], timeout=0)
