"""wait_for_completion_or_failure and the ProcessManager base, with real processes."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

import pytest

from shoal.runtime.managers import ProcessManager
from shoal.runtime.monitor import wait_for_completion_or_failure
from shoal.runtime.procs import SPAWN_CTX, exitcode_after_exit, guarded_process, start_process
from shoal.runtime.restart import EngineRestartPolicy

from . import stub_targets


class StubManager(ProcessManager):
    """How the serving package's engine manager plugs in: spawn named children."""

    def __init__(self, lifetimes: list[tuple[float, int]], prefix: str = "EngineCore") -> None:
        super().__init__()
        with self.rollback_on_error():
            for i, (delay_s, code) in enumerate(lifetimes):
                self.spawn(stub_targets.exit_after, f"{prefix}_{i}", args=(delay_s, code))


class RemoteEngines:
    """Engines that are not local processes (the Ray-actor shape): a blocking liveness call."""

    def __init__(self, failed_name: str | None, error: Exception | None = None) -> None:
        self.failed_proc_name: str | None = None
        self._failed_name = failed_name
        self._error = error

    def monitor_engine_liveness(self) -> None:
        time.sleep(0.2)
        if self._error is not None:
            raise self._error
        self.failed_proc_name = self._failed_name


def _run_in_thread(fn, *args) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn(*args)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_engine_failure_is_named() -> None:
    api = StubManager([(60, 0)], "ApiServer")
    engines = StubManager([(60, 0), (0.3, 1)])
    try:
        with pytest.raises(
            RuntimeError, match=r"Process EngineCore_1 \(PID: \d+\) died with exit code 1"
        ):
            wait_for_completion_or_failure(api, engine_manager=engines)
    finally:
        api.shutdown(timeout=0)
        engines.shutdown(timeout=0)


def test_clean_exits_everywhere_return() -> None:
    api = StubManager([(0.2, 0)], "ApiServer")
    engines = StubManager([(0.2, 0), (0.4, 0)])
    try:
        wait_for_completion_or_failure(api, engine_manager=engines)
        assert engines.finished_procs() == {"EngineCore_0": 0, "EngineCore_1": 0}
    finally:
        api.shutdown()
        engines.shutdown()


@pytest.mark.parametrize(
    "failed_name, error, message",
    [
        ("Actor 7", None, "Engine core process Actor 7 died unexpectedly"),
        (None, OSError("ray is gone"), "engine liveness monitor failed"),
    ],
)
def test_remote_engine_monitor(
    failed_name: str | None, error: Exception | None, message: str
) -> None:
    api = StubManager([(60, 0)], "ApiServer")
    try:
        with pytest.raises(RuntimeError, match=message):
            wait_for_completion_or_failure(api, engine_manager=RemoteEngines(failed_name, error))
    finally:
        api.shutdown(timeout=0)


def test_remote_engine_monitor_ending_cleanly_is_not_a_failure() -> None:
    api = StubManager([(0.5, 0)], "ApiServer")
    try:
        wait_for_completion_or_failure(api, engine_manager=RemoteEngines(None))
    finally:
        api.shutdown()


def _signal_once_waiting(signum: int) -> threading.Thread:
    """Send `signum` to this process once the main thread is inside the wait loop (a
    KeyboardInterrupt anywhere else would stop the whole test session)."""
    main_id = threading.main_thread().ident

    def in_wait_loop() -> bool:
        frame = sys._current_frames().get(main_id)
        while frame is not None:
            if frame.f_code.co_name == "_wait_loop":
                return True
            frame = frame.f_back
        return False

    def run() -> None:
        deadline = time.monotonic() + 60
        while not in_wait_loop() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signum)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_keyboard_interrupt_returns() -> None:
    api = StubManager([(60, 0)], "ApiServer")
    try:
        signaller = _signal_once_waiting(signal.SIGINT)
        assert wait_for_completion_or_failure(api) is None
        signaller.join(5)
    finally:
        api.shutdown(timeout=0)


def test_stop_sentinel_ends_the_wait() -> None:
    # How a launcher whose signal handlers only set a flag ends the wait.
    api = StubManager([(60, 0)], "ApiServer")
    stop_recv, stop_send = SPAWN_CTX.Pipe(duplex=False)
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: stop_send.send(True))
    try:
        signaller = _signal_once_waiting(signal.SIGUSR1)
        assert wait_for_completion_or_failure(api, stop_sentinel=stop_recv) is None
        assert all(p.is_alive() for p in api.processes)
        signaller.join(5)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        stop_recv.close()
        stop_send.close()
        api.shutdown(timeout=0)


def test_monitor_engine_liveness_records_a_failure() -> None:
    engines = StubManager([(60, 0), (0.2, 5)])
    try:
        engines.monitor_engine_liveness()
        assert engines.failed_proc_name == "EngineCore_1"
    finally:
        engines.shutdown(timeout=0)


def test_monitor_engine_liveness_returns_when_shut_down() -> None:
    engines = StubManager([(60, 0)])
    thread, errors = _run_in_thread(engines.monitor_engine_liveness)
    time.sleep(0.3)
    engines.shutdown(timeout=0)
    thread.join(timeout=10)
    assert not thread.is_alive() and errors == []
    assert engines.failed_proc_name is None
    engines.shutdown()  # idempotent


def test_cleanups_run_after_the_processes_stop() -> None:
    engines = StubManager([(60, 0)])
    seen: list[bool] = []
    proc = engines.processes[0]
    engines.add_cleanup(lambda: seen.append(proc.is_alive()))
    engines.add_cleanup(lambda: 1 / 0)  # logged, not raised; later cleanups still run
    engines.add_cleanup(lambda: seen.append(True))
    engines.shutdown(timeout=0)
    assert seen == [False, True]


