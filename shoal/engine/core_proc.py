"""The EngineCore_k process: its entry point (`run_engine_core`) and `EngineCoreProc`, the
busy loop that drives an `EngineCore`.

    input thread   (EngineIO) DEALERs -> ADD / ABORT -> input queue
    main thread    input queue -> EngineCore.add_request / abort_requests; step() while
                   there is work, else block on the input queue; EngineLoad -> coordinator
    output thread  (EngineIO) outputs grouped per API server -> PUSH[client_index]

Signals only set `shutdown_requested`; the loop then drains in-flight requests (up to
`drain_timeout_s`, and only while an API server is still connected to receive them), aborts
the rest, sends the final outputs and returns. The launcher's side of the process (start,
handshake, liveness, restarts) is `CoreEngineProcManager` in `shoal.engine.manager`.

A little over 400 lines, on purpose: the process's entry point and the loop it runs read as
one story, top to bottom; the I/O threads are apart already (`io_threads.py`).
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from collections import defaultdict
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any

import zmq

from shoal.config import ShoalConfig
from shoal.core.runner_protocol import RunnerFactory
from shoal.engine.core import EngineCore
from shoal.engine.io_threads import EngineIO
from shoal.engine.stats_log import StatsLogger
from shoal.engine.usage_stats import report_usage_stats
from shoal.logger import init_logger
from shoal.protocol import (
    AbortRequest,
    EngineAddresses,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineLoad,
    EngineReady,
    FinishReason,
    KVCacheStatus,
    UtilityOutput,
    UtilityRequest,
    decoder,
    encode,
)
from shoal.runtime.addresses import connect_zmq_socket
from shoal.runtime.child import exit_now, init_child_process

logger = init_logger(__name__)

# How long an idle engine blocks on its input queue before it looks at the shutdown flag.
_IDLE_WAIT_S = 0.05
# Longest an API server with requests here goes without a message from a busy engine; its
# stall watchdog (--engine-stall-timeout, many times this) relies on it.
HEARTBEAT_S = 1.0


def engine_proc_name(engine_index: int) -> str:
    """The process name (and log role) of engine `engine_index`: `EngineCore_<k>`."""
    return f"EngineCore_{engine_index}"


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
    stall_exit_s: float | None = None,
    *,
    runner_factory: RunnerFactory | None = None,
    tensor_queue: Any | None = None,
) -> None:
    """Entry point of process `EngineCore_<engine_index>` (the launcher starts it through
    `CoreEngineProcManager`). `tensor_queue`: the run's `TensorQueue` (--enable-prompt-embeds),
    from which this engine reads the tensors of requests with `has_prompt_embeds`.

    Handshake over `handshake` (bytes, msgspec): load the model (or build the runner with
    `runner_factory`), wait up to `ready_timeout_s` for `EngineAddresses`, connect, send
    `EngineReady` to every API server and then to the launcher; serve. Exit 0 after a
    signal-initiated shutdown, 1 after a fatal error (the dead notice sent to every API
    server first) or when one step ran longer than `stall_exit_s` (when given). Never
    returns.
    """
    init_child_process(engine_proc_name(engine_index))
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    proc: EngineCoreProc | None = None
    try:
        proc = EngineCoreProc(
            config, engine_index, coordinator_address, drain_timeout_s, stall_exit_s, runner_factory
        )
        if tensor_queue is not None:
            proc.tensor_receiver = tensor_queue.receiver(engine_index)
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
        exit_now(1)  # threads may be stuck in a dead socket
    exit_now(0)  # no teardown: unloading torch alone takes about a second


class EngineCoreProc:
    """One engine process's state: the core, its I/O (`EngineIO`) and the busy loop.

    Construction loads the model (slow), or has `runner_factory(config)` build the runner.
    `connect(addresses)` starts the I/O threads and sends `EngineReady` to every API server;
    `run_busy_loop()` serves until shutdown; `close(dead)` stops the I/O.
    """

    def __init__(
        self,
        config: ShoalConfig,
        engine_index: int,
        coordinator_address: str | None = None,
        drain_timeout_s: float = 0.0,
        stall_exit_s: float | None = None,
        runner_factory: RunnerFactory | None = None,
    ) -> None:
        self.engine_index = engine_index
        self.config = config
        self.drain_timeout_s = drain_timeout_s
        runner = None if runner_factory is None else runner_factory(config)
        self.engine_core = EngineCore(config, engine_index, runner)
        self.io = EngineIO(engine_index)
        # request_id -> client_index, for every request the core holds.
        self.request_clients: dict[str, int] = {}
        # client_index -> when it last got outputs from us (monotonic), for heartbeats.
        self._last_sent: dict[int, float] = {}
        self._heartbeat_due = 0.0
        self.shutdown_requested = False
        # --restart-dead-engines with --engine-stall-timeout: a step running longer than this
        # makes the process exit (the launcher then restarts it). None: never.
        self.stall_exit_s = stall_exit_s
        self._step_started: float | None = None  # monotonic, while a step runs
        # The main thread's own socket: EngineLoad to the DP coordinator (M > 1 only).
        self._load_socket: zmq.Socket | None = None
        if coordinator_address is not None:
            self._load_socket = self.io.socket(zmq.PUSH)
            self._load_socket.setsockopt(zmq.LINGER, 0)
            connect_zmq_socket(self._load_socket, coordinator_address)
        self._last_load: tuple[int, int] | None = None
        # This engine's end of the tensor queue (`TensorReceiver`), with --enable-prompt-embeds.
        self.tensor_receiver: Any | None = None
        # The periodic stats line (None with --disable-log-stats, and offline).
        self.stats_log = (
            StatsLogger(config.log_stats_interval_s) if config.log_stats_interval_s > 0 else None
        )

    @property
    def num_clients(self) -> int:
        return self.io.num_clients

    # -- startup ------------------------------------------------------------------------------

    def ready_message(self) -> EngineReady:
        core = self.engine_core
        return EngineReady(
            engine_index=self.engine_index,
            max_model_len=core.max_model_len,
            num_blocks=core.num_blocks,
            block_size=core.block_size,
            model_name=_served_model_name(self.config),
            vocab_size=core.model_runner.vocab_size,
            hidden_size=core.hidden_size,
        )

    def connect(self, addresses: EngineAddresses) -> None:
        """Start the I/O threads; EngineReady goes to every API server first."""
        self.io.start(addresses, encode(self.ready_message()))

    # -- busy loop ----------------------------------------------------------------------------

    def run_busy_loop(self) -> None:
        """Serve until a shutdown request has been drained or aborted (see module doc)."""
        drain_deadline: float | None = None
        if self.stall_exit_s:
            threading.Thread(target=self._stall_watchdog, name="StallWatchdog", daemon=True).start()
        while True:
            if self.io.error is not None:
                raise RuntimeError("an engine I/O thread failed") from self.io.error
            if self.shutdown_requested and drain_deadline is None:
                drain_deadline = time.monotonic() + self.drain_timeout_s
                logger.info(
                    "shutdown requested: draining %d request(s) for up to %.1f s",
                    len(self.request_clients),
                    self.drain_timeout_s,
                )
            if drain_deadline is not None and (
                not self.engine_core.has_unfinished_requests()
                or time.monotonic() >= drain_deadline
                or self.io.num_connected_clients == 0  # nobody left to receive the outputs
            ):
                self._abort_all()
                return
            self._process_input_queue(block=not self.engine_core.has_unfinished_requests())
            if self.engine_core.has_unfinished_requests():
                # Each step's stats are taken after its update, so the last step before going
                # idle already reports the engine's zero load to the API servers.
                self._step_started = time.monotonic()
                step_outputs = self.engine_core.step()
                self._step_started = None
                self._dispatch(step_outputs)
                if self.stats_log is not None:
                    self.stats_log.record(step_outputs)
            if self.stats_log is not None:
                self.stats_log.maybe_log()
            self._publish_load()

    def _stall_watchdog(self) -> None:
        """Exit the process (code 1, dead notice first) once one step has run longer than
        `stall_exit_s`: a hung engine then dies like a crashed one and the launcher's restart
        policy applies. Needs the GIL: a step stuck in native code that holds it is not seen
        (the API servers' stall watchdog still marks the engine down)."""
        assert self.stall_exit_s is not None
        period = min(max(self.stall_exit_s / 4, 0.05), 1.0)
        while True:
            time.sleep(period)
            started = self._step_started
            if started is None or (elapsed := time.monotonic() - started) <= self.stall_exit_s:
                continue
            reason = (
                f"a step ran for {elapsed:.1f} s, over --engine-stall-timeout "
                f"{self.stall_exit_s:g} s"
            )
            logger.error("%s: exiting so that the launcher restarts this engine", reason)
            self.io.announce_dead(reason)
            time.sleep(0.5)  # let the output thread send it
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(1)

    def _process_input_queue(self, block: bool) -> None:
        try:
            item = (
                self.io.input_queue.get(timeout=_IDLE_WAIT_S)
                if block
                else self.io.input_queue.get_nowait()
            )
            while True:
                self._handle_input(item)
                item = self.io.input_queue.get_nowait()
        except queue.Empty:
            pass

    def _handle_input(self, message: EngineCoreRequest | AbortRequest | UtilityRequest) -> None:
        if isinstance(message, AbortRequest):
            # The core answers each unfinished one with an ABORT output on its next step.
            self.engine_core.abort_requests(message.request_ids)
            return
        if isinstance(message, UtilityRequest):
            self._handle_utility(message)
            return
        self._handle_add(message)

    def _handle_utility(self, request: UtilityRequest) -> None:
        """Answer a UtilityRequest on the sender's output socket (between two steps, on the
        main thread: the core is not thread-safe)."""
        if not 0 <= request.client_index < self.num_clients:
            logger.warning(
                "dropped utility call: client_index %d out of range", request.client_index
            )
            return
        if request.method == "kv_cache_status":
            result = UtilityOutput(request.call_id, kv_cache=self.kv_cache_status())
        else:
            result = UtilityOutput(
                request.call_id, error=f"unknown utility method {request.method!r}"
            )
        self.io.send(
            request.client_index,
            EngineCoreOutputs(
                engine_index=self.engine_index, timestamp=time.time(), utility_output=result
            ),
        )

    def kv_cache_status(self) -> KVCacheStatus:
        """The block pool's counts and the result of the scheduler's and KV cache's
        `check_integrity()` ("ok" or the failed invariant)."""
        scheduler = self.engine_core.scheduler
        try:
            scheduler.check_integrity()
            integrity = "ok"
        except AssertionError as e:
            integrity = f"check_integrity failed: {e}" if str(e) else "check_integrity failed"
            logger.error("KV cache integrity check: %s", integrity)
        return KVCacheStatus(
            self.engine_index, scheduler.kv.num_blocks, scheduler.kv.num_free_blocks, integrity
        )

    def _handle_add(self, request: EngineCoreRequest) -> None:
        if not 0 <= request.client_index < self.num_clients:
            logger.warning(
                "dropped request %s: client_index %d out of range",
                request.request_id,
                request.client_index,
            )
            return
        if self.shutdown_requested:
            self._finish_unadmitted(request, FinishReason.ABORT)
            return
        try:
            if request.has_prompt_embeds:
                self._add_with_embeds(request)
            else:
                self.engine_core.add_request(request)
        except ValueError as e:
            logger.warning("request %s rejected: %s", request.request_id, e)
            self._finish_unadmitted(request, FinishReason.ERROR)
            return
        self.request_clients[request.request_id] = request.client_index

    def _add_with_embeds(self, request: EngineCoreRequest) -> None:
        """Take the request's tensor from the tensor queue (its API server queued it before
        sending the request) and add both. `ValueError` when there is no tensor queue or the
        tensor does not come or does not fit."""
        if self.tensor_receiver is None:
            raise ValueError("prompt_embeds: this engine has no tensor queue")
        received = self.tensor_receiver.take(request.request_id)
        embeds = received.tensor
        runner_dtype = getattr(self.engine_core.model_runner, "dtype", None)
        if runner_dtype is not None:
            embeds = embeds.to(runner_dtype)
        self.engine_core.add_request(request, embeds, received.digest)

    def _finish_unadmitted(self, request: EngineCoreRequest, reason: FinishReason) -> None:
        output = EngineCoreOutput(request.request_id, [], finish_reason=reason)
        outputs = EngineCoreOutputs(
            engine_index=self.engine_index,
            outputs=[output],
            scheduler_stats=self.engine_core.get_stats(),
            timestamp=time.time(),
        )
        self.io.send(request.client_index, outputs)

    def _dispatch(self, step_outputs: EngineCoreOutputs) -> None:
        """Send a step's outputs, one EngineCoreOutputs per API server that has any. An API
        server with requests here but no outputs for `HEARTBEAT_S` gets the step's stats alone
        (a heartbeat: its stall watchdog sees the engine is making progress)."""
        by_client: dict[int, list[EngineCoreOutput]] = defaultdict(list)
        for output in step_outputs.outputs:
            if output.finished:
                client_index = self.request_clients.pop(output.request_id, None)
            else:
                client_index = self.request_clients.get(output.request_id)
            if client_index is not None:
                by_client[client_index].append(output)
        for client_index, outputs in by_client.items():
            grouped = EngineCoreOutputs(
                engine_index=self.engine_index,
                outputs=outputs,
                scheduler_stats=step_outputs.scheduler_stats,
                timestamp=step_outputs.timestamp,
            )
            self.io.send(client_index, grouped)
        now = time.monotonic()
        for client_index in by_client:
            self._last_sent[client_index] = now
        if now < self._heartbeat_due:
            return
        # Scanning the clients of every request costs O(requests): twice a heartbeat period
        # is often enough (a client hears from us at least every 1.5 * HEARTBEAT_S).
        self._heartbeat_due = now + HEARTBEAT_S / 2
        for client_index in set(self.request_clients.values()) - by_client.keys():
            if now - self._last_sent.get(client_index, 0.0) >= HEARTBEAT_S:
                heartbeat = EngineCoreOutputs(
                    engine_index=self.engine_index,
                    outputs=[],
                    scheduler_stats=step_outputs.scheduler_stats,
                    timestamp=step_outputs.timestamp,
                )
                self.io.send(client_index, heartbeat)
                self._last_sent[client_index] = now

    def _abort_all(self) -> None:
        """Abort what is left and deliver the ABORT outputs (the last step of a shutdown)."""
        if self.engine_core.has_unfinished_requests():
            logger.info("aborting %d unfinished request(s)", len(self.request_clients))
            self.engine_core.abort_all_requests()
            self._dispatch(self.engine_core.step())
        self._publish_load()

    def _publish_load(self) -> None:
        if self._load_socket is None:
            return
        stats = self.engine_core.get_stats()
        load = (stats.num_waiting_reqs, stats.num_running_reqs)
        if load == self._last_load:
            return
        message = EngineLoad(self.engine_index, load[0], load[1], stats.kv_cache_usage)
        try:
            self._load_socket.send(encode(message), zmq.NOBLOCK)
            self._last_load = load
        except zmq.Again:
            pass  # coordinator not reachable yet: retried on the next change or step

    # -- exit ---------------------------------------------------------------------------------

    def close(self, dead: bool = False) -> None:
        """Stop the I/O once the queued outputs are sent (and ENGINE_CORE_DEAD on every
        output socket when `dead`)."""
        if self._load_socket is not None:
            self._load_socket.close()
        self.io.close(dead)


def _served_model_name(config: ShoalConfig) -> str:
    if config.model.served_model_name:
        return config.model.served_model_name
    from shoal.model_source import resolve_model

    try:
        return resolve_model(config.model.model).name
    except FileNotFoundError:
        return config.model.model or ""
