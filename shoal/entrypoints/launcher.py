"""`run_serve`: the `shoal serve` process. Binds the HTTP socket, starts and wires every child,
waits for completion or failure, and shuts everything down under one deadline.

Start-up order (docs/architecture.md, "Start-up"):
 1. bind + listen on host:port (once; a port in use is an error, never shared)
 2. DP coordinator (M > 1), then M engines, which start loading the model: local processes,
    or Ray actors (--data-parallel-backend ray), and the port --headless hosts join
    (--data-parallel-size-local < M); with engines elsewhere every engine socket is TCP
    (docs/scale-out.md)
 3. N API servers on the inherited socket; gather the ZMQ addresses they bound (--frontend
    rust: one native `RustFrontend` process on concrete IPC addresses instead)
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
from typing import Any

from shoal.config import ServerConfig, ShoalConfig
from shoal.engine.coordinator import DPCoordinator
from shoal.engine.headless import HeadlessHosts
from shoal.engine.manager import CoreEngineProcManager
from shoal.logger import init_logger
from shoal.model_source import resolve_model
from shoal.runtime.addresses import remove_ipc_run_dir, unlink_ipc_address
from shoal.runtime.frontend import (
    RustFrontendProcessManager,
    find_frontend_binary,
    native_frontend_args,
)
from shoal.runtime.managers import ProcessManager
from shoal.runtime.restart import EngineRestartPolicy
from shoal.runtime.tensor_queue import TensorQueue
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


class RayMissingError(RuntimeError):
    """--data-parallel-backend ray without Ray installed."""


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
        # Local engine processes (CoreEngineProcManager) or Ray actors (CoreEngineActorManager);
        # None when every engine runs on --headless hosts.
        self.engines: Any | None = None
        self.remote: HeadlessHosts | None = None  # engines joining from --headless hosts
        self.ray: Any | None = None  # RayConnection (--data-parallel-backend ray)
        # The API servers, or the native frontend (--frontend rust): watched and shut down
        # alike.
        self.api_servers: ProcessManager | None = None
        self.ipc_addresses: list[str] = []
        self.tensor_queue: TensorQueue | None = None

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
            if self.remote is not None:
                self.remote.shutdown()
            if self.coordinator is not None:
                self.coordinator.shutdown(remaining(0.5))
        finally:
            if self.ray is not None:
                self.ray.close()
            for address in self.ipc_addresses:
                unlink_ipc_address(address)
            remove_ipc_run_dir()
            if self.tensor_queue is not None:
                self.tensor_queue.close()


def run_serve(config: ShoalConfig, server: ServerConfig) -> int:
    """Run `shoal serve` until SIGINT / SIGTERM (exit 0) or a child's death (exit 1, the
    child named in the log): the engines with `config`, everything else with `server` (both
    built and validated from the flags by shoal.entrypoints.serve_args). A missing model,
    or a missing native frontend binary with --frontend rust, raises `FileNotFoundError`
    (the CLI turns it into exit 2) before anything starts."""
    # Fail before starting anything.
    binary = find_frontend_binary() if server.frontend == "rust" else None
    resolve_model(config.model.model)
    try:
        sock = bind_listen_socket(server.host, server.port)
    except OSError as e:
        logger.error("%s", e.strerror or e)
        return 1
    port = sock.getsockname()[1]
    host = f"[{server.host}]" if ":" in server.host else server.host
    _SignalState.install()
    try:
        return _serve(config, server, sock, f"http://{host}:{port}", binary)
    except ShutdownRequested:  # a signal that landed in an except block: still a clean stop
        return 0


def _serve(
    config: ShoalConfig,
    server: ServerConfig,
    sock: socket.socket,
    listen_address: str,
    binary: str | None,
) -> int:
    children = _Children()
    restart_policy = EngineRestartPolicy.for_server(server)
    try:
        _start(config, server, restart_policy, sock, listen_address, children, binary)
        _SignalState.serving = True
        logger.info("shoal is ready at %s", listen_address)
        wait_for_completion_or_failure(
            children.api_servers,
            children.engines,
            children.coordinator,
            stop_sentinel=_SignalState.stop_fd,
            restart_policy=restart_policy,
            engine_monitors=[children.remote] if children.remote else [],
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
        for engines in (children.engines, children.remote):
            if engines is not None:
                engines.announce_failed_engines()
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
    binary: str | None,
) -> None:
    """Start every child (steps 2-4 of the module docstring); `binary`: the native
    frontend's path with --frontend rust, else None (the API servers)."""
    num_engines = server.data_parallel_size
    ready_timeout_s = server.ready_timeout_s
    scale_out = server.scale_out
    num_local = scale_out.local_engines(num_engines)
    # Engines on other hosts (Ray actors, --headless hosts) reach every socket over TCP.
    is_local = scale_out.data_parallel_backend == "mp" and num_local == num_engines
    engine_host = _engine_host(server, children)
    if num_local < num_engines and scale_out.data_parallel_backend == "mp":
        children.remote = HeadlessHosts(
            engine_host,
            scale_out.data_parallel_rpc_port,
            num_engines,
            range(num_local, num_engines),
        )
    if num_engines > 1:
        children.coordinator = DPCoordinator(num_engines, engine_host, local_only=is_local)
    if server.enable_prompt_embeds:
        # Before any child: the queues cross into the children only at spawn.
        children.tensor_queue = TensorQueue(num_engines)
    coordinator_address = children.coordinator.load_address if children.coordinator else None
    _start_engines(config, server, restart_policy, children, coordinator_address)
    if binary is None:
        actual_inputs, actual_outputs = _start_api_servers(
            server, sock, listen_address, children, is_local, engine_host
        )
    else:
        actual_inputs, actual_outputs = _start_native_frontend(server, sock, children, binary)
    # Every API server holds its own copy of the listening socket by now. Closing ours means
    # that once they stop accepting (shutdown), new connections are refused, not queued.
    sock.close()
    children.ipc_addresses += actual_inputs + actual_outputs
    if children.remote is not None:
        children.remote.set_addresses(actual_inputs, actual_outputs, coordinator_address)
    _handshake_engines(children, actual_inputs, actual_outputs, ready_timeout_s)


