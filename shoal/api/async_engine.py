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
from typing import Any

import msgspec

from shoal.api.metrics import MetricsStore
from shoal.api.request_metrics import RequestRecorder
from shoal.engine.client import EngineClient, EngineDeadError, ServerShuttingDownError
from shoal.logger import init_logger
from shoal.processing.output_processor import OutputProcessor
from shoal.processing.outputs import RequestOutput, RequestOutputKind
from shoal.processing.processor import InputProcessor, ProcessedRequest, PromptType
from shoal.processing.tokenizer import Tokenizer
from shoal.protocol import EngineCoreOutputs, SchedulerStats
from shoal.runtime.tensor_queue import release as release_segment
from shoal.sampling_params import SamplingParams

logger = init_logger(__name__)


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
        # Request metrics (latencies, lengths, finish reasons) while requests run.
        self.recorder = RequestRecorder(metrics)
        # request id -> (engine, its engine request ids), while it runs.
        self._placement: dict[str, tuple[int, list[str]]] = {}
        self._background: set[asyncio.Task[None]] = set()
        # Set once the drain deadline passed (`end_in_flight`): why no request is served now.
        self._shutdown_reason: str | None = None
        # The run's `TensorQueue` (--enable-prompt-embeds), else None: prompt_embeds refused.
        self.tensor_queue: Any | None = None
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

    def process_embeds(
        self, request_id: str, prompt_embeds: Any, params: SamplingParams
    ) -> ProcessedRequest:
        """As `process`, for a prompt given as input embeddings (a [tokens, hidden] tensor,
        already checked by shoal.api.prompt_embeds): placeholder token ids count its
        positions; `generate` sends the tensor on the tensor queue."""
        placeholders = [0] * int(prompt_embeds.shape[0])
        processed = self.process(request_id, placeholders, params)
        processed.engine_requests = [
            msgspec.structs.replace(r, has_prompt_embeds=True) for r in processed.engine_requests
        ]
        processed.prompt_embeds = prompt_embeds
        return processed

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
        self.metrics.inc_received()
        finished = False
        try:
            engine = self.client.pick_engine()
            self.recorder.start(request, engine, now)
            engine_ids = [r.request_id for r in request.engine_requests]
            self._placement[request_id] = (engine, engine_ids)
            segments = self._put_tensors(engine, request)
            try:
                await self.client.add_requests(engine, request.engine_requests)
            except BaseException:
                for segment in segments:  # never sent: the engine will not read them
                    release_segment(segment)
                raise
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

    def _put_tensors(self, engine: int, request: ProcessedRequest) -> list[str]:
        """Queue the request's prompt embeddings for `engine`, one copy per engine request
        (ahead of the requests themselves). Returns the shared-memory segments."""
        if request.prompt_embeds is None:
            return []
        if self.tensor_queue is None:
            raise ValueError(
                "prompt_embeds: not enabled (start the server with --enable-prompt-embeds)"
            )
        segments: list[str] = []
        try:
            for r in request.engine_requests:
                segments.append(self.tensor_queue.put(engine, r.request_id, request.prompt_embeds))
        except BaseException:
            for segment in segments:
                release_segment(segment)
            raise
        return segments

    async def _abort(self, request_id: str) -> None:
        engine_ids = self.output_processor.abort_requests([request_id])
        self.recorder.abort(engine_ids, time.monotonic())
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
        self.recorder.on_outputs(outputs, now)
        request_outputs, to_abort = self.output_processor.process_outputs(outputs.outputs)
        for request_output in request_outputs:
            stream = self._streams.get(request_output.request_id)
            if stream is not None:
                stream.put(request_output)
        if to_abort:
            # Stop strings matched here: the engine still runs those sequences.
            for engine_id in to_abort:
                self.recorder.finish(engine_id, "stop", now)
            task = asyncio.get_running_loop().create_task(self.client.abort_requests(to_abort))
            # The loop holds tasks weakly: keep it until it is done.
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _on_dead(self, reason: str) -> None:
        error = EngineDeadError(f"{reason}; the server cannot complete requests")
        self.output_processor.abort_requests(list(self._streams))
        self.recorder.fail_all(time.monotonic())
        self.metrics.note_error("engine dead", reason)
        for stream in self._streams.values():
            stream.put(error)

    def _on_engine_down(self, engine: int, reason: str) -> None:
        """Restart mode: fail only the requests running on `engine` (the client has
        forgotten them); the others keep streaming. Its /metrics gauges show an idle, empty
        engine (what its replacement starts as) instead of the dead process's last figures."""
        num_blocks = self.client.engines[engine].num_blocks
        idle = SchedulerStats(num_blocks_total=num_blocks, num_blocks_free=num_blocks)
        self.metrics.set_engine_stats(engine, time.time(), idle)
        self.metrics.note_error(f"engine {engine} down", reason)
        error = EngineDeadError(f"{reason}; retry the request")
        for request_id, (k, engine_ids) in list(self._placement.items()):
            if k != engine:
                continue
            self.output_processor.abort_requests([request_id])
            self.recorder.fail(engine_ids, time.monotonic())
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put(error)
