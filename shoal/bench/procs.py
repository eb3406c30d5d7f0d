"""A server under benchmark as a process tree: start, time to /health 200, CPU seconds and peak
RSS per process role, SIGTERM-to-all-gone time, and the CPU everything else on the machine used.

Roles come from process titles: `shoal::ApiServer_0`, `shoal::EngineCore_0` (shoal's children),
`bare::Worker_0` (the bare-uvicorn baseline); the started process itself is `Launcher`.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import psutil

TITLE_PREFIXES = ("shoal::", "bare::")
_POLL_S = 0.005


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def http_status(host: str, port: int, path: str, timeout_s: float = 2.0) -> int | None:
    """Status of GET `path`, or None when nothing answers."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def role_of(proc: psutil.Process, root_pid: int) -> str:
    """The role in the process title (`ApiServer_0`, `EngineCore_0`, `Worker_1`), else
    `Launcher` for the started process, `ResourceTracker`, or the process name."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return "gone"
    title = cmdline[0] if cmdline else proc.name()
    for prefix in TITLE_PREFIXES:
        if title.startswith(prefix):
            return title[len(prefix) :].strip()
    if proc.pid == root_pid:
        return "Launcher"
    if any("resource_tracker" in part for part in cmdline):
        return "ResourceTracker"
    return proc.name()


def role_group(role: str) -> str:
    """`ApiServer_1` -> `ApiServer` (the figures of all processes of one kind)."""
    head, _, tail = role.rpartition("_")
    return head if head and tail.isdigit() else role


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


@dataclass
class ServerProcess:
    """One server command (`argv`) serving at http://host:port, its log in `log_path`."""

    argv: list[str]
    host: str
    port: int
    log_path: str
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    _rss: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (role, peak)
    exit_times_s: dict[str, float] = field(default_factory=dict)  # role -> s after the signal
    _sampler: threading.Thread | None = None
    _stop_sampling: threading.Event = field(default_factory=threading.Event)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Start the command (new session, so a stray signal to our group misses it)."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(self.env or {})},
            start_new_session=True,
        )
        log.close()

    def wait_healthy(self, timeout_s: float, path: str = "/health") -> float:
        """Seconds from `start()` until GET `path` answered 200. `RuntimeError` (with the
        log's tail) when the process exits first or `timeout_s` passes."""
        assert self.proc is not None
        deadline = self.started_at + timeout_s
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if http_status(self.host, self.port, path, 1.0) == 200:
                return time.perf_counter() - self.started_at
            time.sleep(0.02)
        raise RuntimeError(f"server not healthy after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, num_lines: int = 30) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-num_lines:])
        return ""

    def processes(self) -> dict[int, tuple[str, psutil.Process]]:
        """pid -> (role, process) over the whole tree, the started process included."""
        assert self.proc is not None
        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {}
        return {p.pid: (role_of(p, root.pid), p) for p in tree}

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds (user + system) each role used since it started."""
        totals: dict[str, float] = {}
        for role, proc in self.processes().values():
            with contextlib.suppress(psutil.Error):
                totals[role] = totals.get(role, 0.0) + _cpu_s(proc)
        return totals

    @property
    def peak_rss_bytes(self) -> dict[str, int]:
        """The largest RSS each role's process had while sampled (roles with several
        processes over time, e.g. a restarted one: the largest of them)."""
        peaks: dict[str, int] = {}
        for role, rss in self._rss.values():
            peaks[role] = max(peaks.get(role, 0), rss)
        return peaks

    def start_rss_sampler(self, interval_s: float = 0.25) -> None:
        """Sample every process's RSS until `stop()` (see `peak_rss_bytes`)."""
        self._stop_sampling.clear()
        self._sampler = threading.Thread(
            target=self._sample_rss, args=(interval_s,), name="rss-sampler", daemon=True
        )
        self._sampler.start()

    def _sample_rss(self, interval_s: float) -> None:
        while not self._stop_sampling.wait(interval_s):
            for pid, (role, proc) in self.processes().items():
                with contextlib.suppress(psutil.Error):
                    rss = int(proc.memory_info().rss)
                    # A child is titled only once it runs: keep the role last seen.
                    self._rss[pid] = (role, max(self._rss.get(pid, ("", 0))[1], rss))

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> tuple[float, int | None]:
        """Send `sig` to the started process; returns (seconds until every process of the
        tree had exited, its exit code). Kills whatever is left after `timeout_s`. When
        each role's process went is left in `exit_times_s`."""
        self._stop_sampling.set()
        assert self.proc is not None
        tree = {pid: (role, p) for pid, (role, p) in self.processes().items()}
        self.exit_times_s = {}
        start = time.perf_counter()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        while tree and time.perf_counter() - start < timeout_s:
            self.proc.poll()
            for pid, (role, p) in list(tree.items()):
                if not _alive(p):
                    self.exit_times_s[role] = time.perf_counter() - start
                    del tree[pid]
            time.sleep(_POLL_S)
        elapsed = time.perf_counter() - start
        self.kill([p for _, p in tree.values()])
        return elapsed, self.proc.returncode

    def kill(self, tree: Iterable[psutil.Process] | None = None) -> None:
        """SIGKILL anything of the tree still running and reap the started process."""
        if self.proc is None:
            return
        victims = list(tree) if tree is not None else [p for _, p in self.processes().values()]
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                if _alive(proc):
                    proc.kill()
        psutil.wait_procs(victims, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(5)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class OtherLoad:
    """CPU seconds used by every process outside `exclude_pids` (and this one) between
    `start()` and `stop()`: the other work sharing the machine with a measurement."""

    def __init__(self) -> None:
        self._start: dict[int, float] = {}

    @staticmethod
    def _snapshot(exclude: set[int]) -> dict[int, float]:
        found = {}
        for proc in psutil.process_iter():
            if proc.pid in exclude:
                continue
            with contextlib.suppress(psutil.Error):
                found[proc.pid] = _cpu_s(proc)
        return found

    def start(self, exclude_pids: Iterable[int]) -> None:
        self._start = self._snapshot({os.getpid(), *exclude_pids})

    def stop(self, exclude_pids: Iterable[int]) -> float:
        """CPU seconds the others used since `start()` (a process that began meanwhile
        counts whole)."""
        end = self._snapshot({os.getpid(), *exclude_pids})
        return sum(cpu - self._start.get(pid, 0.0) for pid, cpu in end.items())


def measure_other_load(duration_s: float, exclude_pids: Iterable[int] = ()) -> float:
    """Cores' worth of CPU the rest of the machine used over `duration_s` seconds."""
    load = OtherLoad()
    excluded = list(exclude_pids)
    load.start(excluded)
    time.sleep(duration_s)
    return load.stop(excluded) / duration_s