def _start_api_servers(
    server: ServerConfig,
    sock: socket.socket,
    listen_address: str,
    children: _Children,
    is_local: bool,
    engine_host: str,
) -> tuple[list[str], list[str]]:
    """--api-server-count API servers on `sock` (`children.api_servers`); returns the
    (input, output) addresses they bound, one pair per server."""
    num_api_servers = server.api_server_count
    inputs = [get_engine_client_zmq_addr(is_local, engine_host) for _ in range(num_api_servers)]
    outputs = [get_engine_client_zmq_addr(is_local, engine_host) for _ in range(num_api_servers)]
    children.ipc_addresses = inputs + outputs
    api_servers = APIServerProcessManager(
        listen_address,
        sock,
        server,
        num_api_servers,
        inputs,
        outputs,
        tensor_queue=children.tensor_queue,
        stats_update_address=(
            children.coordinator.stats_update_address if children.coordinator else None
        ),
    )
    children.api_servers = api_servers
    return api_servers.gather_actual_addresses(server.ready_timeout_s)


def _start_native_frontend(
    server: ServerConfig, sock: socket.socket, children: _Children, binary: str
) -> tuple[list[str], list[str]]:
    """One `RustFrontend` process (`binary`) on `sock` in place of the API servers
    (`children.api_servers`); returns its one (input, output) address pair. Engines are all
    local (ServerConfig refuses others with --frontend rust), so the addresses are concrete
    IPC paths the binary binds as given."""
    if server.api_server_count > 1:
        logger.info(
            "--frontend rust: one native process serves every connection; "
            "--api-server-count %d is ignored",
            server.api_server_count,
        )
    inputs = [get_engine_client_zmq_addr(True, server.host)]
    outputs = [get_engine_client_zmq_addr(True, server.host)]
    children.ipc_addresses = inputs + outputs
    coordinator = children.coordinator
    children.api_servers = RustFrontendProcessManager(
        binary,
        sock,
        native_frontend_args(server),
        inputs[0],
        outputs[0],
        engine_start_index=0,
        engine_count=server.data_parallel_size,
        data_parallel_size=server.data_parallel_size,
        stats_update_address=coordinator.stats_update_address if coordinator else None,
    )
    return inputs, outputs


