"""Child processes as one kind: start, Popen adapter, and terminate -> join -> kill-tree -> reap.

`shutdown(procs, timeout)` is the one stop sequence for `multiprocessing` processes and for
`_SubprocessWrapper`s alike (no hidden 5 s floor for either):

1. snapshot each live child's descendants (a child that exits gracefully re-parents its
   children to init; the snapshot still names them);
2. SIGTERM every live child; join them against one deadline (`timeout`, default 5 s);
3. SIGKILL what is left of each child's tree: the child, its snapshotted and current
   descendants, and its process group (children lead their own, see `shoal.runtime.child`),
   which catches grandchildren that escaped by re-parenting;
4. wait, bounded by `KILL_REAP_TIMEOUT_S`, until every killed process is reaped (our own
   children are joined; other processes are gone or zombies awaiting their new parent).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Protocol, TypeVar

import psutil

from shoal.logger import init_logger
from shoal.runtime.guard import run_guarded

logger = init_logger(__name__)

T = TypeVar("T")

# The grace `shutdown(procs, timeout=None)` gives children between SIGTERM and SIGKILL.
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0
# After SIGKILL: how long to wait for the kernel to reap what was killed.
KILL_REAP_TIMEOUT_S = 5.0
# The start method of every shoal child process.
SPAWN_CTX = multiprocessing.get_context("spawn")


class ProcessLike(Protocol):
    """What the runtime needs of a child: `multiprocessing` processes and
    `_SubprocessWrapper` both fit."""

    @property
    def name(self) -> str: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def sentinel(self) -> Any: ...
    @property
    def exitcode(self) -> int | None: ...
    def is_alive(self) -> bool: ...
    def terminate(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


class _SubprocessWrapper:
    """Make a `subprocess.Popen` look like a `multiprocessing` process.

    `sentinel` is the read end of a pipe whose write end a daemon thread (`<name>Monitor`)
    closes right after reaping the child, so it can sit in `multiprocessing.connection.wait`
    beside `Process.sentinel`s. `exitcode` is None while running, negative when killed by a
    signal. `join(timeout)` never raises.
    """

    def __init__(self, proc: subprocess.Popen, name: str) -> None:
        self.proc = proc
        self.name = name
        self.pid = proc.pid
        self._sentinel_recv, self._sentinel_send = SPAWN_CTX.Pipe(duplex=False)
        self._monitor = threading.Thread(target=self._reap, name=f"{name}Monitor", daemon=True)
        self._monitor.start()

    def _reap(self) -> None:
        try:
            self.proc.wait()
        finally:
            self._sentinel_send.close()

    @property
    def sentinel(self) -> Connection:
        return self._sentinel_recv

    @property
    def exitcode(self) -> int | None:
        return self.proc.poll()

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(Exception):
            self.proc.wait(timeout)

    def __repr__(self) -> str:
        return f"<_SubprocessWrapper {self.name} pid={self.pid} exitcode={self.exitcode}>"

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._sentinel_recv.close()


def shutdown(procs: Sequence[ProcessLike], timeout: float | None = None) -> None:
    """Stop `procs` and everything they started: SIGTERM, join until the deadline, then
    SIGKILL each remaining process tree and wait for the reaping (see the module docstring).

    `timeout`: seconds of grace after SIGTERM; None = `DEFAULT_SHUTDOWN_TIMEOUT_S` (5 s);
    0 = SIGKILL right after SIGTERM. Unstarted and already-exited processes are skipped
    (their leftover process groups are still killed). Never raises for dead processes;
    returns within about `timeout + KILL_REAP_TIMEOUT_S`.
    """
    timeout_s = DEFAULT_SHUTDOWN_TIMEOUT_S if timeout is None else max(0.0, float(timeout))
    deadline = time.monotonic() + timeout_s
    started = [p for p in procs if _pid(p) is not None]
    if not started:
        return
    alive = [p for p in started if _is_alive(p)]
    table = _ProcessTable() if alive else None
    snapshot = {p.pid: table.descendants(p.pid) for p in alive if table and p.pid is not None}
    if alive:
        logger.info("stopping %s (grace %.1fs)", _names(alive), timeout_s)
    for proc in alive:
        with contextlib.suppress(Exception):
            proc.terminate()
    for proc in alive:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        proc.join(remaining)
    survivors = [p for p in started if _is_alive(p)]
    if survivors:
        logger.warning(
            "[shutdown] force killing %d process(es) still alive after %.1fs: %s",
            len(survivors),
            timeout_s,
            _names(survivors),
        )
    _kill_trees(started, snapshot)


def _shutdown_subprocesses(
    procs: Sequence[_SubprocessWrapper], timeout: float | None = None
) -> None:
    """`shutdown` for `_SubprocessWrapper`s: the same algorithm, the caller's timeout
    honoured (the seed imposed a 5 s minimum here; shoal does not)."""
    shutdown(procs, timeout)


def kill_process_tree(pid: int) -> None:
    """SIGKILL `pid`, its descendants and its process group (when `pid` leads one), then
    wait (bounded by `KILL_REAP_TIMEOUT_S`) until they are gone. `pid` must still name the
    intended process (not yet reaped). Never touches this process or its group."""
    table = _ProcessTable()
    victims = table.descendants(pid) + table.group(pid)
    with contextlib.suppress(psutil.Error):
        victims.append(psutil.Process(pid))
    _kill_and_wait(victims, [pid], own_children=[])


def _kill_trees(started: Sequence[ProcessLike], snapshot: dict[int, list[psutil.Process]]) -> None:
    pids = [p.pid for p in started if p.pid is not None]
    table = _ProcessTable()
    victims: list[psutil.Process] = []
    for proc in started:
        pid = proc.pid
        assert pid is not None  # filtered by the caller
        victims.extend(snapshot.get(pid, []))
        victims.extend(table.group(pid))
        if _is_alive(proc):
            # Not reaped yet, so the pid still names our child (a reaped pid may be reused).
            victims.extend(table.descendants(pid))
            with contextlib.suppress(psutil.Error):
                victims.append(psutil.Process(pid))
    _kill_and_wait(victims, pids, own_children=list(started))


def _kill_and_wait(
    victims: list[psutil.Process], pgids: list[int], own_children: list[ProcessLike]
) -> None:
    me, my_group = os.getpid(), os.getpgrp()
    unique = {v.pid: v for v in victims if v.pid != me}
    for victim in unique.values():
        with contextlib.suppress(psutil.Error):
            victim.kill()  # psutil checks the pid still names the same process
    for pgid in pgids:
        if pgid > 1 and pgid != my_group:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_REAP_TIMEOUT_S
    for proc in own_children:
        proc.join(max(0.0, deadline - time.monotonic()))
    own_pids = {p.pid for p in own_children}
    others = [v for pid, v in unique.items() if pid not in own_pids]
    leftover = _wait_gone(others, deadline)
    stuck = [p for p in own_children if _is_alive(p)]
    if leftover or stuck:
        logger.error(
            "[shutdown] still present %.1fs after SIGKILL: %s",
            KILL_REAP_TIMEOUT_S,
            _names(stuck) + [str(v.pid) for v in leftover],
        )


def _wait_gone(procs: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Wait until each process is gone or a zombie (its new parent, usually init, reaps it)."""
    pending = procs
    while True:
        pending = [p for p in pending if _is_running(p)]
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(0.01)


