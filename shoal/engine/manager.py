"""The launcher's side of the engine-core processes: `CoreEngineProcManager` (start,
handshake, liveness, restarts, shutdown). The child's side, `run_engine_core`, is in
`shoal.engine.core_proc`.

Handshake over one duplex pipe per engine, bytes encoded with msgspec (no pickle):

    launcher                                  EngineCore_k
    start process  ---------------------->    load the model (slow)
    send_addresses: EngineAddresses  ---->    connect DEALERs + PUSHes, EngineReady to each
                                              API server
    wait_for_ready  <------ EngineReady ---   then serve
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import msgspec
import zmq

from shoal.config import ShoalConfig
from shoal.core.runner_protocol import RunnerFactory
from shoal.engine.core_proc import engine_proc_name, run_engine_core
from shoal.envs import ENVS
from shoal.logger import init_logger
from shoal.protocol import EngineAddresses, EngineReady, decoder, encode, engine_dead_frame
from shoal.runtime.addresses import connect_zmq_socket
from shoal.runtime.managers import ProcessManager
from shoal.runtime.procs import (
    SPAWN_CTX,
    ProcessLike,
    exitcode_after_exit,
    guarded_process,
    start_process,
)

logger = init_logger(__name__)

_DEAD_LINGER_MS = 1000
READY_TIMEOUT_HINT = "raise --engine-ready-timeout or SHOAL_ENGINE_READY_TIMEOUT_S"


class CoreEngineProcManager(ProcessManager):
    """Starts `num_engines` spawned processes `EngineCore_<k>` (k = 0..num_engines-1).

    Give the API servers' addresses in the constructor or later with `send_addresses`;
    then `wait_for_ready` completes the handshake. `processes`, `shutdown(timeout)` and the
    liveness interface come from `ProcessManager`. `target_fn` (default `run_engine_core`,
    same signature) lets tests replace the engine's entry point. `runner_factory`: each
    engine builds its model runner with it instead of loading the model (tests hand engines
    fake runners this way); it crosses the spawn, so it must pickle, and reaches the target
    as the keyword `runner_factory` (only when given); likewise `tensor_queue` (the run's
    `TensorQueue`, --enable-prompt-embeds), from which each engine reads its tensors.
    `stall_exit_s`: each engine exits (code 1) when one step runs longer (--restart-dead-engines with --engine-stall-timeout).
    `restart(k)` replaces an exited engine (see there).
    """

    def __init__(
        self,
        config: ShoalConfig,
        num_engines: int,
        api_input_addresses: list[str] | None = None,
        api_output_addresses: list[str] | None = None,
        coordinator_address: str | None = None,
        *,
        drain_timeout_s: float = 0.0,
        ready_timeout_s: float | None = None,
        target_fn: Callable[..., None] | None = None,
        stall_exit_s: float | None = None,
        runner_factory: RunnerFactory | None = None,
        tensor_queue: Any | None = None,
        start_index: int = 0,
    ) -> None:
        super().__init__()
        # Global index of processes[0] (a --headless host runs engines R..R+K-1).
        self.start_index = start_index
        self.ready_timeout_s = ready_timeout_s or ENVS.engine_ready_timeout_s
        self.engines_ready: list[EngineReady] = []
        # The launcher's ends of the handshake pipes, by engine index (closed once READY).
        self._pipes: list[Connection] = []
        # Handshake pipes of restarted engines, by engine index (closed once READY).
        self._restart_pipes: dict[int, Connection] = {}
        self._input_addresses: list[str] = []
        self._output_addresses: list[str] = []
        self._target = target_fn or run_engine_core
        self._config = config
        self._engine_args = (
            coordinator_address,
            drain_timeout_s,
            self.ready_timeout_s,
            stall_exit_s,
        )
        # Left out unless given: a replaced `target_fn` need not take the keyword.
        self._target_kwargs: dict[str, Any] = (
            {} if runner_factory is None else {"runner_factory": runner_factory}
        )
        if tensor_queue is not None:  # the run's TensorQueue (--enable-prompt-embeds)
            self._target_kwargs["tensor_queue"] = tensor_queue
        self.add_cleanup(_closer(self._pipes))
        self.add_cleanup(_dict_closer(self._restart_pipes))
        with self.rollback_on_error():
            for k in range(start_index, start_index + num_engines):
                parent_end, child_end = SPAWN_CTX.Pipe(duplex=True)
                self._pipes.append(parent_end)
                try:
                    name, args = engine_proc_name(k), self._args(k, child_end)
                    self.spawn(self._target, name, args, self._target_kwargs)
                finally:
                    child_end.close()  # so the launcher sees EOF when the engine dies
        logger.info("started %d engine process(es)", num_engines)
        if api_input_addresses is not None and api_output_addresses is not None:
            self.send_addresses(api_input_addresses, api_output_addresses)

    def _args(self, engine_index: int, handshake: Connection) -> tuple[Any, ...]:
        """`run_engine_core`'s arguments for engine `engine_index`."""
        return (engine_index, self._config, handshake, *self._engine_args)

    def send_addresses(self, input_addresses: list[str], output_addresses: list[str]) -> None:
        """Tell every engine where the API servers are (indexed by client_index)."""
        if len(input_addresses) != len(output_addresses):
            raise ValueError("input and output address lists differ in length")
        self._input_addresses = list(input_addresses)
        self._output_addresses = list(output_addresses)
        message = encode(EngineAddresses(list(input_addresses), list(output_addresses)))
        for pipe in self._pipes:
            with contextlib.suppress(OSError):  # that engine died: wait_for_ready names it
                pipe.send_bytes(message)

    def wait_for_ready(
        self, timeout: float | None = None, watched: Sequence[ProcessLike] = ()
    ) -> list[EngineReady]:
        """Wait until every engine has sent EngineReady; returns them by engine index.

        One deadline (`timeout`, default the manager's ready timeout) for all engines.
        `RuntimeError` naming the engine that exited or did not report in time, or a
        `watched` process (API server, coordinator) that exited meanwhile.
        """
        timeout = self.ready_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + timeout
        pending: dict[Any, ProcessLike] = dict(zip(self._pipes, self.processes, strict=True))
        sentinels = {p.sentinel: p for p in [*self.processes, *watched]}
        readies: dict[int, EngineReady] = {}
        ready_decoder = decoder(EngineReady)
        try:
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = ", ".join(p.name for p in pending.values())
                    raise RuntimeError(
                        f"Timed out after {timeout:.1f}s waiting for {names} to "
                        f"load the model and report READY; {READY_TIMEOUT_HINT}"
                    )
                ready = wait([*pending, *sentinels], remaining)
                # Pipes first: an engine that reported and then exited is named below.
                for obj in ready:
                    if obj in pending:
                        pipe: Any = obj
                        message = _recv_ready(pipe, pending.pop(pipe), ready_decoder)
                        readies[message.engine_index] = message
                for obj in ready:
                    if obj in sentinels:
                        raise RuntimeError(_exited_during_startup(sentinels[obj]))
        finally:
            _closer(self._pipes)()
        self.engines_ready = [readies[k] for k in sorted(readies)]
        return self.engines_ready

    def announce_failed_engines(self) -> list[str]:
        """If an engine exited non-zero (so it may not have said so itself, e.g. SIGKILL),
        send its dead notice to every API server on its behalf, so their pending requests
        fail at once. Returns the names of the failed engines."""
        failed = [
            (k, p)
            for k, p in enumerate(self.processes, self.start_index)
            if p.exitcode not in (None, 0)
        ]
        for k, proc in failed:
            self.announce_dead(k, f"{proc.name} exited with code {proc.exitcode}")
        return [p.name for _, p in failed]

    def announce_dead(self, engine_index: int, reason: str) -> None:
        """Send engine `engine_index`'s dead notice to every API server (bounded by a linger
        of about a second)."""
        if self._output_addresses:
            send_engine_dead(self._output_addresses, engine_dead_frame(engine_index, reason))

    # -- restarts (--restart-dead-engines) ------------------------------------------------------

    def restart(self, engine_index: int) -> Connection:
        """Start a fresh `EngineCore_<engine_index>` (same index, same config) in place of the
        exited one, and send it the API servers' addresses at once (the pipe holds them while
        it loads). Returns the launcher's end of its handshake pipe: readable once the engine
        sent EngineReady (`recv_restart_ready`) or exited (EOF). Does not wait."""
        slot = engine_index - self.start_index
        old = self.processes[slot]
        if old.exitcode is None:
            raise RuntimeError(f"{old.name} (pid {old.pid}) is still running")
        self.close_restart_pipe(engine_index)
        parent_end, child_end = SPAWN_CTX.Pipe(duplex=True)
        name = engine_proc_name(engine_index)
        try:
            # Behind the parent-death guard like the first start (ProcessManager.spawn).
            args = self._args(engine_index, child_end)
            proc = guarded_process(self._target, name, args, self._target_kwargs)
            start_process(proc)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        # In place: the list is the one `shutdown()` (and its finalizer) stops.
        self.processes[slot] = proc
        self._restart_pipes[engine_index] = parent_end
        message = encode(EngineAddresses(self._input_addresses, self._output_addresses))
        with contextlib.suppress(OSError):  # died already: its sentinel says so
            parent_end.send_bytes(message)
        logger.info("restarted %s (pid %s)", name, proc.pid)
        return parent_end

    def recv_restart_ready(self, engine_index: int) -> EngineReady:
        """Read the EngineReady of restarted engine `engine_index` from its pipe (readable)
        and close the pipe. `RuntimeError` when it exited instead or sent garbage."""
        pipe = self._restart_pipes[engine_index]
        proc = self.processes[engine_index - self.start_index]
        try:
            message: EngineReady = decoder(EngineReady).decode(pipe.recv_bytes())
        except (EOFError, OSError) as e:
            raise RuntimeError(
                f"{proc.name} (pid {proc.pid}) exited with code {exitcode_after_exit(proc)} "
                "after a restart, before it reported READY (crash loop?); see its log above"
            ) from e
        except msgspec.DecodeError as e:
            raise RuntimeError(f"{proc.name} sent a malformed READY message: {e}") from e
        finally:
            self.close_restart_pipe(engine_index)
        logger.info("%s (pid %s) is ready again after its restart", proc.name, proc.pid)
        return message

    def close_restart_pipe(self, engine_index: int) -> None:
        pipe = self._restart_pipes.pop(engine_index, None)
        if pipe is not None:
            pipe.close()