def _start_engines(
    config: ShoalConfig,
    server: ServerConfig,
    restart_policy: EngineRestartPolicy,
    children: _Children,
    coordinator_address: str | None,
) -> None:
    """This host's engine processes, or every engine as a Ray actor (`children.engines`);
    none when they all come from --headless hosts."""
    num_local = server.scale_out.local_engines(server.data_parallel_size)
    if server.scale_out.data_parallel_backend == "ray":
        children.engines = _actor_manager(config, server, children, coordinator_address)
    elif num_local > 0:
        children.engines = CoreEngineProcManager(
            config,
            num_local,
            coordinator_address=coordinator_address,
            drain_timeout_s=server.shutdown_timeout_s,
            ready_timeout_s=server.ready_timeout_s,
            stall_exit_s=restart_policy.stall_exit_s(server.stall_timeout_s),
            tensor_queue=children.tensor_queue,
        )


def _handshake_engines(
    children: _Children, inputs: list[str], outputs: list[str], ready_timeout_s: float
) -> None:
    """Hand the API servers' addresses to this host's engines (or actors) and wait for
    every engine's READY, then for the --headless hosts' engines, under one deadline."""
    started = time.monotonic()
    if children.engines is not None:
        children.engines.send_addresses(inputs, outputs)
        children.engines.wait_for_ready(ready_timeout_s, watched=children.watched())
    if children.remote is not None:
        remaining_s = max(ready_timeout_s - (time.monotonic() - started), 0.1)
        children.remote.wait_for_ready(remaining_s, watched=children.watched())


def _engine_host(server: ServerConfig, children: _Children) -> str:
    """The address engines on other hosts reach this one at: --data-parallel-address, else
    (Ray) this node's IP as Ray sees it, else --host. Connects to Ray first when it is the
    backend (`children.ray`)."""
    scale_out = server.scale_out
    if scale_out.data_parallel_backend == "ray":
        connect_ray = _ray_engines().connect_ray
        children.ray = connect_ray(scale_out.ray_address, server.ready_timeout_s)
        return scale_out.data_parallel_address or children.ray.node_ip
    return scale_out.data_parallel_address or server.host


def _actor_manager(
    config: ShoalConfig, server: ServerConfig, children: _Children, coordinator: str | None
) -> Any:
    """The `CoreEngineActorManager` of --data-parallel-backend ray (on `children.ray`)."""
    restart_policy = EngineRestartPolicy.for_server(server)
    return _ray_engines().CoreEngineActorManager(
        config,
        server.data_parallel_size,
        server.scale_out,
        coordinator,
        drain_timeout_s=server.shutdown_timeout_s,
        ready_timeout_s=server.ready_timeout_s,
        stall_exit_s=restart_policy.stall_exit_s(server.stall_timeout_s),
        ray_connection=children.ray,
        link_host=server.scale_out.data_parallel_address,
    )


def _ray_engines() -> Any:
    """shoal.engine.ray_engines; without Ray installed, a one-line `RayMissingError`."""
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise RayMissingError(
            "--data-parallel-backend ray needs Ray, which is not installed: "
            "pip install 'shoal[ray]'"
        ) from e
    from shoal.engine import ray_engines

    return ray_engines


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
    def request_stop(cls) -> None:
        """End the wait as a signal would, from any thread (a --headless host's front end
        asked it to stop)."""
        cls.received = True
        with contextlib.suppress(OSError):
            os.write(cls._wake_fd, b"\0")

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