def _is_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _ProcessTable:
    """One scan of the process table: children by parent pid, members by process group."""

    def __init__(self) -> None:
        self._children: dict[int, list[psutil.Process]] = {}
        self._groups: dict[int, list[psutil.Process]] = {}
        for proc in psutil.process_iter(["ppid"]):
            ppid = proc.info.get("ppid")
            if ppid:
                self._children.setdefault(ppid, []).append(proc)
            with contextlib.suppress(OSError):
                self._groups.setdefault(os.getpgid(proc.pid), []).append(proc)

    def descendants(self, pid: int) -> list[psutil.Process]:
        """Every process below `pid` in the parent tree, as of the scan."""
        found: list[psutil.Process] = []
        seen, stack = {pid}, [pid]
        while stack:
            for child in self._children.get(stack.pop(), []):
                if child.pid not in seen:
                    seen.add(child.pid)
                    found.append(child)
                    stack.append(child.pid)
        return found

    def group(self, pgid: int) -> list[psutil.Process]:
        """The members of process group `pgid`; never this process's own group."""
        if pgid <= 1 or pgid == os.getpgrp():
            return []
        return list(self._groups.get(pgid, []))


def _pid(proc: ProcessLike) -> int | None:
    try:
        return proc.pid
    except ValueError:  # a closed multiprocessing.Process
        return None


