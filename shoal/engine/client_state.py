"""What an API server's `EngineClient` knows about its engines, apart from the sockets: the
requests in flight on each (`InFlight`), how loaded each is (`EngineLoads`, which picks the
engine of a new request), the utility calls awaiting an answer (`UtilityCalls`), and which
engines can serve (`EngineHealth`, where an engine failure is judged by the
`EngineRestartPolicy`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Container

import msgspec

from shoal.logger import init_logger
from shoal.protocol import DPStats, UtilityOutput, decode_engine_dead
from shoal.runtime.restart import EngineRestartPolicy

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


DeadHandler = Callable[[str], None]
# (engine index, reason): one engine went down (restart mode); its requests were forgotten.
EngineDownHandler = Callable[[int, str], None]


class InFlight:
    """The engine requests this API server has in flight, by engine, and when each engine
    was last heard from (the clock of the stall watchdog)."""

    def __init__(self, num_engines: int) -> None:
        self._owner: dict[str, int] = {}
        self.num_in_flight = [0] * num_engines
        # Monotonic time of each engine's last message (outputs or a heartbeat).
        self.last_heard = [0.0] * num_engines

    def __len__(self) -> int:
        return len(self._owner)

    def engine_of(self, request_id: str) -> int | None:
        return self._owner.get(request_id)

    def add(self, request_id: str, engine: int) -> None:
        if self.num_in_flight[engine] == 0:
            self.last_heard[engine] = time.monotonic()  # idle time is not a stall
        self._owner[request_id] = engine
        self.num_in_flight[engine] += 1

    def forget(self, request_ids: list[str]) -> None:
        """Drop finished or aborted requests (unknown ids are ignored)."""
        for request_id in request_ids:
            engine = self._owner.pop(request_id, None)
            if engine is not None:
                self.num_in_flight[engine] -= 1

    def forget_engine(self, engine: int | None) -> list[str]:
        """Drop every request of `engine` (None: of every engine); returns their ids."""
        ids = [rid for rid, k in self._owner.items() if engine is None or k == engine]
        self.forget(ids)
        return ids

    def heard(self, engine: int) -> None:
        self.last_heard[engine] = time.monotonic()

    def reset(self, engine: int) -> None:
        """A fresh process serves `engine`: nothing in flight, just heard from."""
        self.num_in_flight[engine] = 0
        self.heard(engine)


class EngineLoads:
    """Where a new request goes: the least loaded live engine, by the coordinator's global
    counts (lagged, over every API server) plus this server's own in-flight requests
    (exact); ties go round-robin."""

    def __init__(self, num_engines: int, in_flight: InFlight) -> None:
        self.num_engines = num_engines
        self._in_flight = in_flight
        # The coordinator's last (waiting, running) per engine.
        self.dp_loads: list[tuple[int, int]] = [(0, 0)] * num_engines
        self._next_engine = 0

    def update(self, stats: DPStats) -> None:
        if len(stats.loads) == self.num_engines:
            self.dp_loads = [(waiting, running) for waiting, running in stats.loads]

    def reset(self, engine: int) -> None:
        """A fresh process serves `engine`: the old one's load is stale."""
        self.dp_loads[engine] = (0, 0)

    def pick(self, down: Container[int]) -> int:
        """The least loaded engine not in `down` (the caller checked that one is live)."""
        best, best_score = 0, None
        for offset in range(self.num_engines):
            k = (self._next_engine + offset) % self.num_engines
            if k in down:
                continue
            waiting, running = self.dp_loads[k]
            score = _WAITING_WEIGHT * waiting + running + self._in_flight.num_in_flight[k]
            if best_score is None or score < best_score:
                best, best_score = k, score
        self._next_engine = (best + 1) % self.num_engines
        return best


class UtilityCalls:
    """Utility calls awaiting their answer: call id -> (engine, future)."""

    def __init__(self) -> None:
        self._calls: dict[int, tuple[int, asyncio.Future[UtilityOutput]]] = {}
        self._next_call_id = 0

    def open(self, engine: int) -> tuple[int, asyncio.Future[UtilityOutput]]:
        """A new call to `engine`: its id and the future its answer resolves."""
        self._next_call_id += 1
        future: asyncio.Future[UtilityOutput] = asyncio.get_running_loop().create_future()
        self._calls[self._next_call_id] = (engine, future)
        return self._next_call_id, future

    def close(self, call_id: int) -> None:
        self._calls.pop(call_id, None)

    def resolve(self, output: UtilityOutput) -> None:
        call = self._calls.get(output.call_id)
        if call is not None and not call[1].done():
            call[1].set_result(output)

    def fail(self, engine: int | None, reason: str) -> None:
        """Fail the calls waiting on `engine` (None: every engine) with `EngineDeadError`."""
        for k, future in self._calls.values():
            if (engine is None or k == engine) and not future.done():
                future.set_exception(EngineDeadError(reason))


