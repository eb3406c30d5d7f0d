"""init_child_process(): title, log role, own process group, death with the launcher."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from shoal.runtime.addresses import sweep_stale_ipc_dirs
from shoal.runtime.procs import SPAWN_CTX, shutdown, start_process

from . import stub_targets

TESTS_DIR = Path(__file__).resolve().parent.parent
# The bound: children are gone this long after the launcher dies.
PARENT_DEATH_BOUND_S = 2.0


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_not_running(pids: list[int], bound_s: float) -> list[int]:
    deadline = time.monotonic() + bound_s
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return [pid for pid in pids if _running(pid)]


def _start_launcher(mode: str) -> tuple[subprocess.Popen, dict]:
    """A stand-in launcher process that starts two children and reports them."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    code = f"from runtime import stub_targets; stub_targets.orphan_launcher_main({mode!r})"
    launcher = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, text=True
    )
    assert launcher.stdout is not None
    ready, _, _ = select.select([launcher.stdout], [], [], 60)
    line = launcher.stdout.readline() if ready else ""
    if not line:
        launcher.kill()
        launcher.wait()
        raise AssertionError("the stand-in launcher did not report its children")
    return launcher, json.loads(line)


def test_identity_and_process_group() -> None:
    recv, send = SPAWN_CTX.Pipe(duplex=False)
    proc = SPAWN_CTX.Process(target=stub_targets.report_identity, args=(send, "Probe_3"))
    proc.start()
    send.close()
    try:
        assert recv.poll(60)
        identity = recv.recv()
        assert identity == {"role": "Probe_3", "pid": proc.pid, "pgid": proc.pid}
        assert "shoal::Probe_3" in " ".join(psutil.Process(proc.pid).cmdline())
    finally:
        recv.close()
        shutdown([proc], timeout=1)


def test_exit_now_keeps_the_code_and_unlinks_the_ipc_socket_files(tmp_path: Path) -> None:
    """`exit_now` skips interpreter teardown (and with it atexit handlers), so it unlinks the
    process's IPC socket files itself: none is left behind, and the exit code is the one asked."""
    address = f"ipc://{tmp_path / 'exit-now.sock'}"
    recv, send = SPAWN_CTX.Pipe(duplex=False)
    proc = SPAWN_CTX.Process(target=stub_targets.bind_ipc_then_exit_now, args=(send, address, 3))
    proc.start()
    send.close()
    try:
        assert recv.poll(60)
        path = recv.recv()
        proc.join(30)
        assert proc.exitcode == 3
        assert path == str(tmp_path / "exit-now.sock") and not os.path.exists(path)
    finally:
        recv.close()
        shutdown([proc], timeout=1)


def test_children_die_with_a_sigkilled_launcher() -> None:
    launcher, info = _start_launcher("api")
    assert all(_running(pid) for pid in info["pids"])
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert _wait_not_running(info["pids"], PARENT_DEATH_BOUND_S) == []
    # The kernel killed them (PR_SET_PDEATHSIG) before any cleanup: the next run's sweep
    # removes the dead launcher's IPC directory with its socket files.
    assert info["run_dir"] in sweep_stale_ipc_dirs()
    assert not os.path.exists(info["run_dir"])


def test_fallback_watcher_cleans_up_and_exits_when_the_launcher_dies() -> None:
    launcher, info = _start_launcher("watcher")
    assert all(os.path.exists(path) for path in info["files"])
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    assert _wait_not_running(info["pids"], PARENT_DEATH_BOUND_S) == []
    assert not any(os.path.exists(path) for path in info["files"])  # unlinked by the child
    sweep_stale_ipc_dirs()


def test_a_child_started_from_a_short_lived_thread_outlives_that_thread() -> None:
    # PR_SET_PDEATHSIG fires when the starting *thread* exits; start_process starts children
    # from a thread that lives as long as the process.
    recv, send = SPAWN_CTX.Pipe(duplex=False)
    proc = SPAWN_CTX.Process(target=stub_targets.report_identity, args=(send, "Threaded"))

    def start_and_wait_until_armed() -> None:
        start_process(proc)
        assert recv.poll(60)  # init_child_process has run in the child

    thread = threading.Thread(target=start_and_wait_until_armed)
    thread.start()
    thread.join()
    send.close()
    try:
        time.sleep(0.5)
        assert proc.is_alive()
    finally:
        recv.close()
        shutdown([proc], timeout=1)
