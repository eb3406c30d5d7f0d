"""Process managers: the reusable `ProcessManager` base and the seed's `APIServerProcessManager`."""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from shoal import envs
from shoal.logger import init_logger
from shoal.runtime.addresses import unlink_ipc_address
from shoal.runtime.procs import (
    SPAWN_CTX,
    ProcessLike,
    exitcode_after_exit,
    guarded_process,
    shutdown,
    start_process,
)

logger = init_logger(__name__)


class ProcessManager:
    """Owns a set of child processes: start (rolled back on failure), liveness, shutdown.

    The base of every launcher-side manager (API servers, the native frontend, and the
    serving package's engine manager and DP coordinator). Subclasses start children with
    `spawn()` inside `with self.rollback_on_error():` and register launcher-side cleanup
    (closing pipes, unlinking IPC files) with `add_cleanup()`.

    * `processes`: the started children, in start order (what `wait_for_completion_or_failure`
      watches);
    * `shutdown(timeout=None)`: `shutdown(processes, timeout)` then every cleanup, in
      `finally`; idempotent; also run by a `weakref.finalize` when the manager is collected
      or at interpreter exit;
    * `monitor_engine_liveness()` / `failed_proc_name`: the seed's engine-manager liveness
      interface, for callers that want a blocking watch.
    """

    def __init__(self) -> None:
        self.processes: list[ProcessLike] = []
        self.failed_proc_name: str | None = None
        self._cleanups: list[Callable[[], None]] = []
        # Write ends that wake `monitor_engine_liveness` calls when shutdown() runs.
        self._wakers: list[Connection] = []
        # A free function over plain lists, so the finalizer does not keep `self` alive.
        self._finalizer = weakref.finalize(
            self, _shutdown_and_clean_up, self.processes, self._cleanups, self._wakers, None
        )

    def spawn(
        self,
        target: Callable[..., Any],
        name: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        daemon: bool = False,
    ) -> BaseProcess:
        """Start `target(*args, **kwargs)` in a new spawn-context process called `name` and
        add it to `processes`. The child dies with this process whatever the target does
        (`guarded_process`); shoal's own targets still call `init_child_process(name)` first
        for their title, log role and process group."""
        proc = guarded_process(target, name, args, kwargs, daemon)
        start_process(proc)
        self.processes.append(proc)
        return proc

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Run `fn()` after the processes are stopped (errors logged, never raised). `fn`
        must not hold a reference to the manager (the finalizer runs it too)."""
        self._cleanups.append(fn)

    def unlink_at_shutdown(self, addresses: Iterable[str]) -> None:
        """Unlink the socket files of these `ipc://` addresses after the processes stop."""
        self.add_cleanup(_unlinker(list(addresses)))

    @contextlib.contextmanager
    def rollback_on_error(self) -> Iterator[None]:
        """On any exception (KeyboardInterrupt included) inside the block, shut down what
        was started, run the cleanups and re-raise."""
        try:
            yield
        except BaseException:
            logger.warning("start-up failed; stopping %d started process(es)", len(self.processes))
            self.shutdown()
            raise

    def finished_procs(self) -> dict[str, int]:
        """name -> exit code of every child that has exited."""
        return {p.name: p.exitcode for p in self.processes if p.exitcode is not None}

    def sentinels(self) -> list[Any]:
        return [p.sentinel for p in self.processes]

    def monitor_engine_liveness(self) -> None:
        """Block until a child exits or `shutdown()` is called.

        A non-zero exit sets `failed_proc_name`; an exit 0 does not. Does not stop the
        others: the caller's `finally` calls `shutdown()`.
        """
        wake_recv, wake_send = SPAWN_CTX.Pipe(duplex=False)
        self._wakers.append(wake_send)
        try:
            if not self._finalizer.alive:
                return
            by_sentinel = {p.sentinel: p for p in self.processes}
            ready = multiprocessing.connection.wait([*by_sentinel, wake_recv])
            for sentinel in ready:
                proc = by_sentinel.get(sentinel)
                if proc is not None and exitcode_after_exit(proc) != 0:
                    self.failed_proc_name = proc.name
                    return
        finally:
            wake_recv.close()
            # Not closed here: shutdown() may be closing it right now from another thread.
            with contextlib.suppress(ValueError):
                self._wakers.remove(wake_send)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop every child (`shutdown(self.processes, timeout)`; None = 5 s of grace) and run
        the cleanups. Idempotent: later calls return at once."""
        if self._finalizer.detach() is not None:
            _shutdown_and_clean_up(self.processes, self._cleanups, self._wakers, timeout)