def _is_alive(proc: ProcessLike) -> bool:
    try:
        return proc.is_alive()
    except (ValueError, AssertionError):  # closed, or not our child
        return False


def _names(procs: Iterable[ProcessLike]) -> list[str]:
    return [f"{p.name}(pid={p.pid})" for p in procs]


def exitcode_after_exit(proc: ProcessLike, timeout_s: float = 1.0) -> int | None:
    """`proc.exitcode` once its sentinel has fired: join briefly first, since the sentinel
    can fire a moment before the child can be reaped."""
    if proc.exitcode is None:
        proc.join(timeout_s)
    return proc.exitcode


# -- starting children from a thread that outlives them -------------------------------------------


class _SpawnerThread:
    """A daemon thread that runs start-up calls: it lives as long as the process, so a
    child's PR_SET_PDEATHSIG (which fires when the *starting thread* exits) means what it
    says."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], queue.SimpleQueue]] = (
            queue.SimpleQueue()
        )
        threading.Thread(target=self._run, name="ShoalSpawner", daemon=True).start()

    def _run(self) -> None:
        while True:
            fn, reply = self._calls.get()
            try:
                reply.put((True, fn()))
            except BaseException as e:
                reply.put((False, e))

    def call(self, fn: Callable[[], T], timeout_s: float) -> T:
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self._calls.put((fn, reply))
        try:
            ok, value = reply.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"starting a child process took more than {timeout_s}s") from None
        if not ok:
            raise value
        return value


_spawner: _SpawnerThread | None = None
_spawner_lock = threading.Lock()
# Bound on one `start()` / `Popen()` call made through the spawner thread.
START_TIMEOUT_S = 60.0


def run_on_stable_thread(fn: Callable[[], T]) -> T:
    """Run `fn()` on the main thread if that is the caller, else on the spawner thread.

    Use it for every call that creates a child process (`Process.start`, `Popen`).
    """
    main = threading.main_thread()
    if threading.current_thread() is main and main.is_alive():
        return fn()
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = _SpawnerThread()
    return _spawner.call(fn, START_TIMEOUT_S)


def guarded_process(
    target: Callable[..., Any],
    name: str,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    daemon: bool = False,
) -> multiprocessing.process.BaseProcess:
    """An unstarted spawn-context process `name` that runs `target(*args, **kwargs)` behind
    the parent-death guard (`shoal.runtime.guard.run_guarded`): whatever the target does, the
    child dies with this process. The one way managers create multiprocessing children;
    start it with `start_process`."""
    return SPAWN_CTX.Process(
        target=run_guarded,
        name=name,
        args=(os.getpid(), target, args, kwargs or {}),
        daemon=daemon,
    )


def start_process(proc: multiprocessing.process.BaseProcess) -> None:
    """`proc.start()` from a thread that lives as long as this process (see
    `run_on_stable_thread`)."""
    run_on_stable_thread(proc.start)
