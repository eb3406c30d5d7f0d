"""Start-up of every child process: name, log role, own process group, death with the parent.

Every child role (API server, engine core, DP coordinator, test stubs) calls
`init_child_process(role)` first thing. Afterwards:

* `ps` shows `shoal::<role>` and every log line starts with `[<role> pid=...]`;
* the child leads its own process group, so the launcher can kill the child and everything
  it started (even a grandchild re-parented to init by a double fork) with one `killpg`;
* the child is a child subreaper (Linux), so orphaned descendants re-parent to it rather than
  to init and stay visible in its process tree while it lives;
* the child dies with its parent: `prctl(PR_SET_PDEATHSIG, SIGKILL)` (Linux), plus a watcher
  thread as the portable fallback that waits on the multiprocessing parent sentinel (EOF the
  moment the parent dies) or polls `getppid()`; it unlinks this process's IPC socket files
  and kills its process group.

PR_SET_PDEATHSIG fires when the *thread* that started the child exits, not only the
process: start children with `shoal.runtime.procs.start_process` (main thread or a daemon
spawner thread that lives as long as the process).

The parent-death signal does not depend on the target calling this: the managers start every
child behind `shoal.runtime.guard` (PR_SET_PDEATHSIG before the target runs), and arming it
again here is harmless. What only this call adds: the title, the role, the own process group,
the subreaper and the watcher thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import sys
import threading

from shoal.logger import init_logger, set_process_role
from shoal.runtime.addresses import cleanup_owned_ipc_paths
from shoal.runtime.guard import PARENT_DEATH_SIGNAL

logger = init_logger(__name__)

PROCESS_TITLE_PREFIX = "shoal::"
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
# How often the fallback watcher polls getppid() when there is no parent sentinel.
_PARENT_POLL_INTERVAL_S = 0.2
# This process's ParentWatch thread, once started.
_watcher: threading.Thread | None = None


def init_child_process(role: str) -> None:
    """Prepare this process to run as `role` (e.g. `ApiServer_0`, `EngineCore_1`).

    Sets the process title (`shoal::<role>`, skipped without setproctitle), the logging role,
    makes the process lead its own process group and a child subreaper, and arms the
    parent-death watch (see the module docstring). Call it before anything else in a child:
    a parent that dies before the watch is armed is detected right after arming.
    """
    set_process_role(role)
    _set_process_title(PROCESS_TITLE_PREFIX + role)
    _lead_process_group()
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    watch_parent(use_pdeathsig=True)


def exit_now(code: int) -> None:
    """Exit a child process without interpreter teardown, once it has closed what it opened.

    The teardown is slow and does nothing useful here: unloading torch takes about a second in
    an engine, and an API server spends ~0.3 s in the final garbage collection and in freeing
    its tokenizer, all inside the launcher's shutdown deadline. What teardown would have done
    and matters runs first: this process's IPC socket files are unlinked, multiprocessing's
    finalizers run (semaphores a library created, so the resource tracker has nothing left to
    clean up), and stdout / stderr are flushed."""
    with contextlib.suppress(Exception):
        cleanup_owned_ipc_paths()
    with contextlib.suppress(Exception):
        multiprocessing.util._run_finalizers()  # type: ignore[attr-defined]
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def watch_parent(use_pdeathsig: bool = True) -> None:
    """Exit (killing this process's group) as soon as the parent process dies.

    `use_pdeathsig`: also ask the kernel for SIGKILL on parent death (Linux). The watcher
    thread always runs; it is what acts where prctl is unavailable or not requested.
    """
    global _watcher
    parent = multiprocessing.parent_process()
    parent_pid = parent.pid if parent is not None and parent.pid else os.getppid()
    if use_pdeathsig:
        # Usually armed already by the manager's start shim (shoal.runtime.guard); the same
        # signal again changes nothing.
        _prctl(_PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL)
    if os.getppid() != parent_pid:
        # The parent died before the watch was armed: we were already re-parented.
        _die_with_parent(parent_pid)
    if _watcher is not None and _watcher.is_alive():
        return  # the shim started it (no prctl here); one watcher is enough
    sentinel = parent.sentinel if parent is not None else None
    _watcher = threading.Thread(
        target=_watch, args=(parent_pid, sentinel), name="ParentWatch", daemon=True
    )
    _watcher.start()


def _watch(parent_pid: int, sentinel: int | None) -> None:
    if sentinel is not None:
        # The spawn parent holds the write end of this pipe: EOF exactly when it exits.
        multiprocessing.connection.wait([sentinel])
    else:
        stop = threading.Event()
        while os.getppid() == parent_pid:
            stop.wait(_PARENT_POLL_INTERVAL_S)
    _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    with contextlib.suppress(Exception):
        # stderr may be a pipe nobody reads any more.
        logger.warning("parent process %d is gone; exiting", parent_pid)
    with contextlib.suppress(Exception):
        cleanup_owned_ipc_paths()
    with contextlib.suppress(Exception):
        _kill_descendants()
    if os.getpgrp() == os.getpid():
        with contextlib.suppress(OSError):
            os.killpg(os.getpid(), signal.SIGKILL)  # the whole group, this process included
    os._exit(1)


def _kill_descendants() -> None:
    import psutil

    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def _lead_process_group() -> None:
    try:
        os.setpgid(0, 0)
    except OSError as e:
        # EPERM: a session leader already leads its own group.
        logger.debug("setpgid failed (%s); staying in process group %d", e, os.getpgrp())


def _set_process_title(title: str) -> None:
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)


def _prctl(option: int, value: int) -> bool:
    """prctl(option, value) on Linux; False where unavailable or refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if not ok:
        logger.debug("prctl(%d, %d) failed: errno %d", option, value, ctypes.get_errno())
    return ok
