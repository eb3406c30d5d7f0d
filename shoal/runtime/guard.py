"""The parent-death guard every shoal child starts behind, whatever its target runs.

A child must never outlive the process that started it, even when that process is SIGKILLed
and runs no cleanup. `init_child_process` arms such a guard, but only in targets that call
it, and the managers accept any callable. So the launcher side does not rely on the target:

* `run_guarded` is the entry point of every spawn-context child a manager starts
  (`shoal.runtime.procs.guarded_process`: `ProcessManager.spawn`, the engine restart path);
  it arms the guard, then calls the target;
* `popen_guard()` is a `subprocess.Popen(preexec_fn=...)` that arms it in the forked child
  before exec (the native frontend); PR_SET_PDEATHSIG survives exec.

Arming = `prctl(PR_SET_PDEATHSIG, SIGKILL)` (Linux: the kernel kills this process when the
thread that started it exits, hence `start_process` / `run_on_stable_thread`), then a check
that the parent is still the process that started us: if it died between fork and the
prctl, we were re-parented already and the signal will never come, so exit at once. SIGKILL
because a target may catch or ignore SIGTERM (an engine drains on it). Arming again later
(`init_child_process` does) sets the same signal: harmless.

Grandchildren: the kernel clears PR_SET_PDEATHSIG in a forked child, so a process a target
starts is not covered by its parent's guard. One started through shoal's runtime
(`ProcessManager.spawn`, `guarded_process`, `popen_guard`) is guarded against its own
parent: the launcher dies, the kernel kills the child, then the grandchild, and so on down
the tree. Any other grandchild (a bare `subprocess.Popen` or `multiprocessing.Process`) is
re-parented to init; an orderly `shutdown()` still kills it with its parent's process tree
and group, and after a SIGKILLed launcher its sweeper (`shoal.runtime.sweeper`) does.

Stdlib only: every child imports this module before its target.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1
# What the kernel sends a guarded child when its parent dies.
PARENT_DEATH_SIGNAL = signal.SIGKILL
# Exit code of a child that found its parent already gone while arming.
PARENT_GONE_EXIT_CODE = 1


def run_guarded(
    parent_pid: int, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Arm the parent-death guard against `parent_pid` (the process that started this one),
    then return `target(*args, **kwargs)`. Module-level so spawn can pickle it by name."""
    if not arm_parent_death_signal(parent_pid):
        # No prctl (not Linux): the portable watcher thread is the guard.
        from shoal.runtime.child import watch_parent

        watch_parent(use_pdeathsig=False)
    return target(*args, **kwargs)


def arm_parent_death_signal(parent_pid: int) -> bool:
    """PR_SET_PDEATHSIG(SIGKILL) for this process, then exit at once (code
    `PARENT_GONE_EXIT_CODE`) if `parent_pid` is no longer our parent. Returns whether the
    kernel accepted the prctl (False off Linux)."""
    prctl = _libc_prctl()
    armed = prctl is not None and prctl(_PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0) == 0
    if os.getppid() != parent_pid:
        os._exit(PARENT_GONE_EXIT_CODE)  # nothing of the target ran: nothing to clean up
    return armed


def popen_guard(parent_pid: int | None = None) -> Callable[[], None]:
    """A `preexec_fn` for `subprocess.Popen` that arms the guard in the child against
    `parent_pid` (default: the calling process). Call it in the parent: libc's prctl is
    looked up here, because dlopen in a forked child of a threaded process can deadlock on
    a lock some other thread held at fork time; the returned function only calls it."""
    prctl = _libc_prctl()
    parent = os.getpid() if parent_pid is None else parent_pid
    signum = int(PARENT_DEATH_SIGNAL)

    def arm_before_exec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(PARENT_GONE_EXIT_CODE)

    return arm_before_exec


@functools.cache
def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    # prctl(int option, unsigned long arg2, ...): without argtypes ctypes passes C ints, and
    # the kernel reads whole longs.
    prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    prctl.restype = ctypes.c_int
    fn: Callable[..., int] = prctl
    return fn
