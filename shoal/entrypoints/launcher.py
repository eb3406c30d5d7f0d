"""`run_serve`: the `shoal serve` process. Binds the HTTP socket, starts and wires every child,
waits for completion or failure, and shuts everything down under one deadline.

Start-up order (see docs/serving.md):
 1. bind + listen on host:port (once; a port in use is an error, never shared)
 2. DP coordinator (M > 1), then M engines, which start loading the model
 3. N API servers on the inherited socket; gather the ZMQ addresses they bound
 4. hand the addresses to the engines; wait for every engine's READY (deadline)
 5. log "shoal is ready at http://host:port"; wait_for_completion_or_failure, or with
    --restart-dead-engines `_watch_with_restarts` (an engine that exits is replaced)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import os
import signal
import socket
import time
from multiprocessing.connection import wait
from types import FrameType
from typing import Any

from shoal.config import ShoalConfig
from shoal.engine.coordinator import DPCoordinator
from shoal.engine.manager import READY_TIMEOUT_HINT, CoreEngineProcManager
from shoal.entrypoints.serve_args import config_from_args
from shoal.envs import ENVS
from shoal.logger import init_logger
from shoal.model_source import resolve_model
from shoal.runtime.addresses import remove_ipc_run_dir, unlink_ipc_address
from shoal.runtime.procs import exitcode_after_exit
from shoal.utils import (
    APIServerProcessManager,
    get_engine_client_zmq_addr,
    wait_for_completion_or_failure,
)

logger = init_logger(__name__)

# Beyond --shutdown-timeout, what processes get to exit cleanly before they are killed.
EXIT_GRACE_S = 2.0
_LISTEN_BACKLOG = 2048


class ShutdownRequested(BaseException):
    """Raised by a SIGINT / SIGTERM during start-up to leave whatever the launcher waits on.

    A BaseException so that no `except Exception` on the way swallows it."""


class PortInUseError(OSError):
    pass


def bind_listen_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on host:port (port 0: the kernel picks one). No SO_REUSEPORT, so a
    second server on the same port fails here. `PortInUseError` / `OSError` name host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # SO_REUSEADDR only lets us rebind over TIME_WAIT; Linux still refuses a port that
    # another socket listens on.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(_LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise PortInUseError(
                e.errno,
                f"{_hostport(host, port)} is already in use (is another server "
                "running there?); stop it or choose another --port",
            ) from e
        raise OSError(e.errno, f"cannot listen on {_hostport(host, port)}: {e.strerror}") from e
    return sock


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Children:
    """What the launcher started, for the shared shutdown."""

    def __init__(self) -> None:
        self.coordinator: DPCoordinator | None = None
        self.engines: CoreEngineProcManager | None = None
        self.api_servers: APIServerProcessManager | None = None
        self.ipc_addresses: list[str] = []

    def watched(self) -> list:
        procs = list(self.api_servers.processes) if self.api_servers else []
        return procs + ([self.coordinator.proc] if self.coordinator else [])

    def shutdown(self, drain_timeout_s: float | None) -> None:
        """API servers first (they drain for `drain_timeout_s`), then engines, then the
        coordinator, all under one deadline; None = each the runtime's default grace."""
        deadline = time.monotonic() + (drain_timeout_s or 0.0) + EXIT_GRACE_S

        def remaining(floor: float) -> float | None:
            if drain_timeout_s is None:
                return None
            return max(deadline - time.monotonic(), floor)

        try:
            if self.api_servers is not None:
                self.api_servers.shutdown(remaining(EXIT_GRACE_S))
            if self.engines is not None:
                self.engines.shutdown(remaining(1.0))
            if self.coordinator is not None:
                self.coordinator.shutdown(remaining(0.5))
        finally:
            for address in self.ipc_addresses:
                unlink_ipc_address(address)
            remove_ipc_run_dir()


def run_serve(args: argparse.Namespace) -> int:
    """Run `shoal serve` until SIGINT / SIGTERM (exit 0) or a child's death (exit 1, the
    child named in the log). Bad flags raise `ValueError`, a missing model
    `FileNotFoundError` (the CLI turns both into exit 2)."""
    config = config_from_args(args)
    resolve_model(config.model.model)  # fail before starting anything
    try:
        sock = bind_listen_socket(args.host, args.port)
    except OSError as e:
        logger.error("%s", e.strerror or e)
        return 1
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    _SignalState.install()
    try:
        return _serve(args, config, sock, f"http://{host}:{port}")
    except ShutdownRequested:  # a signal that landed in an except block: still a clean stop
        return 0


