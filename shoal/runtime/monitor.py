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
  (reads its READY; `RuntimeError` if it died instead), as `CoreEngineProcManager` does. A
  monitored manager (`CoreEngineActorManager`) restarts the same way once its
  `monitor_engine_liveness()` set `failed_engine_index` (and `failure_reason`); it also
  provides `clear_failure()` and `engine_name(k)`;
* `engine_monitors` (optional, shoal's addition): more objects with
  `monitor_engine_liveness()` and `failed_proc_name` / `failure_reason`, each watched on its
  own thread (e.g. the --headless hosts that joined the front end).
"""

from __future__ import annotations

import multiprocessing.connection
import threading
import time
from collections.abc import Sequence
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
        reason = getattr(self.engine_manager, "failure_reason", None)
        if reason:
            raise RuntimeError(reason)
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
    engine_monitors: Sequence[Any] = (),
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
    A monitored engine manager (Ray actors) is restarted the same way when its liveness
    monitor names the failed engine. Each of `engine_monitors` (shoal's addition, e.g. the
    --headless hosts) is watched on its own thread; one that reports a failure ends the wait
    with `RuntimeError(failure_reason)`.
    """
    watched: dict[Any, _Watched] = {}
    if stop_sentinel is not None:
        watched[stop_sentinel] = _STOP
    _watch(watched, api_server_manager.processes)
    if coordinator is not None:
        _watch(watched, [coordinator.proc])
    restarts: _EngineRestarts | None = None
    monitored = [*engine_monitors]
    if engine_manager is not None:
        restarting = restart_policy is not None and restart_policy.restarts_engines
        if restarting:
            assert restart_policy is not None
            restarts = _EngineRestarts(engine_manager, restart_policy)
        if getattr(engine_manager, "processes", None):
            _watch(watched, engine_manager.processes, replaceable=restarting)
        elif hasattr(engine_manager, "monitor_engine_liveness"):
            monitored.append(engine_manager)
    monitors = [_EngineMonitor(m) for m in monitored]
    for monitor in monitors:
        watched[monitor.sentinel] = monitor
    try:
        _wait_loop(watched, monitors, restarts)
    except KeyboardInterrupt:
        logger.info("interrupted; shutting down")
    except RuntimeError as e:
        logger.error("%s", e)
        raise
    except Exception:
        logger.exception("error while watching the child processes")
        raise
    finally:
        for monitor in monitors:
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


# By sentinel: a child, an engine liveness monitor or the caller's stop sentinel.
_Watched = _Child | _EngineMonitor | _Stop


def _watch(
    watched: dict[Any, _Watched], procs: list[ProcessLike], replaceable: bool = False
) -> None:
    for k, proc in enumerate(procs):
        if _pid(proc) is not None:
            watched[proc.sentinel] = _Child(proc, k if replaceable else None)


def _keeps_waiting(value: _Watched) -> bool:
    if isinstance(value, _Child):
        return value.engine_index is None
    return isinstance(value, _EngineMonitor)


def _wait_loop(
    watched: dict[Any, _Watched],
    monitors: list[_EngineMonitor],
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
            if isinstance(child, _EngineMonitor):
                monitors.append(_monitor_ended(watched, child, restarts))
            elif isinstance(child, _Child):
                _child_exited(watched, child, restarts)
        if restarts is not None:
            restarts.check_deadlines()


def _monitor_ended(
    watched: dict[Any, _Watched], monitor: _EngineMonitor, restarts: _EngineRestarts | None
) -> _EngineMonitor:
    """A liveness monitor returned: replace the failed engine and watch again (restart mode,
    a manager that restarts), else raise its failure. Returns the monitor now watching."""
    manager = monitor.engine_manager
    k = getattr(manager, "failed_engine_index", None)
    if restarts is None or k is None or restarts.engines is not manager or monitor.error:
        monitor.check()  # returned without a failure: the manager was shut down
        return monitor
    restarts.replace_monitored(k, manager.failure_reason or f"engine {k} died")
    manager.clear_failure()
    monitor.sentinel.close()
    again = _EngineMonitor(manager)
    watched[again.sentinel] = again
    return again


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

    def replace_monitored(self, engine_index: int, death: str) -> None:
        """Engine `engine_index` of a monitored manager (Ray actors) failed with `death`:
        restart it as the policy allows (`RuntimeError` otherwise, or when it was a
        replacement not READY yet)."""
        name = self.engines.engine_name(engine_index)
        if engine_index in self.pending:
            raise RuntimeError(
                f"{name} failed again after a restart, before it reported READY (crash loop?): "
                f"{death}"
            )
        self.policy.restart_or_fail(engine_index, death, time.monotonic())
        logger.error(
            "%s; restarting it (--restart-dead-engines, restart %d in %g s)",
            death,
            self.policy.restarts(engine_index),
            self.policy.window_s,
        )
        self.engines.announce_dead(engine_index, death)
        pipe = self.engines.restart(engine_index)
        self.pending[engine_index] = (pipe, time.monotonic() + self.policy.ready_timeout_s)

    def check_deadlines(self) -> None:
        now = time.monotonic()
        for k, (_, deadline) in self.pending.items():
            if now >= deadline:
                raise self.policy.ready_timeout(self._name(k))

    def _name(self, engine_index: int) -> str:
        if self.engines.processes:
            return str(self.engines.processes[engine_index].name)
        return str(self.engines.engine_name(engine_index))
