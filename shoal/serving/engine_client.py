"""`EngineClient`: one API server's asyncio ZMQ link to every engine (bind, ready, route, abort).

Sockets (see the topology block of shoal.protocol):

    ROUTER  bound on client_config["input_address"]   engines' DEALERs connect; first
            message from each is EngineReady; we send [identity, ADD|ABORT, payload]
    PULL    bound on client_config["output_address"]  EngineCoreOutputs or ENGINE_CORE_DEAD
    SUB     connected to stats_update_address (M > 1) DPStats from the coordinator

An engine that dies without a word (SIGKILL) is seen by a socket monitor on the ROUTER: its
connection closes. Either way the client turns dead: every pending request fails with
`EngineDeadError` and no new one is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from shoal.logger import init_logger
from shoal.protocol import (
    ENGINE_CORE_DEAD,
    AbortRequest,
    DPStats,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineReady,
    RequestType,
    decoder,
    encode,
    engine_identity,
)
from shoal.runtime.addresses import bind_zmq_socket, unlink_ipc_address

logger = init_logger(__name__)

# What a typed msgpack decoder raises on a bad frame: DecodeError (ValidationError is one) and,
# for a str that is not UTF-8, UnicodeDecodeError (found by tests/serving/test_wire_fuzz.py).
WIRE_DECODE_ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError, UnicodeDecodeError)

# A waiting request costs more than a running one when picking the least loaded engine
# (it holds no KV yet but will delay everything behind it).
_WAITING_WEIGHT = 4


class EngineDeadError(RuntimeError):
    """An engine died: the request cannot complete (HTTP 503)."""


OutputsHandler = Callable[[EngineCoreOutputs], None]
DeadHandler = Callable[[str], None]


class EngineClient:
    """Transport to `num_engines` engines for API server `client_index`.

    Construction binds the ROUTER and PULL sockets and reports the bound endpoints on
    `client_config["actual_address_pipe"]` (then closes it). `wait_for_engines()` blocks
    (async) until every engine's EngineReady arrived; `start()` begins delivering outputs.
    """

    def __init__(
        self,
        client_config: dict[str, Any],
        num_engines: int,
        stall_timeout_s: float | None = None,
    ) -> None:
        for key in ("input_address", "output_address"):
            if not client_config.get(key):
                raise ValueError(f"client_config: {key} is required")
        if num_engines < 1:
            raise ValueError(f"--data-parallel-size: must be at least 1, got {num_engines}")
        self.client_index: int = int(client_config.get("client_index", 0))
        self.client_count: int = int(client_config.get("client_count", 1))
        self.num_engines = num_engines
        self.ctx = zmq.asyncio.Context()
        self.input_socket = self.ctx.socket(zmq.ROUTER)
        # Unroutable sends raise (EHOSTUNREACH) instead of vanishing.
        self.input_socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.input_socket.setsockopt(zmq.SNDHWM, 0)
        self.input_socket.setsockopt(zmq.LINGER, 0)
        self._monitor = self.input_socket.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
        )
        self.output_socket = self.ctx.socket(zmq.PULL)
        self.output_socket.setsockopt(zmq.RCVHWM, 0)
        self.output_socket.setsockopt(zmq.LINGER, 0)
        self.input_address = bind_zmq_socket(self.input_socket, client_config["input_address"])
        self.output_address = bind_zmq_socket(self.output_socket, client_config["output_address"])
        _report_addresses(client_config, self.input_address, self.output_address)
        self._stats_socket: zmq.asyncio.Socket | None = None
        stats_address = client_config.get("stats_update_address")
        if stats_address:
            self._stats_socket = self.ctx.socket(zmq.SUB)
            self._stats_socket.setsockopt(zmq.SUBSCRIBE, b"")
            self._stats_socket.setsockopt(zmq.LINGER, 0)
            self._stats_socket.connect(stats_address)
        self.engines: list[EngineReady] = []
        # Requests (engine request ids) this server has in flight on each engine.
        self.num_in_flight = [0] * num_engines
        self._owner: dict[str, int] = {}
        # The coordinator's last (waiting, running) per engine, across all API servers.
        self._dp_loads: list[tuple[int, int]] = [(0, 0)] * num_engines
        self._next_engine = 0
        self._live_fds: set[int] = set()
        self.dead_reason: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Stall watchdog: an engine holding requests of ours that sends nothing (outputs or
        # heartbeats, at least every HEARTBEAT_S while busy) for `stall_timeout_s` is hung.
        self.stall_timeout_s = stall_timeout_s
        self._last_heard = [0.0] * num_engines
        self._on_outputs: OutputsHandler | None = None
        self._on_dead: DeadHandler | None = None

    # -- startup ------------------------------------------------------------------------------

    async def wait_for_engines(self, timeout_s: float) -> list[EngineReady]:
        """Wait until every engine has sent EngineReady; `RuntimeError` names the missing
        engines after `timeout_s`. Returns them indexed by engine index."""
        ready: dict[int, EngineReady] = {}
        ready_decoder = decoder(EngineReady)
        deadline = time.monotonic() + timeout_s
        while len(ready) < self.num_engines:
            remaining_ms = int(max(deadline - time.monotonic(), 0) * 1000)
            if remaining_ms <= 0 or not await self.input_socket.poll(remaining_ms):
                missing = sorted(set(range(self.num_engines)) - set(ready))
                raise RuntimeError(
                    f"timed out after {timeout_s:.1f}s waiting for engine(s) {missing} to "
                    "report ready (raise --engine-ready-timeout or SHOAL_ENGINE_READY_TIMEOUT_S)"
                )
            identity, payload = await self.input_socket.recv_multipart()
            try:
                message = ready_decoder.decode(payload)
            except WIRE_DECODE_ERRORS as e:
                logger.warning("ignored a malformed ready message: %s", e)
                continue
            if not 0 <= message.engine_index < self.num_engines or identity != engine_identity(
                message.engine_index
            ):
                logger.warning("ignored ready message of unknown engine %d", message.engine_index)
                continue
            ready[message.engine_index] = message
        self.engines = [ready[k] for k in range(self.num_engines)]
        logger.info("all %d engine(s) ready", self.num_engines)
        return self.engines

    @property
    def max_model_len(self) -> int:
        """The smallest context length among the engines (they should all agree)."""
        return min(e.max_model_len for e in self.engines)

    def start(self, on_outputs: OutputsHandler, on_dead: DeadHandler) -> None:
        """Start delivering every EngineCoreOutputs to `on_outputs` and the first death
        (with its reason) to `on_dead`; both are called on the event loop."""
        self._on_outputs, self._on_dead = on_outputs, on_dead
        self._tasks = [
            asyncio.create_task(self._output_loop(), name="engine-outputs"),
            asyncio.create_task(self._monitor_loop(), name="engine-monitor"),
        ]
        if self._stats_socket is not None:
            self._tasks.append(asyncio.create_task(self._stats_loop(), name="dp-stats"))
        if self.stall_timeout_s is not None:
            self._tasks.append(asyncio.create_task(self._watchdog_loop(), name="stall-watchdog"))

    # -- requests -----------------------------------------------------------------------------

    def pick_engine(self) -> int:
        """The least loaded engine: the coordinator's global counts (lagged) plus this
        server's own in-flight requests (exact); ties go round-robin."""
        best, best_score = 0, None
        for offset in range(self.num_engines):
            k = (self._next_engine + offset) % self.num_engines
            waiting, running = self._dp_loads[k]
            score = _WAITING_WEIGHT * waiting + running + self.num_in_flight[k]
            if best_score is None or score < best_score:
                best, best_score = k, score
        self._next_engine = (best + 1) % self.num_engines
        return best

    async def add_requests(self, engine: int, requests: list[EngineCoreRequest]) -> None:
        """Send `requests` to `engine`; `EngineDeadError` when the client is dead."""
        self._check_alive()
        identity = engine_identity(engine)
        for request in requests:
            if self.num_in_flight[engine] == 0:
                self._last_heard[engine] = time.monotonic()  # idle time is not a stall
            self._owner[request.request_id] = engine
            self.num_in_flight[engine] += 1
            try:
                await self.input_socket.send_multipart(
                    [identity, RequestType.ADD.value, encode(request)]
                )
            except zmq.ZMQError as e:
                self._forget([request.request_id])
                raise EngineDeadError(f"engine {engine} is unreachable: {e}") from e

    async def abort_requests(self, request_ids: list[str]) -> None:
        """Abort engine requests (no-op for ids already finished); never raises."""
        by_engine: dict[int, list[str]] = {}
        for request_id in request_ids:
            engine = self._owner.get(request_id)
            if engine is not None:
                by_engine.setdefault(engine, []).append(request_id)
        if self.dead_reason is not None:
            self._forget(request_ids)
            return
        for engine, ids in by_engine.items():
            with contextlib.suppress(zmq.ZMQError):
                await self.input_socket.send_multipart(
                    [engine_identity(engine), RequestType.ABORT.value, encode(AbortRequest(ids))]
                )

    def _forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            engine = self._owner.pop(request_id, None)
            if engine is not None:
                self.num_in_flight[engine] -= 1

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)

    # -- background loops ---------------------------------------------------------------------

    async def _output_loop(self) -> None:
        outputs_decoder = decoder(EngineCoreOutputs)
        while True:
            frame = await self.output_socket.recv()
            if frame == ENGINE_CORE_DEAD:
                self._mark_dead("an engine core died (ENGINE_CORE_DEAD)")
                continue
            try:
                outputs = outputs_decoder.decode(frame)
            except WIRE_DECODE_ERRORS as e:
                logger.error("dropped a malformed engine output frame: %s", e)
                continue
            if 0 <= outputs.engine_index < self.num_engines:
                self._last_heard[outputs.engine_index] = time.monotonic()
            self._forget([o.request_id for o in outputs.outputs if o.finish_reason is not None])
            try:
                assert self._on_outputs is not None
                self._on_outputs(outputs)
            except Exception:
                logger.exception("output handler failed")

    async def _monitor_loop(self) -> None:
        # ACCEPTED/DISCONNECTED carry the connection's fd. An engine holds one connection
        # here; fewer live connections than engines once all are ready = one went away.
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._live_fds.add(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED and fd in self._live_fds:
                self._live_fds.discard(fd)
                if self.engines and len(self._live_fds) < self.num_engines:
                    self._mark_dead("lost the connection to an engine core (process died?)")

    async def _watchdog_loop(self) -> None:
        assert self.stall_timeout_s is not None
        period = min(max(self.stall_timeout_s / 4, 0.05), 1.0)
        while self.dead_reason is None:
            await asyncio.sleep(period)
            now = time.monotonic()
            for k in range(self.num_engines):
                silent_s = now - self._last_heard[k]
                if self.num_in_flight[k] > 0 and silent_s > self.stall_timeout_s:
                    self._mark_dead(
                        f"engine {k} made no progress for {silent_s:.1f} s with "
                        f"{self.num_in_flight[k]} request(s) in flight (--engine-stall-timeout)"
                    )
                    return

    async def _stats_loop(self) -> None:
        assert self._stats_socket is not None
        stats_decoder = decoder(DPStats)
        while True:
            frame = await self._stats_socket.recv()
            try:
                stats = stats_decoder.decode(frame)
            except WIRE_DECODE_ERRORS as e:
                logger.warning("dropped a malformed DPStats frame: %s", e)
                continue
            if len(stats.loads) == self.num_engines:
                self._dp_loads = [tuple(load) for load in stats.loads]  # type: ignore[misc]

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        logger.error("%s: failing %d in-flight request(s)", reason, len(self._owner))
        self._forget(list(self._owner))
        if self._on_dead is not None:
            self._on_dead(reason)

    # -- shutdown -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop the loops, close the sockets and remove this server's IPC socket files."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []
        self.input_socket.disable_monitor()
        sockets = [self._monitor, self.input_socket, self.output_socket, self._stats_socket]
        for sock in sockets:
            if sock is not None:
                sock.close(linger=0)
        self.ctx.term()
        unlink_ipc_address(self.input_address)
        unlink_ipc_address(self.output_address)


def _report_addresses(
    client_config: dict[str, Any], input_address: str, output_address: str
) -> None:
    pipe = client_config.get("actual_address_pipe")
    if pipe is None:
        return
    try:
        pipe.send({"input_address": input_address, "output_address": output_address})
    finally:
        pipe.close()