def send_engine_dead(addresses: list[str], frame: bytes) -> None:
    """PUSH one dead-notice `frame` to every API-server output address (TCP or IPC), with
    a linger of about a second."""
    ctx = zmq.Context()
    try:
        for address in addresses:
            sock = ctx.socket(zmq.PUSH)
            connect_zmq_socket(sock, address)
            with contextlib.suppress(zmq.Again):
                sock.send(frame, zmq.NOBLOCK)
            sock.close(linger=_DEAD_LINGER_MS)
    finally:
        ctx.term()


def _dict_closer(pipes: dict[int, Connection]) -> Callable[[], None]:
    def close_pipes() -> None:
        for pipe in pipes.values():
            pipe.close()
        pipes.clear()

    return close_pipes


def _closer(pipes: list[Connection]) -> Callable[[], None]:
    # Over the list, not the manager, so the manager's finalizer can run it.
    def close_pipes() -> None:
        for pipe in pipes:
            pipe.close()
        pipes.clear()

    return close_pipes


def _recv_ready(
    pipe: Connection, proc: ProcessLike, ready_decoder: msgspec.msgpack.Decoder
) -> EngineReady:
    try:
        message: EngineReady = ready_decoder.decode(pipe.recv_bytes())
    except (EOFError, OSError) as e:
        raise RuntimeError(_exited_during_startup(proc)) from e
    except msgspec.DecodeError as e:
        raise RuntimeError(f"{proc.name} sent a malformed READY message: {e}") from e
    logger.info(
        "%s ready: %d KV blocks of %d tokens, max_model_len %d",
        proc.name,
        message.num_blocks,
        message.block_size,
        message.max_model_len,
    )
    return message


def _exited_during_startup(proc: ProcessLike) -> str:
    exitcode = exitcode_after_exit(proc)
    return (
        f"{proc.name} (pid {proc.pid}) exited with code {exitcode} during start-up, "
        "before every engine reported READY; see its log above"
    )
