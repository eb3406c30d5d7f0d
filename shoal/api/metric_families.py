"""The metric families of /metrics: names (vLLM v1's where vLLM has one), kinds, help and buckets."""

from __future__ import annotations

from dataclasses import dataclass

from shoal.engine.stats import ITERATION_TOKENS_BUCKETS

FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(frozen=True)
class Metric:
    """One family. `name` has no prefix (counters end in `_total`); `is_vllm`: vLLM v1 has
    it under this name and labels; `by_reason`: a counter per `finished_reason`."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    buckets: tuple[float, ...] = ()
    is_vllm: bool = True
    by_reason: bool = False

    @property
    def num_slots(self) -> int:
        if self.kind == "histogram":
            return len(self.buckets) + 3  # +Inf, sum, count
        return len(FINISH_REASONS) if self.by_reason else 1


def _series(*bases: float, upto: float) -> tuple[float, ...]:
    """Bucket bounds `bases` times powers of ten, up to `upto` (1, 2, 5, 10, 20, 50, ...)."""
    bounds: list[float] = []
    scale = 1.0
    while True:
        for base in bases:
            if base * scale > upto:
                return tuple(bounds)
            bounds.append(base * scale)
        scale *= 10


_LATENCY_S: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5)
_LATENCY_S += (0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_S: tuple[float, ...] = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0)
_REQUEST_S += (10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)
_TOKENS = _series(1, 2, 5, upto=131072)

# Recorded by the API servers, per engine.
PROMPT_TOKENS = Metric("prompt_tokens_total", "counter", "Prompt tokens of requests served.")
GENERATION_TOKENS = Metric("generation_tokens_total", "counter", "Generated tokens.")
REQUEST_SUCCESS = Metric(
    "request_success_total",
    "counter",
    "Finished requests by finish reason (a request with n > 1 sequences counts once).",
    by_reason=True,
)
TTFT = Metric("time_to_first_token_seconds", "histogram", "Time to first token.", _LATENCY_S)
ITL = Metric(
    "inter_token_latency_seconds",
    "histogram",
    "Time between consecutive outputs of a sequence.",
    _LATENCY_S,
)
TPOT = Metric(
    "time_per_output_token_seconds",
    "histogram",
    "Mean time per output token after the first, per request.",
    _LATENCY_S,
)
E2E = Metric(
    "e2e_request_latency_seconds",
    "histogram",
    "Time from arrival to finish of a request.",
    _LATENCY_S + (160.0, 320.0),
)
QUEUE_TIME = Metric(
    "request_queue_time_seconds", "histogram", "Time a request waited in the engine.", _REQUEST_S
)
INFERENCE_TIME = Metric(
    "request_inference_time_seconds",
    "histogram",
    "Time from first scheduled to last token in the engine.",
    _REQUEST_S,
)
PREFILL_TIME = Metric(
    "request_prefill_time_seconds",
    "histogram",
    "Time from first scheduled to first token in the engine.",
    _REQUEST_S,
)
DECODE_TIME = Metric(
    "request_decode_time_seconds",
    "histogram",
    "Time from first to last token in the engine.",
    _REQUEST_S,
)
PROMPT_LEN = Metric("request_prompt_tokens", "histogram", "Prompt tokens per request.", _TOKENS)
GENERATION_LEN = Metric(
    "request_generation_tokens",
    "histogram",
    "Generated tokens per request (every sequence).",
    _TOKENS,
)
MAX_GENERATION_LEN = Metric(
    "request_max_num_generation_tokens",
    "histogram",
    "Generated tokens of a request's longest sequence.",
    _TOKENS,
)
PARAMS_N = Metric(
    "request_params_n", "histogram", "The n parameter of requests.", (1, 2, 5, 10, 20)
)
PARAMS_MAX_TOKENS = Metric(
    "request_params_max_tokens", "histogram", "The max_tokens of requests.", _TOKENS
)
REQUEST_METRICS = (
    PROMPT_TOKENS,
    GENERATION_TOKENS,
    REQUEST_SUCCESS,
    TTFT,
    ITL,
    TPOT,
    E2E,
    QUEUE_TIME,
    INFERENCE_TIME,
    PREFILL_TIME,
    DECODE_TIME,
    PROMPT_LEN,
    GENERATION_LEN,
    MAX_GENERATION_LEN,
    PARAMS_N,
    PARAMS_MAX_TOKENS,
)


def _engine_gauge(name: str, help_text: str, is_vllm: bool = False) -> Metric:
    return Metric(name, "gauge", help_text, is_vllm=is_vllm)


# Reported by the engines: (metric, SchedulerStats field), in slot order after the timestamp.
ENGINE_FIGURES: tuple[tuple[Metric, str], ...] = (
    (
        _engine_gauge("num_requests_running", "Requests running in the engine.", True),
        "num_running_reqs",
    ),
    (
        _engine_gauge("num_requests_waiting", "Requests waiting in the engine.", True),
        "num_waiting_reqs",
    ),
    (
        _engine_gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", True),
        "kv_cache_usage",
    ),
    (_engine_gauge("kv_cache_blocks_total", "KV-cache blocks of the engine."), "num_blocks_total"),
    (
        _engine_gauge("kv_cache_blocks_free", "Free KV-cache blocks of the engine."),
        "num_blocks_free",
    ),
    (
        _engine_gauge("iteration_context_requests", "Prefill requests in the engine's last step."),
        "num_ctx_requests",
    ),
    (
        _engine_gauge("iteration_context_tokens", "Prefill tokens in the engine's last step."),
        "num_ctx_tokens",
    ),
    (
        _engine_gauge(
            "iteration_generation_requests", "Generation requests in the engine's last step."
        ),
        "num_generation_requests",
    ),
    (
        _engine_gauge(
            "iteration_generation_tokens", "Generation tokens in the engine's last step."
        ),
        "num_generation_tokens",
    ),
    (
        _engine_gauge("preemptions_last_step", "Requests preempted in the engine's last step."),
        "num_preemptions",
    ),
    (
        Metric(
            "prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache."
        ),
        "prefix_cache_queries_total",
    ),
    (
        Metric("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache."),
        "prefix_cache_hits_total",
    ),
    (
        Metric("num_preemptions_total", "counter", "Requests preempted by the engine."),
        "num_preemptions_total",
    ),
)
ITERATION_TOKENS = Metric(
    "iteration_tokens_total",
    "histogram",
    "Tokens scheduled per engine step.",
    tuple(float(b) for b in ITERATION_TOKENS_BUCKETS),
)
