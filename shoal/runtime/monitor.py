"""`wait_for_completion_or_failure`: the launcher's watch over every child until one fails.

What it expects of its arguments (duck-typed; `ProcessManager` provides all of it):

* `api_server_manager.processes`: list of process-likes (`name`, `pid`, `sentinel`,
  `exitcode`, `join`), e.g. `APIServerProcessManager` or `RustFrontendProcessManager`;
* `engine_manager` (optional): a non-empty `.processes` list, watched like the API servers;
  otherwise `monitor_engine_liveness()` (blocks until an engine fails or the manager stops)
  and `failed_proc_name` (`str | None`, set before that call returns), run on a daemon
  thread (the shape of engines that are not local processes, e.g. Ray actors);
* `coordinator` (optional): `.proc`, one process-like.
"""

from __future__ import annotations

import multiprocessing.connection
import threading
from typing import Any

from shoal.logger import init_logger
from shoal.runtime.procs import SPAWN_CTX, ProcessLike, _pid, exitcode_after_exit

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
    """
    watched: dict[Any, ProcessLike | None | _Stop] = {}
    if stop_sentinel is not None:
        watched[stop_sentinel] = _STOP
    _watch(watched, api_server_manager.processes)
    if coordinator is not None:
        _watch(watched, [coordinator.proc])
    monitor: _EngineMonitor | None = None
    if engine_manager is not None:
        if getattr(engine_manager, "processes", None):
            _watch(watched, engine_manager.processes)
        elif hasattr(engine_manager, "monitor_engine_liveness"):
            monitor = _EngineMonitor(engine_manager)
            watched[monitor.sentinel] = None
    try:
        _wait_loop(watched, monitor)
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


def _watch(watched: dict[Any, ProcessLike | None | _Stop], procs: list[ProcessLike]) -> None:
    for proc in procs:
        if _pid(proc) is not None:
            watched[proc.sentinel] = proc


def _wait_loop(
    watched: dict[Any, ProcessLike | None | _Stop], monitor: _EngineMonitor | None
) -> None:
    while any(value is not _STOP for value in watched.values()):
        for sentinel in multiprocessing.connection.wait(list(watched)):
            proc = watched.pop(sentinel)
            if isinstance(proc, _Stop):
                logger.info("stop requested; no longer watching the child processes")
                return
            if proc is None:
                assert monitor is not None
                monitor.check()
                continue
            code = exitcode_after_exit(proc)
            if code != 0:
                raise RuntimeError(
                    f"Process {proc.name} (PID: {proc.pid}) died with exit code {code}"
                )
            logger.info("%s (pid %s) exited normally", proc.name, proc.pid)
