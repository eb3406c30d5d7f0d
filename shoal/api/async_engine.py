"""`AsyncEngine`: prompts in, `RequestOutput` streams out, over an `EngineClient` (one per API server).

Request lifecycle in an API server:
  1. `process()` tokenizes and validates (ValueError names the field) -> ProcessedRequest.
  2. `generate()` registers a stream and the request with the OutputProcessor, picks the least
     loaded engine and sends the engine request(s) (n > 1: n children, same engine).
  3. The client's output loop calls `_on_outputs`: metrics, OutputProcessor, then each
     RequestOutput goes to its stream; stop strings found here are aborted in the engine.
  4. The caller stops early (disconnect, error) -> the generator's `finally` aborts the
     request in the engine. An engine death fails every stream with EngineDeadError; with
     --restart-dead-engines only the streams on that engine fail (`_on_engine_down`).
  5. Shutdown: past the drain deadline `end_in_flight` fails every stream with
     ServerShuttingDownError (step 4 then aborts it in the engine) and refuses new requests.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from shoal.api.metrics import HISTOGRAMS, MetricsStore
from shoal.engine.client import EngineClient, EngineDeadError, ServerShuttingDownError
from shoal.logger import init_logger
from shoal.processing.output_processor import OutputProcessor
from shoal.processing.outputs import RequestOutput, RequestOutputKind
from shoal.processing.processor import InputProcessor, ProcessedRequest, PromptType
from shoal.processing.tokenizer import Tokenizer
from shoal.protocol import EngineCoreOutput, EngineCoreOutputs, SchedulerStats
from shoal.sampling_params import SamplingParams

logger = init_logger(__name__)

_TTFT, _ITL, _E2E = HISTOGRAMS


class _Stream:
    """The outputs of one request, waiting for its HTTP handler."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: deque[RequestOutput | BaseException] = deque()
        # The handler's future while it waits (a bare future costs less than asyncio.Event).
        self.waiter: asyncio.Future[None] | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():  # done: the waiting handler was cancelled
                waiter.set_result(None)

    async def get(self) -> RequestOutput | BaseException:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.items.popleft()


@dataclass
class _Timing:
    """Latency bookkeeping of one engine request (one sequence)."""

    arrival_s: float  # monotonic
    num_prompt_tokens: int
    last_output_s: float = 0.0
    has_output: bool = False


