"""The launcher's sweeper: when `shoal serve` ends, by any means (SIGKILL included), every
process it started, directly or not, is killed.

The parent-death guard (`shoal.runtime.guard`) covers each process shoal starts itself, but
not what those processes start with plain `subprocess` or `multiprocessing`: the kernel clears
PR_SET_PDEATHSIG across fork, so such a grandchild is re-parented to init when its parent
dies. `ray.init` starting a local Ray instance is the case that matters (its dashboard and
runtime-env agents outlive a SIGKILLed launcher), and a custom engine target could do the same.

So the launcher forks a sweeper before it starts anything:

* the launcher puts a fresh random marker in its environment (`SHOAL_LAUNCHER_MARKER`), which
  every descendant inherits (Ray's processes, workers and actors included);
* the sweeper blocks reading a pipe whose only write end the launcher holds; the kernel closes
  it when the launcher exits, however it exits, and the read returns;
* the sweeper then SIGKILLs every process whose environment carries the marker (read from
  /proc/<pid>/environ), repeating until none is left or its deadline passes, and exits.

A process that clears its environment escapes the sweep; none of shoal's or Ray's do. Linux
only (/proc); elsewhere `start_sweeper` does nothing. Stdlib only, and the forked child
touches no lock another thread could hold: it is forked before the launcher starts a thread.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid

try:  # imported before the fork: the sweeper only calls it
    import setproctitle
except ImportError:  # pragma: no cover - a declared dependency
    setproctitle = None  # type: ignore[assignment]

MARKER_ENV = "SHOAL_LAUNCHER_MARKER"
# How long the sweeper keeps looking for processes (a dying tree may fork once more).
SWEEP_DEADLINE_S = 5.0


def start_sweeper(role: str = "Sweeper") -> int | None:
    """Fork the sweeper of this process (the launcher) and mark this process's environment.
    Returns the sweeper's pid, or None where there is no /proc. Call it once, before any
    child or thread is started."""
    if not os.path.isdir("/proc/self"):
        return None
    marker = uuid.uuid4().hex
    os.environ[MARKER_ENV] = marker
    read_fd, write_fd = os.pipe()  # both ends close-on-exec: no child inherits the write end
    pid = os.fork()
    if pid == 0:  # the sweeper
        try:
            os.close(write_fd)
            _run_sweeper(read_fd, marker, os.getppid(), role)
        finally:
            os._exit(0)
    os.close(read_fd)
    # Kept open for the launcher's whole life; os.pipe's fds are not inherited across exec,
    # and every shoal child is spawned (fork + exec) or started by subprocess (close_fds).
    _keep_open.append(write_fd)
    return pid


_keep_open: list[int] = []


def _run_sweeper(read_fd: int, marker: str, launcher_pid: int, role: str) -> None:
    # Signals meant for the launcher's terminal group (Ctrl-C) or its process group must not
    # end the sweeper before its work: it exits on its own once the launcher is gone.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    _set_title(f"shoal::{role}")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # stdout's readers see EOF when the launcher exits; stderr is kept
    while True:
        try:
            if not os.read(read_fd, 1):
                break
        except InterruptedError:
            continue
    killed = sweep(marker, exclude={os.getpid()})
    if killed:
        print(
            f"[{role} pid={os.getpid()}] the launcher (pid {launcher_pid}) is gone; killed "
            f"{len(killed)} process(es) it left: {sorted(killed)}",
            file=sys.stderr,
            flush=True,
        )


def sweep(marker: str, exclude: set[int], deadline_s: float = SWEEP_DEADLINE_S) -> set[int]:
    """SIGKILL every process whose environment has MARKER_ENV=`marker` (but `exclude`) until
    none is left or `deadline_s` passes. Returns the pids killed."""
    needle = f"{MARKER_ENV}={marker}".encode()
    killed: set[int] = set()
    end = time.monotonic() + deadline_s
    while True:
        found = [pid for pid in _marked_pids(needle) if pid not in exclude]
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        if not found or time.monotonic() > end:
            return killed
        time.sleep(0.05)


def _marked_pids(needle: bytes) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        if state != b"Z" and needle in env.split(b"\0"):
            pids.append(int(name))
    return pids


def _set_title(title: str) -> None:
    if setproctitle is not None:
        setproctitle.setproctitle(title)
