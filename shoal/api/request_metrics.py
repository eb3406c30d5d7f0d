"""`RequestRecorder`: one API server's per-request metrics (latencies, lengths, finish reasons).

A request with n > 1 sequences is one request to every request-level metric, as vLLM's
dashboards expect: `request_success_total`, the e2e / queue / prefill / decode / inference
times and the length histograms count it once, when its last sequence finishes, under the
worst finish reason among its sequences (error > abort > length > stop); its engine phase
times are those of the sequence that finished last. Token-level metrics (generated tokens,
inter-token latency) count every sequence.
"""

from __future__ import annotations

from shoal.api.metric_families import (
    DECODE_TIME,
    E2E,
    GENERATION_LEN,
    GENERATION_TOKENS,
    INFERENCE_TIME,
    ITL,
    MAX_GENERATION_LEN,
    PARAMS_MAX_TOKENS,
    PARAMS_N,
    PREFILL_TIME,
    PROMPT_LEN,
    PROMPT_TOKENS,
    QUEUE_TIME,
    TPOT,
    TTFT,
)
from shoal.api.metrics import MetricsStore
from shoal.processing.processor import ProcessedRequest
from shoal.protocol import EngineCoreOutputs, RequestPhaseTimes

_SEVERITY = {"stop": 0, "length": 1, "abort": 2, "error": 3}


class _Request:
    """One API request while any of its sequences runs."""

    __slots__ = (
        "engine",
        "arrival_s",
        "num_prompt_tokens",
        "n",
        "max_tokens",
        "num_left",
        "has_first_token",
        "num_generated",
        "max_generated",
        "reason",
        "tpot_s",
        "phase_times",
    )

    def __init__(
        self, engine: int, arrival_s: float, num_prompt_tokens: int, n: int, max_tokens: int
    ) -> None:
        self.engine = engine
        self.arrival_s = arrival_s
        self.num_prompt_tokens = num_prompt_tokens
        self.n = n
        self.max_tokens = max_tokens
        self.num_left = n
        self.has_first_token = False
        self.num_generated = 0
        self.max_generated = 0
        self.reason = "stop"
        self.tpot_s: float | None = None
        self.phase_times: RequestPhaseTimes | None = None


class _Sequence:
    """One engine request (sequence) of a `_Request`."""

    __slots__ = ("parent", "first_output_s", "last_output_s", "num_generated")

    def __init__(self, parent: _Request) -> None:
        self.parent = parent
        self.first_output_s = 0.0
        self.last_output_s = 0.0
        self.num_generated = 0


class RequestRecorder:
    """Writes one API server's request metrics into its `MetricsStore`.

    `start` once a request is placed on an engine; `on_outputs` for every message from an
    engine; `finish` / `abort` / `fail` when sequences end outside the engine's outputs."""

    def __init__(self, metrics: MetricsStore) -> None:
        self.metrics = metrics
        self._sequences: dict[str, _Sequence] = {}

    def start(self, request: ProcessedRequest, engine: int, arrival_s: float) -> None:
        """Track `request`'s sequences, placed on `engine`, arrived at `arrival_s`."""
        parent = _Request(
            engine,
            arrival_s,
            len(request.prompt_token_ids),
            len(request.engine_requests),
            request.sampling_params.max_tokens or 0,
        )
        for engine_request in request.engine_requests:
            self._sequences[engine_request.request_id] = _Sequence(parent)

    def on_outputs(self, outputs: EngineCoreOutputs, now: float) -> None:
        """Latencies of one engine message's outputs; finished sequences are finished."""
        metrics = self.metrics
        engine = outputs.engine_index
        num_generated = 0
        for output in outputs.outputs:
            sequence = self._sequences.get(output.request_id)
            if sequence is None:
                continue
            num_new = len(output.new_token_ids)
            if num_new:
                num_generated += num_new
                parent = sequence.parent
                if not sequence.num_generated:
                    sequence.first_output_s = now
                    if not parent.has_first_token:
                        parent.has_first_token = True
                        metrics.observe(engine, TTFT, now - parent.arrival_s)
                        metrics.inc(engine, PROMPT_TOKENS, parent.num_prompt_tokens)
                else:
                    metrics.observe(engine, ITL, now - sequence.last_output_s)
                sequence.last_output_s = now
                sequence.num_generated += num_new
            if output.finish_reason is not None:
                if str(output.finish_reason) == "error":
                    metrics.note_error("request failed", f"engine {engine}: {output.request_id}")
                if output.phase_times is not None:
                    sequence.parent.phase_times = output.phase_times
                self.finish(output.request_id, str(output.finish_reason), now)
        if num_generated and 0 <= engine < metrics.num_engines:
            metrics.inc(engine, GENERATION_TOKENS, num_generated)

    def finish(self, engine_id: str, reason: str, now: float) -> None:
        """Sequence `engine_id` ended with `reason`; the request's metrics are written when
        it was the last of its request."""
        sequence = self._sequences.pop(engine_id, None)
        if sequence is None:
            return
        parent = sequence.parent
        parent.num_left -= 1
        if _SEVERITY.get(reason, 3) > _SEVERITY[parent.reason]:
            parent.reason = reason if reason in _SEVERITY else "error"
        parent.num_generated += sequence.num_generated
        parent.max_generated = max(parent.max_generated, sequence.num_generated)
        if sequence.num_generated > 1:
            gaps = sequence.num_generated - 1
            parent.tpot_s = (sequence.last_output_s - sequence.first_output_s) / gaps
        if parent.num_left == 0:
            self._finish_request(parent, now)

    def abort(self, engine_ids: list[str], now: float) -> None:
        """The sequences were aborted here (a disconnect, shutdown)."""
        for engine_id in engine_ids:
            self.finish(engine_id, "abort", now)

    def fail(self, engine_ids: list[str], now: float) -> None:
        """The sequences failed (their engine died)."""
        for engine_id in engine_ids:
            self.finish(engine_id, "error", now)

    def fail_all(self, now: float) -> None:
        """Every tracked sequence failed (the server cannot serve any more)."""
        self.fail(list(self._sequences), now)

    def _finish_request(self, parent: _Request, now: float) -> None:
        metrics, engine = self.metrics, parent.engine
        if not 0 <= engine < metrics.num_engines:
            return
        metrics.inc_finished(engine, parent.reason)
        metrics.observe(engine, E2E, now - parent.arrival_s)
        metrics.observe(engine, PROMPT_LEN, parent.num_prompt_tokens)
        metrics.observe(engine, GENERATION_LEN, parent.num_generated)
        metrics.observe(engine, MAX_GENERATION_LEN, parent.max_generated)
        metrics.observe(engine, PARAMS_N, parent.n)
        if parent.max_tokens:
            metrics.observe(engine, PARAMS_MAX_TOKENS, parent.max_tokens)
        if parent.tpot_s is not None:
            metrics.observe(engine, TPOT, parent.tpot_s)
        times = parent.phase_times
        if times is not None:
            metrics.observe(engine, QUEUE_TIME, times.queue_s)
            metrics.observe(engine, PREFILL_TIME, times.prefill_s)
            metrics.observe(engine, DECODE_TIME, times.decode_s)
            metrics.observe(engine, INFERENCE_TIME, times.prefill_s + times.decode_s)