def _serve(
    args: argparse.Namespace, config: ShoalConfig, sock: socket.socket, listen_address: str
) -> int:
    children = _Children()
    try:
        _start(args, config, sock, listen_address, children)
        _SignalState.serving = True
        logger.info("shoal is ready at %s", listen_address)
        if getattr(args, "restart_dead_engines", False):
            _watch_with_restarts(children, args.engine_ready_timeout or ENVS.engine_ready_timeout_s)
        else:
            wait_for_completion_or_failure(
                children.api_servers,
                children.engines,
                children.coordinator,
                stop_sentinel=_SignalState.stop_fd,
            )
        if not _SignalState.received:
            return 0  # every child exited cleanly on its own
        logger.info(
            "shutting down: draining in-flight requests for up to %.1f s", args.shutdown_timeout
        )
        return 0
    except ShutdownRequested:
        logger.info("shutting down during start-up")
        return 0
    except RuntimeError as e:
        logger.error("%s", e)
        if children.engines is not None:
            children.engines.announce_failed_engines()
        return 1
    finally:
        _SignalState.shutting_down = True
        sock.close()
        children.shutdown(args.shutdown_timeout if _SignalState.received else None)
        _SignalState.uninstall()
        logger.info("shoal stopped")


def _start(
    args: argparse.Namespace,
    config: ShoalConfig,
    sock: socket.socket,
    listen_address: str,
    children: _Children,
) -> None:
    num_engines, num_api_servers = args.data_parallel_size, args.api_server_count
    ready_timeout_s = args.engine_ready_timeout or ENVS.engine_ready_timeout_s
    if num_engines > 1:
        children.coordinator = DPCoordinator(num_engines, args.host)
    children.engines = CoreEngineProcManager(
        config,
        num_engines,
        coordinator_address=children.coordinator.load_address if children.coordinator else None,
        drain_timeout_s=args.shutdown_timeout,
        ready_timeout_s=ready_timeout_s,
        # With restarts, a hung engine exits itself, so that it is restarted like a dead one.
        stall_exit_s=(
            args.engine_stall_timeout or None
            if getattr(args, "restart_dead_engines", False)
            else None
        ),
    )
    inputs = [get_engine_client_zmq_addr(True, args.host) for _ in range(num_api_servers)]
    outputs = [get_engine_client_zmq_addr(True, args.host) for _ in range(num_api_servers)]
    children.ipc_addresses = inputs + outputs
    children.api_servers = APIServerProcessManager(
        listen_address,
        sock,
        _api_server_args(args),
        num_api_servers,
        inputs,
        outputs,
        stats_update_address=(
            children.coordinator.stats_update_address if children.coordinator else None
        ),
    )
    actual_inputs, actual_outputs = children.api_servers.gather_actual_addresses(ready_timeout_s)
    # Every API server holds its own copy of the listening socket by now. Closing ours means
    # that once they stop accepting (shutdown), new connections are refused, not queued.
    sock.close()
    children.ipc_addresses += actual_inputs + actual_outputs
    children.engines.send_addresses(actual_inputs, actual_outputs)
    children.engines.wait_for_ready(ready_timeout_s, watched=children.watched())


class RestartPolicy:
    """--restart-dead-engines: how often one engine may be restarted. An engine that exits
    is restarted unless it already was `max_restarts` times in the last `window_s` seconds
    (SHOAL_MAX_ENGINE_RESTARTS, SHOAL_ENGINE_RESTART_WINDOW_S); then the run ends."""

    def __init__(self, max_restarts: int, window_s: float) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._history: dict[int, collections.deque[float]] = collections.defaultdict(
            collections.deque
        )

    def allow(self, engine_index: int, now: float) -> bool:
        """Whether engine `engine_index` may be restarted now (recorded if so)."""
        history = self._history[engine_index]
        while history and now - history[0] > self.window_s:
            history.popleft()
        if len(history) >= self.max_restarts:
            return False
        history.append(now)
        return True

    def restarts(self, engine_index: int) -> int:
        return len(self._history[engine_index])