def _shutdown_and_clean_up(
    procs: list[ProcessLike],
    cleanups: list[Callable[[], None]],
    wakers: list[Connection],
    timeout: float | None,
) -> None:
    for waker in list(wakers):
        with contextlib.suppress(OSError):
            waker.close()
    try:
        shutdown(procs, timeout)
    finally:
        for fn in cleanups:
            try:
                fn()
            except Exception:
                logger.exception("cleanup %r failed", fn)


class APIServerProcessManager(ProcessManager):
    """Starts `num_servers` API-server processes (`ApiServer_<i>`, spawn) on one listening
    socket and collects the ZMQ endpoints each one actually bound.

    Child `i` runs `target_server_fn(listen_address, sock, args, client_config)` (default:
    `shoal.api.server.run_api_server_worker_proc`) with `client_config` =
    `{"input_address", "output_address", "client_index": i, "client_count": num_servers,
    "actual_address_pipe"}` plus `"stats_update_address"` / `"tensor_queue"` when given. The
    child binds both addresses (`bind_zmq_socket`), sends exactly one dict
    `{"input_address": ..., "output_address": ...}` on `actual_address_pipe` and closes it.
    `sock` and `args` must be picklable. `ValueError` when the address lists do not hold
    `num_servers` entries each; if a start fails, the started children are shut down and
    the error re-raised. `shutdown()` also unlinks the IPC socket files of the addresses.
    `tensor_queue`: shoal passes its `TensorQueue` (shoal.runtime.tensor_queue) with
    --enable-prompt-embeds; it must cross the spawn, so it is created before any child.
    """

    def __init__(
        self,
        listen_address: str,
        sock: Any,
        args: Any,
        num_servers: int,
        input_addresses: Sequence[str],
        output_addresses: Sequence[str],
        target_server_fn: Callable[..., Any] | None = None,
        stats_update_address: str | None = None,
        tensor_queue: Any | None = None,
    ) -> None:
        super().__init__()
        _check_counts(num_servers, input_addresses, output_addresses)
        self.listen_address = listen_address
        self.sock = sock
        self.args = args
        self.input_addresses = list(input_addresses)
        self.output_addresses = list(output_addresses)
        self._address_pipes: list[Connection] = []
        self._gathered: tuple[list[str], list[str]] | None = None
        self._gather_failed = False
        self.add_cleanup(_closer(self._address_pipes))
        self.unlink_at_shutdown(self.input_addresses + self.output_addresses)
        target = target_server_fn or _default_target()
        with self.rollback_on_error():
            for i, in_addr, out_addr in zip(
                range(num_servers), self.input_addresses, self.output_addresses, strict=True
            ):
                client_config = self._client_config(
                    i, num_servers, in_addr, out_addr, stats_update_address, tensor_queue
                )
                try:
                    self.spawn(
                        target, f"ApiServer_{i}", args=(listen_address, sock, args, client_config)
                    )
                finally:
                    # Our copy of the write end must go, or EOF never shows a dead child.
                    client_config["actual_address_pipe"].close()
        logger.info("Started %d API server processes", len(self.processes))

    def _client_config(
        self,
        index: int,
        count: int,
        in_addr: str,
        out_addr: str,
        stats_update_address: str | None,
        tensor_queue: Any | None,
    ) -> dict[str, Any]:
        recv, send = SPAWN_CTX.Pipe(duplex=False)
        self._address_pipes.append(recv)
        config: dict[str, Any] = {
            "input_address": in_addr,
            "output_address": out_addr,
            "client_count": count,
            "client_index": index,
            "actual_address_pipe": send,
        }
        if stats_update_address is not None:
            config["stats_update_address"] = stats_update_address
        if tensor_queue is not None:
            config["tensor_queue"] = tensor_queue
        return config

    def gather_actual_addresses(self, timeout: float | None = None) -> tuple[list[str], list[str]]:
        """Return `(inputs, outputs)` as the children bound them, indexed by client_index.

        `timeout`: seconds; None = `SHOAL_ENGINE_READY_TIMEOUT_S` (600 s unless set), read
        at call time. `RuntimeError` naming `ApiServer_<i>` when the deadline passes, when a
        child closes its pipe without reporting, or as soon as a child exits before
        reporting. A report that arrived is accepted even if its sender exited in the
        same instant. Later calls return the first result (or raise if the first failed).
        """
        if self._gathered is not None:
            return list(self._gathered[0]), list(self._gathered[1])
        if self._gather_failed:
            raise RuntimeError("gather_actual_addresses() already failed for these API servers")
        timeout_s = envs.ENVS.engine_ready_timeout_s if timeout is None else timeout
        try:
            result = _gather(self.processes, self._address_pipes, timeout_s)
        except BaseException:
            self._gather_failed = True
            raise
        self._gathered = result
        return list(result[0]), list(result[1])