class EngineHealth:
    """Which engines can serve, and what a failure means.

    Without restarts (`EngineRestartPolicy.restarts_engines` False) the first failure is
    fatal: `dead_reason` is set for good, every request and utility call fails and none is
    accepted. With them a failure of engine k marks it `down`: only its requests and calls
    fail, new requests go to the live engines, until its replacement's EngineReady
    (`engine_ready`). A failure that names no engine is fatal either way.
    """

    def __init__(
        self,
        num_engines: int,
        policy: EngineRestartPolicy,
        in_flight: InFlight,
        calls: UtilityCalls,
    ) -> None:
        self.num_engines = num_engines
        self.restarts_engines = policy.restarts_engines
        self._in_flight = in_flight
        self._calls = calls
        self.dead_reason: str | None = None
        # Restart mode: engine index -> why it is down (until its EngineReady arrives).
        self.down: dict[int, str] = {}
        self.on_dead: DeadHandler | None = None
        self.on_engine_down: EngineDownHandler | None = None

    def unavailable_reason(self) -> str | None:
        """Why no request can be served now: the client is dead, or (restart mode) every
        engine is down; None while at least one engine is live."""
        if self.dead_reason is not None:
            return self.dead_reason
        if self.down and len(self.down) == self.num_engines:
            reasons = "; ".join(self.down[k] for k in sorted(self.down))
            return f"no engine is available ({reasons}); retry the request shortly"
        return None

    def check_alive(self) -> None:
        """`EngineDeadError` once the client is dead."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)

    def failed(self, engine: int | None, reason: str) -> None:
        """Engine `engine` failed (None: which one is unknown), for `reason`."""
        if self.restarts_engines and engine is not None:
            self._engine_down(engine, reason)
        else:
            self._mark_dead(reason)

    def dead_notice(self, frame: bytes) -> None:
        """An engine's dead notice (ENGINE_CORE_DEAD + EngineDead, from the dying engine or,
        for a SIGKILL, the launcher): that engine failed; one that names no engine of ours
        (or does not decode) is fatal."""
        try:
            notice = decode_engine_dead(frame)
        except WIRE_DECODE_ERRORS as e:
            logger.error("malformed dead notice (%s): treating it as an unknown engine's", e)
            notice = None
        if notice is None or not 0 <= notice.engine_index < self.num_engines:
            self.failed(None, "an engine core died (ENGINE_CORE_DEAD)")
            return
        reason = f"engine {notice.engine_index} died"
        if notice.reason:
            reason += f" ({notice.reason})"
        self.failed(notice.engine_index, reason)

    def connection_lost(self, reason: str) -> None:
        """An engine's connection closed. Fatal without restarts; with them only logged:
        the connection does not say which engine it was, and the launcher's dead notice
        (or the replacement's EngineReady) names it."""
        if self.restarts_engines:
            logger.info("an engine connection closed (waiting for the launcher's notice)")
        else:
            self._mark_dead(reason)

    def engine_ready(self, engine: int) -> None:
        """Restart mode: the replacement of `engine` is ready; it serves again."""
        if engine not in self.down:
            # Its dead notice has not arrived (or got lost): what it held is gone anyway.
            self._engine_down(engine, f"engine {engine} was restarted")
        del self.down[engine]
        self._in_flight.reset(engine)

    def _engine_down(self, engine: int, reason: str) -> None:
        if engine in self.down:
            return
        self.down[engine] = reason
        ids = self._in_flight.forget_engine(engine)
        self._in_flight.num_in_flight[engine] = 0
        self._calls.fail(engine, reason)
        logger.error(
            "%s: failing its %d in-flight request(s); %d of %d engine(s) live",
            reason,
            len(ids),
            self.num_engines - len(self.down),
            self.num_engines,
        )
        if self.on_engine_down is not None:
            self.on_engine_down(engine, reason)

    def _mark_dead(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        logger.error("%s: failing %d in-flight request(s)", reason, len(self._in_flight))
        self._in_flight.forget_engine(None)
        self._calls.fail(None, reason)
        if self.on_dead is not None:
            self.on_dead(reason)
