"""`wait_for_completion_or_failure`: the launcher's watch over every child until one fails.

What it expects of its arguments (duck-typed; `ProcessManager` provides all of it):

* `api_server_manager.processes`: list of process-likes (`name`, `pid`, `sentinel`,
  `exitcode`, `join`), e.g. `APIServerProcessManager` or `RustFrontendProcessManager`;
* `engine_manager` (optional): a non-empty `.processes` list, watched like the API servers;
  otherwise `monitor_engine_liveness()` (blocks until an engine fails or the manager stops)
  and `failed_proc_name` (`str | None`, set before that call returns), run on a daemon
  thread (the shape of engines that are not local processes, e.g. Ray actors);
* `coordinator` (optional): `.proc`, one process-like;
* `restart_policy` (optional, shoal's addition; shoal.runtime.restart): when it restarts
  engines, `engine_manager` must also provide `announce_dead(k, reason)`, `restart(k)` (starts
  a replacement in `processes[k]` and returns its handshake pipe) and `recv_restart_ready(k)`
  (reads its READY; `RuntimeError` if it died instead), as `CoreEngineProcManager` does.
"""

from __future__ import annotations

import multiprocessing.connection
import threading
import time
from dataclasses import dataclass
from typing import Any

from shoal.logger import init_logger
from shoal.runtime.procs import SPAWN_CTX, ProcessLike, _pid, exitcode_after_exit
from shoal.runtime.restart import EngineRestartPolicy

logger = init_logger(__name__)


class _EngineMonitor:
    """Runs `engine_manager.monitor_engine_liveness()` on a daemon thread; `sentinel` turns
    readable (EOF) when that call returns or raises."""

    def __init__(self, engine_manager: Any) -> None:
        self.engine_manager = engine_manager
        self.error: BaseException | None = None
        self.sentinel, self._send = SPAWN_CTX.Pipe(duplex=False)
        threading.Thread(target=self._run, name="EngineLivenessMonitor", daemon=True).start()

    def _run(self) -> None:
        try:
            self.engine_manager.monitor_engine_liveness()
        except BaseException as e:
            self.error = e
        finally:
            # Only the write end: the main thread may be waiting on the read end.
            self._send.close()

    def check(self) -> None:
        """Raise if the monitor ended because an engine failed (or the monitor broke)."""
        name = getattr(self.engine_manager, "failed_proc_name", None)
        if name is not None:
            raise RuntimeError(f"Engine core process {name} died unexpectedly.")
        if self.error is not None:
            raise RuntimeError(f"engine liveness monitor failed: {self.error!r}") from self.error


def wait_for_completion_or_failure(
    api_server_manager: Any,
    engine_manager: Any | None = None,
    coordinator: Any | None = None,
    *,
    stop_sentinel: Any | None = None,
    restart_policy: EngineRestartPolicy | None = None,
) -> None:
    """Block until every watched process has exited 0, or raise when one fails.

    Raises `RuntimeError("Process <name> (PID: <pid>) died with exit code <code>")` for
    the first process seen to exit non-zero (woken by its sentinel, so within moments of
    the death), or `RuntimeError("Engine core process <name> died unexpectedly.")` from
    an engine liveness monitor. Returns None on KeyboardInterrupt, and as soon as
    `stop_sentinel` (shoal's addition: anything `multiprocessing.connection.wait` accepts,
    e.g. the read end of a pipe a flag-setting signal handler writes to) turns ready; a
    handler that only sets a flag cannot otherwise end the wait. Shuts nothing down:
    the caller's `finally` calls each manager's `shutdown()`. See the module docstring for
    what the arguments must provide.

    With a `restart_policy` that restarts engines (shoal's addition, --restart-dead-engines),
    an engine process that exits (any code) is announced dead to the API servers and
    replaced while everything else stays watched, as long as the policy allows
    (`EngineRestartPolicy.restart_or_fail`); a replacement that exits before its READY, or
    is not READY in time, ends the wait with `RuntimeError` naming it. The wait then
    returns once the other watched processes exited 0 (the engines never "complete").
    """
    watched: dict[Any, _Watched] = {}
    if stop_sentinel is not None:
        watched[stop_sentinel] = _STOP
    _watch(watched, api_server_manager.processes)
    if coordinator is not None:
        _watch(watched, [coordinator.proc])
    monitor: _EngineMonitor | None = None
    restarts: _EngineRestarts | None = None
    if engine_manager is not None:
        if getattr(engine_manager, "processes", None):
            if restart_policy is not None and restart_policy.restarts_engines:
                restarts = _EngineRestarts(engine_manager, restart_policy)
                _watch(watched, engine_manager.processes, replaceable=True)
            else:
                _watch(watched, engine_manager.processes)
        elif hasattr(engine_manager, "monitor_engine_liveness"):
            monitor = _EngineMonitor(engine_manager)
            watched[monitor.sentinel] = None
    try:
        _wait_loop(watched, monitor, restarts)
    except KeyboardInterrupt:
        logger.info("interrupted; shutting down")
    except RuntimeError as e:
        logger.error("%s", e)
        raise
    except Exception:
        logger.exception("error while watching the child processes")
        raise
    finally:
        if monitor is not None:
            monitor.sentinel.close()