def _gather(
    procs: list[ProcessLike], pipes: list[Connection], timeout_s: float
) -> tuple[list[str], list[str]]:
    inputs: list[str] = [""] * len(pipes)
    outputs: list[str] = [""] * len(pipes)
    pending: dict[int, Connection] = dict(enumerate(pipes))
    deadline = time.monotonic() + timeout_s
    try:
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                names = [procs[i].name for i in sorted(pending)]
                raise RuntimeError(
                    f"Timed out after {timeout_s:.1f}s waiting for API server(s) to report "
                    f"bound ZMQ addresses: {names} (raise SHOAL_ENGINE_READY_TIMEOUT_S or "
                    "the timeout argument if start-up is legitimately slow)"
                )
            by_sentinel = {procs[i].sentinel: i for i in pending}
            ready = multiprocessing.connection.wait(
                [*pending.values(), *by_sentinel], timeout=remaining
            )
            # Pipes first: a child that reported and then exited is a success.
            for i, pipe in list(pending.items()):
                if pipe in ready:
                    inputs[i], outputs[i] = _receive(procs[i], pipe)
                    del pending[i]
                    pipe.close()
            for sentinel in ready:
                i = by_sentinel.get(sentinel, -1)
                if i in pending:
                    proc = procs[i]
                    raise RuntimeError(
                        f"API server process {proc.name} exited (code="
                        f"{exitcode_after_exit(proc)}) before reporting its bound ZMQ addresses"
                    )
    finally:
        for pipe in pending.values():
            pipe.close()
    return inputs, outputs


def _receive(proc: ProcessLike, pipe: Connection) -> tuple[str, str]:
    try:
        report = pipe.recv()
    except EOFError as e:
        raise RuntimeError(
            f"API server {proc.name} closed its address pipe without reporting its bound "
            "ZMQ addresses"
        ) from e
    if (
        not isinstance(report, dict)
        or not isinstance(report.get("input_address"), str)
        or not isinstance(report.get("output_address"), str)
    ):
        raise RuntimeError(
            f"API server {proc.name} sent an invalid address report while reporting its "
            f"bound ZMQ addresses: {report!r}"
        )
    return report["input_address"], report["output_address"]


def _check_counts(num_servers: int, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    if isinstance(num_servers, bool) or not isinstance(num_servers, int) or num_servers < 0:
        raise ValueError(f"num_servers: must be a non-negative integer, got {num_servers!r}")
    for field, addresses in (("input_addresses", inputs), ("output_addresses", outputs)):
        if len(addresses) != num_servers:
            raise ValueError(f"{field}: {len(addresses)} address(es) for num_servers={num_servers}")


def _default_target() -> Callable[..., Any]:
    from shoal.api.server import run_api_server_worker_proc

    return run_api_server_worker_proc


def _closer(pipes: list[Connection]) -> Callable[[], None]:
    def close_pipes() -> None:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.close()
        pipes.clear()

    return close_pipes


def _unlinker(addresses: list[str]) -> Callable[[], None]:
    def unlink_addresses() -> None:
        for address in addresses:
            unlink_ipc_address(address)

    return unlink_addresses
