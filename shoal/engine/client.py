"""`EngineClient`: one API server's asyncio ZMQ link to every engine (bind, ready, route, abort).

Sockets (see the topology block of shoal.protocol):

    ROUTER  bound on client_config["input_address"]   engines' DEALERs connect; first
            message from each is EngineReady; we send [identity, ADD|ABORT, payload]
    PULL    bound on client_config["output_address"]  EngineCoreOutputs or a dead notice
    SUB     connected to stats_update_address (M > 1) DPStats from the coordinator

An engine that dies without a word (SIGKILL) is seen by a socket monitor on the ROUTER: its
connection closes; the launcher also sends its dead notice. Either way the client turns dead:
every pending request fails with `EngineDeadError` and no new one is accepted.

With `restart_engines` (--restart-dead-engines) a death is per engine instead: the dead
notice `EngineDead(k)` (from the engine or, for a SIGKILL, the launcher) marks engine k down
and fails only its in-flight requests; new requests go to the live engines (none live:
`EngineDeadError`). The monitor only logs lost connections (it cannot tell which engine went).
When the restarted engine's `EngineReady` arrives on the ROUTER (ZMQ_ROUTER_HANDOVER: the new
connection takes over the reused identity) engine k is live again with fresh counters. A
stalled engine (watchdog) is marked down the same way.
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
    UtilityOutput,
    UtilityRequest,
    decode_engine_dead,
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


class ServerShuttingDownError(EngineDeadError):
    """The server's drain deadline (`--shutdown-timeout`) passed before the request finished:
    it is aborted in its engine (HTTP 503; a stream ends with an error event). A kind of
    `EngineDeadError` so that every path that fails requests of a dead engine handles it."""


OutputsHandler = Callable[[EngineCoreOutputs], None]
DeadHandler = Callable[[str], None]
# (engine index, reason): one engine went down (restart mode); its requests were forgotten.
EngineDownHandler = Callable[[int, str], None]


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
        restart_engines: bool = False,
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
        self.restart_engines = restart_engines
        if restart_engines:
            # A restarted engine reconnects with the same identity, maybe before the old
            # connection is torn down: let the new one take it over.
            self.input_socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
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
        self._on_engine_down: EngineDownHandler | None = None
        # Restart mode: engine index -> why it is down (until its EngineReady arrives).
        self.down: dict[int, str] = {}
        # Utility calls awaiting their answer: call id -> (engine, future).
        self._calls: dict[int, tuple[int, asyncio.Future[UtilityOutput]]] = {}
        self._next_call_id = 0

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

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary size as the engines reported it (None: none did)."""
        sizes = [e.vocab_size for e in self.engines if e.vocab_size > 0]
        return min(sizes) if sizes else None

    def start(
        self,
        on_outputs: OutputsHandler,
        on_dead: DeadHandler,
        on_engine_down: EngineDownHandler | None = None,
    ) -> None:
        """Start delivering every EngineCoreOutputs to `on_outputs` and the first death
        (with its reason) to `on_dead`; in restart mode each engine that goes down to
        `on_engine_down(engine, reason)`. All are called on the event loop."""
        self._on_outputs, self._on_dead = on_outputs, on_dead
        self._on_engine_down = on_engine_down
        self._tasks = [
            asyncio.create_task(self._output_loop(), name="engine-outputs"),
            asyncio.create_task(self._monitor_loop(), name="engine-monitor"),
        ]
        if self.restart_engines:
            self._tasks.append(asyncio.create_task(self._ready_loop(), name="engine-ready"))
        if self._stats_socket is not None:
            self._tasks.append(asyncio.create_task(self._stats_loop(), name="dp-stats"))
        if self.stall_timeout_s is not None:
            self._tasks.append(asyncio.create_task(self._watchdog_loop(), name="stall-watchdog"))

    # -- requests -----------------------------------------------------------------------------

    def unavailable_reason(self) -> str | None:
        """Why no request can be served now: the client is dead, or (restart mode) every
        engine is down; None while at least one engine is live."""
        if self.dead_reason is not None:
            return self.dead_reason
        if self.down and len(self.down) == self.num_engines:
            reasons = "; ".join(self.down[k] for k in sorted(self.down))
            return f"no engine is available ({reasons}); retry the request shortly"
        return None

    def pick_engine(self) -> int:
        """The least loaded live engine: the coordinator's global counts (lagged) plus this
        server's own in-flight requests (exact); ties go round-robin. `EngineDeadError`
        when no engine is live."""
        if (reason := self.unavailable_reason()) is not None:
            raise EngineDeadError(reason)
        best, best_score = 0, None
        for offset in range(self.num_engines):
            k = (self._next_engine + offset) % self.num_engines
            if k in self.down:
                continue
            waiting, running = self._dp_loads[k]
            score = _WAITING_WEIGHT * waiting + running + self.num_in_flight[k]
            if best_score is None or score < best_score:
                best, best_score = k, score
        self._next_engine = (best + 1) % self.num_engines
        return best

    async def add_requests(self, engine: int, requests: list[EngineCoreRequest]) -> None:
        """Send `requests` to `engine`; `EngineDeadError` when the client is dead."""
        self._check_alive()
        if engine in self.down:
            raise EngineDeadError(f"{self.down[engine]}; retry the request")
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
            if frame.startswith(ENGINE_CORE_DEAD):
                self._on_dead_notice(frame)
                continue
            try:
                outputs = outputs_decoder.decode(frame)
            except WIRE_DECODE_ERRORS as e:
                logger.error("dropped a malformed engine output frame: %s", e)
                continue
            if 0 <= outputs.engine_index < self.num_engines:
                self._last_heard[outputs.engine_index] = time.monotonic()
            if outputs.utility_output is not None:
                self._on_utility_output(outputs.utility_output)
            self._forget([o.request_id for o in outputs.outputs if o.finish_reason is not None])
            try:
                assert self._on_outputs is not None
                self._on_outputs(outputs)
            except Exception:
                logger.exception("output handler failed")

    def _on_dead_notice(self, frame: bytes) -> None:
        try:
            notice = decode_engine_dead(frame)
        except WIRE_DECODE_ERRORS as e:
            logger.error("malformed dead notice (%s): treating it as an unknown engine's", e)
            notice = None
        if notice is None or not 0 <= notice.engine_index < self.num_engines:
            self._mark_dead("an engine core died (ENGINE_CORE_DEAD)")
            return
        reason = f"engine {notice.engine_index} died"
        if notice.reason:
            reason += f" ({notice.reason})"
        if self.restart_engines:
            self._engine_down(notice.engine_index, reason)
        else:
            self._mark_dead(f"{reason} (ENGINE_CORE_DEAD)")

    async def _monitor_loop(self) -> None:
        # ACCEPTED/DISCONNECTED carry the connection's fd. An engine holds one connection
        # here; fewer live connections than engines once all are ready = one went away.
        # In restart mode a lost connection is only logged: the fd does not say which
        # engine it was, and the launcher's dead notice names it.
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._live_fds.add(fd)
            elif event["event"] == zmq.EVENT_DISCONNECTED and fd in self._live_fds:
                self._live_fds.discard(fd)
                if self.restart_engines:
                    logger.info("an engine connection closed (waiting for the launcher's notice)")
                elif self.engines and len(self._live_fds) < self.num_engines:
                    self._mark_dead("lost the connection to an engine core (process died?)")

    async def _ready_loop(self) -> None:
        """Restart mode: EngineReady of restarted engines, after start-up."""
        ready_decoder = decoder(EngineReady)
        while True:
            frames = await self.input_socket.recv_multipart()
            if len(frames) != 2:
                logger.warning("ignored a %d-frame message on the input socket", len(frames))
                continue
            identity, payload = frames
            try:
                message = ready_decoder.decode(payload)
            except WIRE_DECODE_ERRORS as e:
                logger.warning("ignored a malformed ready message: %s", e)
                continue
            k = message.engine_index
            if not 0 <= k < self.num_engines or identity != engine_identity(k):
                logger.warning("ignored ready message of unknown engine %d", k)
                continue
            self._engine_up(message)

    def _engine_up(self, message: EngineReady) -> None:
        k = message.engine_index
        if k not in self.down:
            # Its dead notice has not arrived (or got lost): what it held is gone anyway.
            self._engine_down(k, f"engine {k} was restarted")
        del self.down[k]
        self.engines[k] = message
        self.num_in_flight[k] = 0
        self._dp_loads[k] = (0, 0)  # the old process's load is stale
        self._last_heard[k] = time.monotonic()
        live = self.num_engines - len(self.down)
        logger.info("engine %d is ready again; %d of %d engine(s) live", k, live, self.num_engines)

    def _engine_down(self, k: int, reason: str) -> None:
        """Restart mode: mark engine k down, forget and fail its in-flight requests."""
        if k in self.down:
            return
        self.down[k] = reason
        ids = [request_id for request_id, engine in self._owner.items() if engine == k]
        self._forget(ids)
        self.num_in_flight[k] = 0
        self._fail_calls(k, reason)
        logger.error(
            "%s: failing its %d in-flight request(s); %d of %d engine(s) live",
            reason,
            len(ids),
            self.num_engines - len(self.down),
            self.num_engines,
        )
        if self._on_engine_down is not None:
            self._on_engine_down(k, reason)

    async def _watchdog_loop(self) -> None:
        assert self.stall_timeout_s is not None
        period = min(max(self.stall_timeout_s / 4, 0.05), 1.0)
        while self.dead_reason is None:
            await asyncio.sleep(period)
            now = time.monotonic()
            for k in range(self.num_engines):
                silent_s = now - self._last_heard[k]
                if self.num_in_flight[k] > 0 and silent_s > self.stall_timeout_s:
                    reason = (
                        f"engine {k} made no progress for {silent_s:.1f} s with "
                        f"{self.num_in_flight[k]} request(s) in flight (--engine-stall-timeout)"
                    )
                    if self.restart_engines:
                        self._engine_down(k, reason)
                        continue
                    self._mark_dead(reason)
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
        self._fail_calls(None, reason)
        if self._on_dead is not None:
            self._on_dead(reason)

    # -- utility calls ------------------------------------------------------------------------

    async def call_utility(
        self, engine: int, method: str, timeout_s: float = 10.0
    ) -> UtilityOutput:
        """Run utility `method` in `engine` (between two of its steps) and return its answer.
        `EngineDeadError` when the engine is (or goes) down, `TimeoutError` after
        `timeout_s`."""
        self._check_alive()
        if engine in self.down:
            raise EngineDeadError(self.down[engine])
        self._next_call_id += 1
        call_id = self._next_call_id
        future: asyncio.Future[UtilityOutput] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = (engine, future)
        try:
            request = UtilityRequest(call_id, method, self.client_index)
            try:
                await self.input_socket.send_multipart(
                    [engine_identity(engine), RequestType.UTILITY.value, encode(request)]
                )
            except zmq.ZMQError as e:
                raise EngineDeadError(f"engine {engine} is unreachable: {e}") from e
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._calls.pop(call_id, None)

    def _on_utility_output(self, output: UtilityOutput) -> None:
        call = self._calls.get(output.call_id)
        if call is not None and not call[1].done():
            call[1].set_result(output)

    def _fail_calls(self, engine: int | None, reason: str) -> None:
        """Fail the utility calls waiting on `engine` (None: every engine)."""
        for k, future in self._calls.values():
            if (engine is None or k == engine) and not future.done():
                future.set_exception(EngineDeadError(reason))

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