class AsyncEngine:
    """What the HTTP routes call: `process`, `generate`, `is_dead`."""

    def __init__(
        self,
        client: EngineClient,
        tokenizer: Tokenizer,
        metrics: MetricsStore,
        stream_interval: int = 1,
    ) -> None:
        """`stream_interval`: tokens per streamed output (`--stream-interval`, see
        `OutputProcessor`)."""
        self.client = client
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_model_len = client.max_model_len
        self.processor = InputProcessor(tokenizer, self.max_model_len, client.vocab_size)
        self.output_processor = OutputProcessor(tokenizer, stream_interval)
        self._streams: dict[str, _Stream] = {}
        self._timings: dict[str, _Timing] = {}
        # request id -> (engine, its engine request ids), while it runs.
        self._placement: dict[str, tuple[int, list[str]]] = {}
        self._background: set[asyncio.Task[None]] = set()
        # Set once the drain deadline passed (`end_in_flight`): why no request is served now.
        self._shutdown_reason: str | None = None
        client.start(self._on_outputs, self._on_dead, self._on_engine_down)

    @property
    def dead_reason(self) -> str | None:
        return self.client.dead_reason

    @property
    def unavailable_reason(self) -> str | None:
        """Why no request can be served now (dead, or every engine down); else None."""
        return self.client.unavailable_reason()

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        add_special_tokens: bool = True,
    ) -> ProcessedRequest:
        """Tokenize and validate; `ValueError` naming the field (e.g. a prompt longer than
        max_model_len); `EngineDeadError` once an engine died (restart mode: while no
        engine is live) or the drain deadline passed (`ServerShuttingDownError`)."""
        self._check_serving()
        return self.processor.process(
            request_id,
            prompt,
            params,
            client_index=self.client.client_index,
            add_special_tokens=add_special_tokens,
        )

    async def generate(
        self,
        request: ProcessedRequest,
        kind: RequestOutputKind = RequestOutputKind.DELTA,
    ) -> AsyncIterator[RequestOutput]:
        """Send `request` to an engine and yield its outputs until it finishes.

        `EngineDeadError` if the engine dies first (`ServerShuttingDownError`: the drain
        deadline passed first). Closing the generator early (client disconnect,
        cancellation) aborts the request in the engine."""
        self._check_serving()
        request_id = request.request_id
        self.output_processor.add_request(request, kind)  # ValueError for a duplicate id
        stream = _Stream()
        self._streams[request_id] = stream
        now = time.monotonic()
        for engine_request in request.engine_requests:
            self._timings[engine_request.request_id] = _Timing(now, len(request.prompt_token_ids))
        self.metrics.inc("requests_received_total")
        finished = False
        try:
            engine = self.client.pick_engine()
            engine_ids = [r.request_id for r in request.engine_requests]
            self._placement[request_id] = (engine, engine_ids)
            await self.client.add_requests(engine, request.engine_requests)
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            self._placement.pop(request_id, None)
            if not finished:
                await self._abort(request_id)

    async def _abort(self, request_id: str) -> None:
        engine_ids = self.output_processor.abort_requests([request_id])
        for engine_id in engine_ids:
            timing = self._timings.pop(engine_id, None)
            if timing is not None:
                self.metrics.inc("request_success_total:abort")
        if engine_ids:
            # Shielded: this runs while the handler is being cancelled (disconnect).
            await asyncio.shield(self.client.abort_requests(engine_ids))

    def _check_serving(self) -> None:
        if self._shutdown_reason is not None:
            raise ServerShuttingDownError(self._shutdown_reason)
        if (reason := self.client.unavailable_reason()) is not None:
            raise EngineDeadError(reason)

    def end_in_flight(self, reason: str) -> int:
        """The drain deadline passed: refuse new requests and fail every request still in
        flight with `ServerShuttingDownError(reason)`. Each one's generator aborts it in the
        engine on its way out, and its route answers with the error (a final SSE event, or a
        503 when nothing was sent yet), so that every response ends by itself. Returns how
        many requests were failed."""
        self._shutdown_reason = reason
        for stream in self._streams.values():
            # One exception per stream: each is raised in its own handler task.
            stream.put(ServerShuttingDownError(reason))
        return len(self._streams)

    async def abort_all(self) -> None:
        """Abort every request still in flight and refuse new ones (the last step of a
        shutdown, after the HTTP server stopped)."""
        reason = self._shutdown_reason or "the server is shutting down"
        self._shutdown_reason = reason
        for request_id in list(self._streams):
            await self._abort(request_id)
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.put(ServerShuttingDownError(reason))

    # -- callbacks from the EngineClient (on the event loop) ----------------------------------

    def _on_outputs(self, outputs: EngineCoreOutputs) -> None:
        if outputs.scheduler_stats is not None:
            self.metrics.set_engine_stats(
                outputs.engine_index, outputs.timestamp, outputs.scheduler_stats
            )
        now = time.monotonic()
        num_generated = 0
        for output in outputs.outputs:
            num_generated += self._record(output, now)
        if num_generated:
            self.metrics.inc("generation_tokens_total", num_generated)
        request_outputs, to_abort = self.output_processor.process_outputs(outputs.outputs)
        for request_output in request_outputs:
            stream = self._streams.get(request_output.request_id)
            if stream is not None:
                stream.put(request_output)
        if to_abort:
            # Stop strings matched here: the engine still runs those sequences.
            for engine_id in to_abort:
                self._finish_timing(engine_id, "stop", now)
            task = asyncio.get_running_loop().create_task(self.client.abort_requests(to_abort))
            # The loop holds tasks weakly: keep it until it is done.
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _record(self, output: EngineCoreOutput, now: float) -> int:
        """Latency metrics of one output; returns how many generated tokens it carries (the
        caller adds them to `generation_tokens_total` once per message)."""
        timing = self._timings.get(output.request_id)
        if timing is None:
            return 0
        num_generated = len(output.new_token_ids)
        if num_generated:
            if not timing.has_output:
                timing.has_output = True
                self.metrics.observe(_TTFT, now - timing.arrival_s)
                self.metrics.inc("prompt_tokens_total", timing.num_prompt_tokens)
            else:
                self.metrics.observe(_ITL, now - timing.last_output_s)
            timing.last_output_s = now
        if output.finish_reason is not None:
            self._finish_timing(output.request_id, str(output.finish_reason), now)
        return num_generated

    def _finish_timing(self, engine_id: str, reason: str, now: float) -> None:
        timing = self._timings.pop(engine_id, None)
        if timing is not None:
            self.metrics.observe(_E2E, now - timing.arrival_s)
            self.metrics.inc(f"request_success_total:{reason}")

    def _on_dead(self, reason: str) -> None:
        error = EngineDeadError(f"{reason}; the server cannot complete requests")
        self.output_processor.abort_requests(list(self._streams))
        for _ in self._timings:
            self.metrics.inc("request_success_total:error")
        self._timings.clear()
        for stream in self._streams.values():
            stream.put(error)

    def _on_engine_down(self, engine: int, reason: str) -> None:
        """Restart mode: fail only the requests running on `engine` (the client has
        forgotten them); the others keep streaming. Its /metrics gauges show an idle, empty
        engine (what its replacement starts as) instead of the dead process's last figures."""
        num_blocks = self.client.engines[engine].num_blocks
        idle = SchedulerStats(num_blocks_total=num_blocks, num_blocks_free=num_blocks)
        self.metrics.set_engine_stats(engine, time.time(), idle)
        error = EngineDeadError(f"{reason}; retry the request")
        for request_id, (k, engine_ids) in list(self._placement.items()):
            if k != engine:
                continue
            self.output_processor.abort_requests([request_id])
            for engine_id in engine_ids:
                if self._timings.pop(engine_id, None) is not None:
                    self.metrics.inc("request_success_total:error")
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put(error)
