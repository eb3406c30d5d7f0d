"""`EngineClient`: one API server's asyncio ZMQ link to every engine (bind, ready, route, abort).

Sockets (see the topology block of shoal.protocol):

    ROUTER  bound on client_config["input_address"]   engines' DEALERs connect; first
            message from each is EngineReady; we send [identity, ADD|ABORT, payload]
    PULL    bound on client_config["output_address"]  EngineCoreOutputs or a dead notice
    SUB     connected to stats_update_address (M > 1) DPStats from the coordinator

An engine that dies without a word (SIGKILL) is seen by a socket monitor on the ROUTER: its
connection closes; the launcher also sends its dead notice. Either way the client turns dead:
every pending request fails with `EngineDeadError` and no new one is accepted.

With an `EngineRestartPolicy` that restarts engines (--restart-dead-engines) a death is per
engine instead (`EngineHealth`, client_state.py): engine k is down and only its requests
fail, until its replacement's `EngineReady` arrives on the ROUTER (ZMQ_ROUTER_HANDOVER: the
new connection takes over the reused identity). A stalled engine (watchdog) fails the same way.

A little over 400 lines on purpose: the sockets, the ready handshake and the loops that read
them are one link and read best together; the bookkeeping they share (requests in flight,
loads, health) is in client_state.py.
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

from shoal.engine.client_state import (
    WIRE_DECODE_ERRORS,
    DeadHandler,
    EngineDeadError,
    EngineDownHandler,
    EngineHealth,
    EngineLoads,
    InFlight,
    UtilityCalls,
)

# Defined beside the bookkeeping that raises it; the API server imports it from here.
from shoal.engine.client_state import ServerShuttingDownError as ServerShuttingDownError
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
    decoder,
    encode,
    engine_identity,
)
from shoal.runtime.addresses import bind_zmq_socket, connect_zmq_socket, unlink_ipc_address
from shoal.runtime.restart import EngineRestartPolicy

logger = init_logger(__name__)

OutputsHandler = Callable[[EngineCoreOutputs], None]


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
        restart_policy: EngineRestartPolicy | None = None,
    ) -> None:
        """`stall_timeout_s`: seconds an engine holding requests may stay silent before it
        is declared hung (None: never). `restart_policy`: whether a dead engine comes back
        (None: it does not)."""
        for key in ("input_address", "output_address"):
            if not client_config.get(key):
                raise ValueError(f"client_config: {key} is required")
        if num_engines < 1:
            raise ValueError(f"--data-parallel-size: must be at least 1, got {num_engines}")
        self.client_index: int = int(client_config.get("client_index", 0))
        self.client_count: int = int(client_config.get("client_count", 1))
        self.num_engines = num_engines
        self.in_flight = InFlight(num_engines)
        self._calls = UtilityCalls()
        self.health = EngineHealth(
            num_engines,
            restart_policy or EngineRestartPolicy(enabled=False),
            self.in_flight,
            self._calls,
        )
        self.loads = EngineLoads(num_engines, self.in_flight)
        self._open_sockets(client_config)
        self.engines: list[EngineReady] = []
        self._live_fds: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []
        # Stall watchdog: an engine holding requests of ours that sends nothing (outputs or
        # heartbeats, at least every HEARTBEAT_S while busy) for `stall_timeout_s` is hung.
        self.stall_timeout_s = stall_timeout_s
        self._on_outputs: OutputsHandler | None = None

    def _open_sockets(self, client_config: dict[str, Any]) -> None:
        """Bind ROUTER + PULL, report their endpoints, connect the stats SUB (M > 1)."""
        self.ctx = zmq.asyncio.Context()
        self.input_socket = self.ctx.socket(zmq.ROUTER)
        # Unroutable sends raise (EHOSTUNREACH) instead of vanishing.
        self.input_socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.input_socket.setsockopt(zmq.SNDHWM, 0)
        self.input_socket.setsockopt(zmq.LINGER, 0)
        if self.health.restarts_engines:
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
            connect_zmq_socket(self._stats_socket, stats_address)

    @property
    def dead_reason(self) -> str | None:
        """Why the client is dead for good (no request is served again); None while not."""
        return self.health.dead_reason

    @property
    def down(self) -> dict[int, str]:
        """Restart mode: engine index -> why it is down, until its replacement is ready."""
        return self.health.down

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
            message = self._ready_message(await self.input_socket.recv_multipart(), ready_decoder)
            if message is not None:
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

    @property
    def hidden_size(self) -> int:
        """The model's hidden size as the engines reported it (0: none did)."""
        return max((e.hidden_size for e in self.engines), default=0)

    def start(
        self,
        on_outputs: OutputsHandler,
        on_dead: DeadHandler,
        on_engine_down: EngineDownHandler | None = None,
    ) -> None:
        """Start delivering every EngineCoreOutputs to `on_outputs` and the first death
        (with its reason) to `on_dead`; in restart mode each engine that goes down to
        `on_engine_down(engine, reason)`. All are called on the event loop."""
        self._on_outputs = on_outputs
        self.health.on_dead, self.health.on_engine_down = on_dead, on_engine_down
        self._tasks = [
            asyncio.create_task(self._output_loop(), name="engine-outputs"),
            asyncio.create_task(self._monitor_loop(), name="engine-monitor"),
        ]
        if self.health.restarts_engines:
            self._tasks.append(asyncio.create_task(self._ready_loop(), name="engine-ready"))
        if self._stats_socket is not None:
            self._tasks.append(asyncio.create_task(self._stats_loop(), name="dp-stats"))
        if self.stall_timeout_s is not None:
            self._tasks.append(asyncio.create_task(self._watchdog_loop(), name="stall-watchdog"))

    # -- requests -----------------------------------------------------------------------------

    def unavailable_reason(self) -> str | None:
        """Why no request can be served now: the client is dead, or (restart mode) every
        engine is down; None while at least one engine is live."""
        return self.health.unavailable_reason()

    def pick_engine(self) -> int:
        """The least loaded live engine: the coordinator's global counts (lagged) plus this
        server's own in-flight requests (exact); ties go round-robin. `EngineDeadError`
        when no engine is live."""
        if (reason := self.unavailable_reason()) is not None:
            raise EngineDeadError(reason)
        return self.loads.pick(self.down)

    async def add_requests(self, engine: int, requests: list[EngineCoreRequest]) -> None:
        """Send `requests` to `engine`; `EngineDeadError` when the client is dead."""
        self.health.check_alive()
        if engine in self.down:
            raise EngineDeadError(f"{self.down[engine]}; retry the request")
        identity = engine_identity(engine)
        for request in requests:
            self.in_flight.add(request.request_id, engine)
            try:
                await self.input_socket.send_multipart(
                    [identity, RequestType.ADD.value, encode(request)]
                )
            except zmq.ZMQError as e:
                self.in_flight.forget([request.request_id])
                raise EngineDeadError(f"engine {engine} is unreachable: {e}") from e

    async def abort_requests(self, request_ids: list[str]) -> None:
        """Abort engine requests (no-op for ids already finished); never raises."""
        by_engine: dict[int, list[str]] = {}
        for request_id in request_ids:
            engine = self.in_flight.engine_of(request_id)
            if engine is not None:
                by_engine.setdefault(engine, []).append(request_id)
        if self.dead_reason is not None:
            self.in_flight.forget(request_ids)
            return
        for engine, ids in by_engine.items():
            with contextlib.suppress(zmq.ZMQError):
                await self.input_socket.send_multipart(
                    [engine_identity(engine), RequestType.ABORT.value, encode(AbortRequest(ids))]
                )

    # -- background loops ---------------------------------------------------------------------

    async def _output_loop(self) -> None:
        outputs_decoder = decoder(EngineCoreOutputs)
        while True:
            frame = await self.output_socket.recv()
            if frame.startswith(ENGINE_CORE_DEAD):
                self.health.dead_notice(frame)
                continue
            try:
                outputs = outputs_decoder.decode(frame)
            except WIRE_DECODE_ERRORS as e:
                logger.error("dropped a malformed engine output frame: %s", e)
                continue
            if 0 <= outputs.engine_index < self.num_engines:
                self.in_flight.heard(outputs.engine_index)
            if outputs.utility_output is not None:
                self._calls.resolve(outputs.utility_output)
            finished = [o.request_id for o in outputs.outputs if o.finish_reason is not None]
            self.in_flight.forget(finished)
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
                    reason = "lost the connection to an engine core (process died?)"
                    self.health.connection_lost(reason)

    async def _ready_loop(self) -> None:
        """Restart mode: EngineReady of restarted engines, after start-up."""
        ready_decoder = decoder(EngineReady)
        while True:
            message = self._ready_message(await self.input_socket.recv_multipart(), ready_decoder)
            if message is not None:
                self._engine_up(message)

    def _ready_message(
        self, frames: list[bytes], ready_decoder: msgspec.msgpack.Decoder[EngineReady]
    ) -> EngineReady | None:
        """The EngineReady in one ROUTER message `[identity, payload]`; None (logged) for
        anything else, or a ready message from an identity not its engine's."""
        if len(frames) != 2:
            logger.warning("ignored a %d-frame message on the input socket", len(frames))
            return None
        identity, payload = frames
        try:
            message = ready_decoder.decode(payload)
        except WIRE_DECODE_ERRORS as e:
            logger.warning("ignored a malformed ready message: %s", e)
            return None
        k = message.engine_index
        if not 0 <= k < self.num_engines or identity != engine_identity(k):
            logger.warning("ignored ready message of unknown engine %d", k)
            return None
        return message

    def _engine_up(self, message: EngineReady) -> None:
        k = message.engine_index
        self.health.engine_ready(k)
        self.engines[k] = message
        self.loads.reset(k)  # the old process's load is stale
        live = self.num_engines - len(self.down)
        logger.info("engine %d is ready again; %d of %d engine(s) live", k, live, self.num_engines)

    async def _watchdog_loop(self) -> None:
        assert self.stall_timeout_s is not None
        period = min(max(self.stall_timeout_s / 4, 0.05), 1.0)
        while self.dead_reason is None:
            await asyncio.sleep(period)
            now = time.monotonic()
            for k in range(self.num_engines):
                silent_s = now - self.in_flight.last_heard[k]
                num_requests = self.in_flight.num_in_flight[k]
                if num_requests > 0 and silent_s > self.stall_timeout_s:
                    self.health.failed(
                        k,
                        f"engine {k} made no progress for {silent_s:.1f} s with "
                        f"{num_requests} request(s) in flight (--engine-stall-timeout)",
                    )

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
            self.loads.update(stats)

    # -- utility calls ------------------------------------------------------------------------

    async def call_utility(
        self, engine: int, method: str, timeout_s: float = 10.0
    ) -> UtilityOutput:
        """Run utility `method` in `engine` (between two of its steps) and return its answer.
        `EngineDeadError` when the engine is (or goes) down, `TimeoutError` after
        `timeout_s`."""
        self.health.check_alive()
        if engine in self.down:
            raise EngineDeadError(self.down[engine])
        call_id, future = self._calls.open(engine)
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
            self._calls.close(call_id)

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