class _Stop:
    """Marks the caller's stop sentinel among the watched ones."""


_STOP = _Stop()


@dataclass
class _Child:
    """A watched process. `engine_index`: set for an engine the restart policy may replace
    (its index in `engine_manager.processes`); such a child never ends the wait by exiting."""

    proc: ProcessLike
    engine_index: int | None = None


# By sentinel: a child, the engine liveness monitor (None) or the caller's stop sentinel.
_Watched = _Child | None | _Stop


def _watch(
    watched: dict[Any, _Watched], procs: list[ProcessLike], replaceable: bool = False
) -> None:
    for k, proc in enumerate(procs):
        if _pid(proc) is not None:
            watched[proc.sentinel] = _Child(proc, k if replaceable else None)


def _keeps_waiting(value: _Watched) -> bool:
    if isinstance(value, _Child):
        return value.engine_index is None
    return value is None


def _wait_loop(
    watched: dict[Any, _Watched],
    monitor: _EngineMonitor | None,
    restarts: _EngineRestarts | None = None,
) -> None:
    while any(_keeps_waiting(value) for value in watched.values()):
        pipes = restarts.pipes() if restarts is not None else []
        timeout = restarts.timeout_s() if restarts is not None else None
        ready = multiprocessing.connection.wait([*watched, *pipes], timeout)
        if any(watched.get(obj) is _STOP for obj in ready):
            logger.info("stop requested; no longer watching the child processes")
            return
        if restarts is not None:
            # Pipes first: a replacement that reported READY and then exited is a death of
            # a ready engine (restarted again), not a crash loop.
            restarts.receive_ready(ready)
        for sentinel in ready:
            if sentinel not in watched:
                continue  # a handshake pipe, handled above
            child = watched.pop(sentinel)
            if child is None:
                assert monitor is not None
                monitor.check()
            elif isinstance(child, _Child):
                _child_exited(watched, child, restarts)
        if restarts is not None:
            restarts.check_deadlines()


def _child_exited(
    watched: dict[Any, _Watched], child: _Child, restarts: _EngineRestarts | None
) -> None:
    proc = child.proc
    if child.engine_index is not None:
        assert restarts is not None
        replacement = restarts.replace(child.engine_index, proc)
        watched[replacement.proc.sentinel] = replacement
        return
    code = exitcode_after_exit(proc)
    if code != 0:
        raise RuntimeError(f"Process {proc.name} (PID: {proc.pid}) died with exit code {code}")
    logger.info("%s (pid %s) exited normally", proc.name, proc.pid)


class _EngineRestarts:
    """Replaces the engines of `engine_manager` that exit, as `policy` decides. A
    replacement's handshake pipe joins the wait until it reports READY, against the
    policy's deadline."""

    def __init__(self, engine_manager: Any, policy: EngineRestartPolicy) -> None:
        self.engines = engine_manager
        self.policy = policy
        # Replacements not READY yet: engine index -> (handshake pipe, monotonic deadline).
        self.pending: dict[int, tuple[Any, float]] = {}

    def pipes(self) -> list[Any]:
        return [pipe for pipe, _ in self.pending.values()]

    def timeout_s(self) -> float | None:
        """Until the nearest READY deadline; None while no replacement is pending."""
        if not self.pending:
            return None
        return max(min(d for _, d in self.pending.values()) - time.monotonic(), 0.0)

    def receive_ready(self, ready: list[Any]) -> None:
        """Take the READY of every pending replacement whose pipe is in `ready`;
        `RuntimeError` (from the manager) for one that exited instead."""
        for k, (pipe, _) in list(self.pending.items()):
            if pipe in ready:
                del self.pending[k]
                self.engines.recv_restart_ready(k)

    def replace(self, engine_index: int, proc: ProcessLike) -> _Child:
        """Engine `engine_index` (`proc`) exited: restart it, or raise `RuntimeError` when
        it was a replacement not READY yet or the policy refuses. Returns the replacement."""
        code = exitcode_after_exit(proc)
        if engine_index in self.pending:
            raise self.policy.crash_loop(proc.name, proc.pid, code)
        death = f"Process {proc.name} (PID: {proc.pid}) died with exit code {code}"
        self.policy.restart_or_fail(engine_index, death, time.monotonic())
        logger.error(
            "%s; restarting it (--restart-dead-engines, restart %d in %g s)",
            death,
            self.policy.restarts(engine_index),
            self.policy.window_s,
        )
        self.engines.announce_dead(engine_index, f"{proc.name} died with exit code {code}")
        pipe = self.engines.restart(engine_index)
        self.pending[engine_index] = (pipe, time.monotonic() + self.policy.ready_timeout_s)
        return _Child(self.engines.processes[engine_index], engine_index)

    def check_deadlines(self) -> None:
        now = time.monotonic()
        for k, (_, deadline) in self.pending.items():
            if now >= deadline:
                raise self.policy.ready_timeout(self.engines.processes[k].name)