def _watch_with_restarts(children: _Children, ready_timeout_s: float) -> None:
    """`wait_for_completion_or_failure` for --restart-dead-engines: an engine that exits
    (any code) is announced dead to every API server and replaced by a fresh process of
    the same index; its handshake pipe joins the wait set, so every other child and the
    stop pipe stay watched while it loads. Returns on a stop signal or once every API
    server exited 0. `RuntimeError` naming the process: an API server or the coordinator
    died, a restarted engine died (or timed out) before READY, or the restart policy
    refused another restart."""
    engines = children.engines
    assert engines is not None and children.api_servers is not None
    policy = RestartPolicy(ENVS.max_engine_restarts, ENVS.engine_restart_window_s)
    others: dict[Any, Any] = {p.sentinel: p for p in children.watched()}
    api_server_sentinels = {p.sentinel for p in children.api_servers.processes}
    # Restarted engines not READY yet: engine index -> (handshake pipe, deadline).
    pending: dict[int, tuple[Any, float]] = {}
    while any(s in others for s in api_server_sentinels):
        engine_sentinels = {p.sentinel: k for k, p in enumerate(engines.processes)}
        pipes = {pipe: k for k, (pipe, _) in pending.items()}
        timeout = None
        if pending:
            timeout = max(min(d for _, d in pending.values()) - time.monotonic(), 0.0)
        ready = wait([_SignalState.stop_fd, *others, *engine_sentinels, *pipes], timeout)
        if _SignalState.stop_fd in ready or _SignalState.received:
            logger.info("stop requested; no longer watching the child processes")
            return
        for obj in ready:
            if obj in pipes:
                k = pipes[obj]
                del pending[k]
                engines.recv_restart_ready(k)  # RuntimeError if it died instead
        for obj in ready:
            if obj in others:
                proc = others.pop(obj)
                code = exitcode_after_exit(proc)
                if code != 0:
                    raise RuntimeError(
                        f"Process {proc.name} (PID: {proc.pid}) died with exit code {code}"
                    )
                logger.info("%s (pid %s) exited normally", proc.name, proc.pid)
            elif obj in engine_sentinels:
                k = engine_sentinels[obj]
                proc = engines.processes[k]
                code = exitcode_after_exit(proc)
                if k in pending:
                    raise RuntimeError(
                        f"{proc.name} (pid {proc.pid}) exited with code {code} after a "
                        "restart, before it reported READY (crash loop?); see its log above"
                    )
                if not policy.allow(k, time.monotonic()):
                    raise RuntimeError(
                        f"Process {proc.name} (PID: {proc.pid}) died with exit code {code}; "
                        f"not restarting it again: it was restarted {policy.restarts(k)} "
                        f"time(s) in the last {policy.window_s:g} s (SHOAL_MAX_ENGINE_RESTARTS)"
                    )
                logger.error(
                    "Process %s (PID: %s) died with exit code %s; restarting it "
                    "(--restart-dead-engines, restart %d in %g s)",
                    proc.name,
                    proc.pid,
                    code,
                    policy.restarts(k),
                    policy.window_s,
                )
                engines.announce_dead(k, f"{proc.name} died with exit code {code}")
                pipe = engines.restart(k)
                pending[k] = (pipe, time.monotonic() + ready_timeout_s)
        now = time.monotonic()
        for k, (_, deadline) in pending.items():
            if now >= deadline:
                raise RuntimeError(
                    f"{engines.processes[k].name} did not report READY within "
                    f"{ready_timeout_s:.1f}s of its restart; {READY_TIMEOUT_HINT}"
                )


def _api_server_args(args: argparse.Namespace) -> argparse.Namespace:
    # `func` is the CLI's callback: API servers need the flags only.
    return argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})


class _SignalState:
    """SIGINT / SIGTERM. While serving, the handler only sets `received` and writes to a
    self-pipe whose read end (`stop_fd`) ends `wait_for_completion_or_failure`. During
    start-up (model loading can take minutes) the first signal raises `ShutdownRequested`
    to leave whichever wait it interrupts. Once shutting down, signals are only logged."""

    received = False
    serving = False
    shutting_down = False
    stop_fd = -1
    _wake_fd = -1

    @classmethod
    def install(cls) -> None:
        cls.received = cls.serving = cls.shutting_down = False
        cls.stop_fd, cls._wake_fd = os.pipe()
        os.set_blocking(cls._wake_fd, False)
        signal.signal(signal.SIGINT, cls.handle)
        signal.signal(signal.SIGTERM, cls.handle)

    @classmethod
    def uninstall(cls) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for fd in (cls.stop_fd, cls._wake_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        cls.stop_fd = cls._wake_fd = -1

    @classmethod
    def handle(cls, signum: int, frame: FrameType | None) -> None:
        first = not cls.received
        cls.received = True
        logger.info(
            "received %s%s", signal.Signals(signum).name, "" if first else ": already shutting down"
        )
        with contextlib.suppress(OSError):
            os.write(cls._wake_fd, b"\0")
        if first and not cls.serving and not cls.shutting_down:
            raise ShutdownRequested()