# -- restarts (restart_policy) --------------------------------------------------------------------


def replacement_engine(ready: Connection, is_ready: bool, lifetime_s: float, code: int) -> None:
    """A replacement engine stub: reports READY (or not), lives `lifetime_s`, exits `code`."""
    if is_ready:
        ready.send_bytes(b"READY")
    time.sleep(lifetime_s)
    sys.exit(code)


class RestartableEngines(StubManager):
    """The restart interface of the serving package's engine manager over stub processes:
    replacement i runs `replacements[i]` = (reports READY, lifetime in s, exit code)."""

    def __init__(
        self, lifetimes: list[tuple[float, int]], replacements: list[tuple[bool, float, int]]
    ) -> None:
        super().__init__(lifetimes)
        self.replacements = list(replacements)
        self.announced: list[int] = []
        self._pipes: dict[int, Connection] = {}

    def announce_dead(self, engine_index: int, reason: str) -> None:
        self.announced.append(engine_index)

    def restart(self, engine_index: int) -> Connection:
        recv, send = SPAWN_CTX.Pipe(duplex=False)
        args = (send, *self.replacements.pop(0))
        proc = guarded_process(replacement_engine, f"EngineCore_{engine_index}", args)
        start_process(proc)
        send.close()
        self.processes[engine_index] = proc
        self._pipes[engine_index] = recv
        return recv

    def recv_restart_ready(self, engine_index: int) -> None:
        pipe = self._pipes.pop(engine_index)
        proc = self.processes[engine_index]
        try:
            pipe.recv_bytes()
        except EOFError as e:
            code = exitcode_after_exit(proc)
            raise EngineRestartPolicy.crash_loop(proc.name, proc.pid, code) from e
        finally:
            pipe.close()


def _restarts(max_restarts: int = 3, ready_timeout_s: float = 60.0) -> EngineRestartPolicy:
    return EngineRestartPolicy(max_restarts, window_s=600.0, ready_timeout_s=ready_timeout_s)


def test_an_engine_is_replaced_until_the_policy_refuses() -> None:
    api = StubManager([(60, 0)], "ApiServer")
    engines = RestartableEngines([(60, 0), (0.2, 1)], [(True, 0.5, 9)])
    try:
        with pytest.raises(
            RuntimeError,
            match=r"Process EngineCore_1 \(PID: \d+\) died with exit code 9; not restarting it "
            r"again: it was restarted 1 time\(s\) in the last 600 s",
        ):
            wait_for_completion_or_failure(api, engines, restart_policy=_restarts(1))
        assert engines.announced == [1]
        assert engines.processes[0].is_alive() and api.processes[0].is_alive()
    finally:
        api.shutdown(timeout=0)
        engines.shutdown(timeout=0)


@pytest.mark.parametrize(
    ("replacement", "ready_timeout_s", "message"),
    [
        ((False, 0.2, 3), 60.0, r"EngineCore_0 \(pid \d+\) exited with code 3 after a restart"),
        ((False, 60, 0), 0.5, r"EngineCore_0 did not report READY within 0.5s of its restart"),
    ],
)
def test_a_replacement_that_never_gets_ready_ends_the_wait(
    replacement: tuple[bool, float, int], ready_timeout_s: float, message: str
) -> None:
    api = StubManager([(60, 0)], "ApiServer")
    engines = RestartableEngines([(0.2, 0)], [replacement])  # exit 0 is replaced too
    try:
        with pytest.raises(RuntimeError, match=message):
            wait_for_completion_or_failure(
                api, engines, restart_policy=_restarts(ready_timeout_s=ready_timeout_s)
            )
    finally:
        api.shutdown(timeout=0)
        engines.shutdown(timeout=0)


def test_with_restarts_the_wait_ends_when_the_api_servers_exit() -> None:
    # Engines never "complete" while they are replaced: the API servers' exit ends the wait.
    api = StubManager([(0.5, 0)], "ApiServer")
    engines = RestartableEngines([(60, 0)], [])
    try:
        assert wait_for_completion_or_failure(api, engines, restart_policy=_restarts()) is None
        assert engines.processes[0].is_alive()
    finally:
        api.shutdown(timeout=0)
        engines.shutdown(timeout=0)


def test_a_policy_that_does_not_restart_changes_nothing() -> None:
    api = StubManager([(60, 0)], "ApiServer")
    engines = RestartableEngines([(0.2, 1)], [(True, 60, 0)])
    policy = EngineRestartPolicy(enabled=False)
    try:
        with pytest.raises(
            RuntimeError, match=r"Process EngineCore_0 \(PID: \d+\) died with exit code 1$"
        ):
            wait_for_completion_or_failure(api, engines, restart_policy=policy)
        assert engines.announced == [] and len(engines.replacements) == 1
    finally:
        api.shutdown(timeout=0)
        engines.shutdown(timeout=0)


def test_restart_policy_decisions() -> None:
    off = EngineRestartPolicy(enabled=False)
    assert not off.restarts_engines and off.stall_exit_s(5.0) is None
    with pytest.raises(RuntimeError, match="^death$"):
        off.restart_or_fail(0, "death", 0.0)
    on = EngineRestartPolicy(max_restarts=1, window_s=10.0)
    assert on.restarts_engines and on.stall_exit_s(5.0) == 5.0
    on.restart_or_fail(0, "death", 0.0)
    with pytest.raises(RuntimeError, match="death; not restarting it again"):
        on.restart_or_fail(0, "death", 5.0)
    on.restart_or_fail(0, "death", 10.5)  # the first restart left the window
