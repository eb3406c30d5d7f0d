"""`run_serve`: the `shoal serve` process. Binds the HTTP socket, starts and wires every child,
waits for completion or failure, and shuts everything down under one deadline.

Start-up order (docs/architecture.md, "Start-up"):
 1. bind + listen on host:port (once; a port in use is an error, never shared)
 2. DP coordinator (M > 1), then M engines, which start loading the model
 3. N API servers on the inherited socket; gather the ZMQ addresses they bound
 4. hand the addresses to the engines; wait for every engine's READY (deadline)
 5. log "shoal is ready at http://host:port"; wait_for_completion_or_failure (with
    --restart-dead-engines its `EngineRestartPolicy` replaces an engine that exits)

Everything is configured by the two configs `shoal serve` built from its flags: `ShoalConfig`
for the engines, `ServerConfig` for this process and the API servers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import time
from types import FrameType

from shoal.config import ServerConfig, ShoalConfig
from shoal.engine.coordinator import DPCoordinator
from shoal.engine.manager import CoreEngineProcManager
from shoal.logger import init_logger
from shoal.model_source import resolve_model
from shoal.runtime.addresses import remove_ipc_run_dir, unlink_ipc_address
from shoal.runtime.restart import EngineRestartPolicy
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


def run_serve(config: ShoalConfig, server: ServerConfig) -> int:
    """Run `shoal serve` until SIGINT / SIGTERM (exit 0) or a child's death (exit 1, the
    child named in the log): the engines with `config`, everything else with `server` (both
    built and validated from the flags by shoal.entrypoints.serve_args). A missing model
    raises `FileNotFoundError` (the CLI turns it into exit 2)."""
    resolve_model(config.model.model)  # fail before starting anything
    try:
        sock = bind_listen_socket(server.host, server.port)
    except OSError as e:
        logger.error("%s", e.strerror or e)
        return 1
    port = sock.getsockname()[1]
    host = f"[{server.host}]" if ":" in server.host else server.host
    _SignalState.install()
    try:
        return _serve(config, server, sock, f"http://{host}:{port}")
    except ShutdownRequested:  # a signal that landed in an except block: still a clean stop
        return 0


def _serve(
    config: ShoalConfig, server: ServerConfig, sock: socket.socket, listen_address: str
) -> int:
    children = _Children()
    restart_policy = EngineRestartPolicy.for_server(server)
    try:
        _start(config, server, restart_policy, sock, listen_address, children)
        _SignalState.serving = True
        logger.info("shoal is ready at %s", listen_address)
        wait_for_completion_or_failure(
            children.api_servers,
            children.engines,
            children.coordinator,
            stop_sentinel=_SignalState.stop_fd,
            restart_policy=restart_policy,
        )
        if not _SignalState.received:
            return 0  # every child exited cleanly on its own
        logger.info(
            "shutting down: draining in-flight requests for up to %.1f s",
            server.shutdown_timeout_s,
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
        children.shutdown(server.shutdown_timeout_s if _SignalState.received else None)
        _SignalState.uninstall()
        logger.info("shoal stopped")


def _start(
    config: ShoalConfig,
    server: ServerConfig,
    restart_policy: EngineRestartPolicy,
    sock: socket.socket,
    listen_address: str,
    children: _Children,
) -> None:
    num_engines, num_api_servers = server.data_parallel_size, server.api_server_count
    ready_timeout_s = server.ready_timeout_s
    if num_engines > 1:
        children.coordinator = DPCoordinator(num_engines, server.host)
    children.engines = CoreEngineProcManager(
        config,
        num_engines,
        coordinator_address=children.coordinator.load_address if children.coordinator else None,
        drain_timeout_s=server.shutdown_timeout_s,
        ready_timeout_s=ready_timeout_s,
        stall_exit_s=restart_policy.stall_exit_s(server.stall_timeout_s),
    )
    inputs = [get_engine_client_zmq_addr(True, server.host) for _ in range(num_api_servers)]
    outputs = [get_engine_client_zmq_addr(True, server.host) for _ in range(num_api_servers)]
    children.ipc_addresses = inputs + outputs
    children.api_servers = APIServerProcessManager(
        listen_address,
        sock,
        server,
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
