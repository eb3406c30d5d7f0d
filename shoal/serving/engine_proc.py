"""The engine-core processes: their entry point (`run_engine_core`) and the launcher's side
(`CoreEngineProcManager`: start, handshake, liveness, shutdown).

Handshake over one duplex pipe per engine, bytes encoded with msgspec (no pickle):

    launcher                                  EngineCore_k
    start process  ---------------------->    load the model (slow)
    send_addresses: EngineAddresses  ---->    connect DEALERs + PUSHes, EngineReady to each
                                              API server
    wait_for_ready  <------ EngineReady ---   then serve
"""

from __future__ import annotations

import contextlib
import multiprocessing.util
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from types import FrameType
from typing import Any

import msgspec
import zmq

from shoal.config import ShoalConfig
from shoal.envs import ENVS
from shoal.logger import init_logger
from shoal.protocol import ENGINE_CORE_DEAD, EngineAddresses, EngineReady, decoder, encode
from shoal.runtime.child import init_child_process
from shoal.runtime.managers import ProcessManager
from shoal.runtime.procs import SPAWN_CTX, ProcessLike, exitcode_after_exit
from shoal.serving.engine_loop import EngineCoreProc
from shoal.serving.usage_stats import report_usage_stats

logger = init_logger(__name__)

_DEAD_LINGER_MS = 1000
READY_TIMEOUT_HINT = "raise --engine-ready-timeout or SHOAL_ENGINE_READY_TIMEOUT_S"


def engine_proc_name(engine_index: int) -> str:
    """The process name (and log role) of engine `engine_index`: `EngineCore_<k>`."""
    return f"EngineCore_{engine_index}"


# -- process entry point -------------------------------------------------------------------------


class _Startup:
    """Signal handling state: before serving, a signal aborts start-up at once."""

    proc: EngineCoreProc | None = None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _Startup.proc is None:
        raise SystemExit(0)  # still loading: nothing to drain
    _Startup.proc.shutdown_requested = True


def run_engine_core(
    engine_index: int,
    config: ShoalConfig,
    handshake: Connection,
    coordinator_address: str | None,
    drain_timeout_s: float,
    ready_timeout_s: float,
) -> None:
    """Entry point of process `EngineCore_<engine_index>`.

    Handshake over `handshake` (bytes, msgspec): load the model, wait up to
    `ready_timeout_s` for `EngineAddresses`, connect, send `EngineReady` to every API server
    and then to the launcher; serve. Exit 0 after a signal-initiated shutdown, 1 after a
    fatal error (ENGINE_CORE_DEAD sent to every API server first). Never returns.
    """
    init_child_process(engine_proc_name(engine_index))
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    proc: EngineCoreProc | None = None
    try:
        proc = EngineCoreProc(config, engine_index, coordinator_address, drain_timeout_s)
        report_usage_stats(config, "ENGINE_CONTEXT")
        if not handshake.poll(ready_timeout_s):
            raise RuntimeError(f"no API-server addresses from the launcher in {ready_timeout_s}s")
        addresses = decoder(EngineAddresses).decode(handshake.recv_bytes())
        proc.connect(addresses)
        _Startup.proc = proc
        handshake.send_bytes(encode(proc.ready_message()))
        handshake.close()
        logger.info(
            "ready: %d blocks of %d tokens, max_model_len %d, serving %d API server(s)",
            proc.engine_core.num_blocks,
            proc.engine_core.block_size,
            proc.engine_core.max_model_len,
            proc.num_clients,
        )
        proc.run_busy_loop()
        proc.close()
        logger.info("shut down")
    except SystemExit:
        raise
    except BaseException:
        logger.exception("fatal error; telling the API servers this engine is dead")
        if proc is not None:
            proc.close(dead=True)
        _exit_now(1)  # threads may be stuck in a dead socket
    _exit_now(0)


def _exit_now(code: int) -> None:
    """Exit without interpreter teardown: everything is closed by now, and unloading torch
    alone takes about a second, which would eat into the launcher's shutdown deadline."""
    with contextlib.suppress(Exception):
        # multiprocessing's own finalizers (e.g. semaphores a library created), so the
        # resource tracker has nothing to clean up after us.
        multiprocessing.util._run_finalizers()  # type: ignore[attr-defined]
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


# -- launcher side --------------------------------------------------------------------------------


class CoreEngineProcManager(ProcessManager):
    """Starts `num_engines` spawned processes `EngineCore_<k>` (k = 0..num_engines-1).

    Give the API servers' addresses in the constructor or later with `send_addresses`;
    then `wait_for_ready` completes the handshake. `processes`, `shutdown(timeout)` and the
    liveness interface come from `ProcessManager`. `target_fn` (default `run_engine_core`,
    same signature) lets tests wrap the engine's entry point.
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
    ) -> None:
        super().__init__()
        self.ready_timeout_s = ready_timeout_s or ENVS.engine_ready_timeout_s
        self.engines_ready: list[EngineReady] = []
        # The launcher's ends of the handshake pipes, by engine index (closed once READY).
        self._pipes: list[Connection] = []
        self._output_addresses: list[str] = []
        self.add_cleanup(_closer(self._pipes))
        with self.rollback_on_error():
            for k in range(num_engines):
                parent_end, child_end = SPAWN_CTX.Pipe(duplex=True)
                self._pipes.append(parent_end)
                args = (
                    k,
                    config,
                    child_end,
                    coordinator_address,
                    drain_timeout_s,
                    self.ready_timeout_s,
                )
                try:
                    self.spawn(target_fn or run_engine_core, engine_proc_name(k), args)
                finally:
                    child_end.close()  # so the launcher sees EOF when the engine dies
        logger.info("started %d engine process(es)", num_engines)
        if api_input_addresses is not None and api_output_addresses is not None:
            self.send_addresses(api_input_addresses, api_output_addresses)

    def send_addresses(self, input_addresses: list[str], output_addresses: list[str]) -> None:
        """Tell every engine where the API servers are (indexed by client_index)."""
        if len(input_addresses) != len(output_addresses):
            raise ValueError("input and output address lists differ in length")
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
        send ENGINE_CORE_DEAD to every API server on its behalf, so their pending requests
        fail at once. Returns the names of the failed engines."""
        failed = [p.name for p in self.processes if p.exitcode not in (None, 0)]
        if failed and self._output_addresses:
            _send_engine_dead(self._output_addresses)
        return failed


def _send_engine_dead(addresses: list[str]) -> None:
    ctx = zmq.Context()
    try:
        for address in addresses:
            sock = ctx.socket(zmq.PUSH)
            sock.connect(address)
            with contextlib.suppress(zmq.Again):
                sock.send(ENGINE_CORE_DEAD, zmq.NOBLOCK)
            sock.close(linger=_DEAD_LINGER_MS)
    finally:
        ctx.term()


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
