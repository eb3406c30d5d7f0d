"""The serving load generator behind `shoal bench serve`: streams OpenAI completions (or chat
completions) at a fixed concurrency or a Poisson request rate and measures each stream.

One run: wait for /health, find the model (GET /v1/models) and its tokenizer, build the random
dataset, send `num_warmups` warm-up requests (other prompts, at most 16 output tokens), then
the measured requests; `on_measure_start` / `on_measure_end` bracket the measured part, so a
caller can sample server processes over exactly that window. Every request streams with
`stream_options.include_usage`, so output tokens are the server's own count.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from shoal.bench.dataset import BenchRequest, random_requests
from shoal.bench.http import HTTPClient, HTTPClientError, wait_for_health
from shoal.bench.stats import RequestResult, summarize

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
WARMUP_MAX_TOKENS = 16


@dataclass(frozen=True)
class BenchConfig:
    """One `shoal bench serve` run (the CLI flags; see shoal/entrypoints/bench.py)."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first model of GET /v1/models
    tokenizer: str | None = None  # None: MODEL if it is a local path, else the default model
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    prompt_format: str = "text"
    max_concurrency: int | None = None
    request_rate: float = math.inf
    ignore_eos: bool = False
    temperature: float = 0.0
    seed: int = 0
    num_warmups: int | None = None  # None: one request per concurrency slot (1 without a cap)
    percentiles: tuple[float, ...] = (99.0,)
    ready_timeout_s: float = 60.0
    api_key: str | None = None

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint: expected one of {ENDPOINTS}, got {self.endpoint!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency: must be at least 1, got {self.max_concurrency}")
        if not self.request_rate > 0:
            raise ValueError(
                f"--request-rate: must be positive (inf = all at once), got {self.request_rate}"
            )
        if self.num_warmups is not None and self.num_warmups < 0:
            raise ValueError(f"--num-warmups: must be non-negative, got {self.num_warmups}")
        if self.endpoint == "/v1/chat/completions" and self.prompt_format != "text":
            raise ValueError("--prompt-format: the chat endpoint takes text prompts only")
        if any(not 0 < q < 100 for q in self.percentiles):
            raise ValueError(
                f"--metric-percentiles: each must be in (0, 100), got {self.percentiles}"
            )

    @property
    def warmups(self) -> int:
        if self.num_warmups is not None:
            return self.num_warmups
        return min(self.max_concurrency or 1, self.num_prompts)


@dataclass
class Hooks:
    """Callbacks around the measured requests (run on the event loop's thread)."""

    on_measure_start: Callable[[], None] | None = None
    on_measure_end: Callable[[], None] | None = None


# ----------------------------------------------------------------------------- one request


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None  # completions
    delta: _Delta | None = None  # chat


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: dict[str, Any] | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_encode = msgspec.json.Encoder().encode


class _Stream:
    """Collects one streamed response's events into a `RequestResult`."""

    def __init__(self, request: BenchRequest, start: float) -> None:
        self.result = RequestResult(prompt_len=request.prompt_len)
        self.start = start
        self.last = 0.0
        self.num_text_chunks = 0
        self.usage: _Usage | None = None
        self.done_at = 0.0  # arrival of data: [DONE]

    def on_event(self, payload: bytes, now: float) -> None:
        if payload == b"[DONE]":
            self.done_at = now
            return
        try:
            chunk = _decode_chunk(payload)
        except msgspec.DecodeError as e:
            self.result.error = self.result.error or f"undecodable event: {e}"
            return
        if chunk.error is not None:
            self.result.error = f"error event: {chunk.error.get('message', chunk.error)}"
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices:
            text = choice.text if choice.delta is None else choice.delta.content
            if text:
                if self.num_text_chunks == 0:
                    self.result.ttft_s = now - self.start
                else:
                    self.result.itl_s.append(now - self.last)
                self.last = now
                self.num_text_chunks += 1
                break

    def finish(self, end: float) -> RequestResult:
        result = self.result
        result.latency_s = end - self.start
        if self.usage is not None:
            result.prompt_tokens = self.usage.prompt_tokens
            result.output_tokens = self.usage.completion_tokens
            result.output_tokens_from_usage = True
        else:
            result.prompt_tokens = result.prompt_len
            result.output_tokens = self.num_text_chunks
        if not result.error and not self.done_at:
            result.error = "the stream ended without data: [DONE]"
        if not result.error and self.num_text_chunks == 0:
            result.error = "no text in the stream"
        result.ok = not result.error
        return result


def request_body(config: BenchConfig, model: str, request: BenchRequest, max_tokens: int) -> bytes:
    """The JSON body of one streamed request."""
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": config.temperature,
        "ignore_eos": config.ignore_eos,
    }
    if config.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": request.prompt}]
        body["max_completion_tokens"] = max_tokens
    else:
        body["prompt"] = request.prompt
        body["max_tokens"] = max_tokens
    return _encode(body)


async def send_request(
    client: HTTPClient,
    config: BenchConfig,
    headers: dict[str, str],
    body: bytes,
    request: BenchRequest,
) -> RequestResult:
    """Stream one request; failures are recorded in the result, never raised."""
    stream = _Stream(request, time.perf_counter())
    try:
        response = await client.request("POST", config.endpoint, body, headers, stream.on_event)
    except HTTPClientError as e:
        stream.result.error = str(e)
        return stream.finish(time.perf_counter())
    if response.status != 200:
        text = response.body[:300].decode("utf-8", "replace")
        stream.result.error = f"HTTP {response.status}: {text}"
    return stream.finish(stream.done_at or time.perf_counter())


# ----------------------------------------------------------------------------- a run


async def _run_requests(
    client: HTTPClient,
    config: BenchConfig,
    model: str,
    requests: list[BenchRequest],
    max_tokens: int | None,
    rng: random.Random,
) -> list[RequestResult]:
    headers = {"content-type": "application/json"}
    if config.api_key:
        headers["authorization"] = f"Bearer {config.api_key}"
    limit = asyncio.Semaphore(config.max_concurrency or len(requests))

    async def one(request: BenchRequest) -> RequestResult:
        n = request.output_len if max_tokens is None else min(max_tokens, request.output_len)
        body = request_body(config, model, request, n)
        async with limit:
            return await send_request(client, config, headers, body, request)

    tasks = []
    for i, request in enumerate(requests):
        if i and math.isfinite(config.request_rate):
            await asyncio.sleep(rng.expovariate(config.request_rate))  # Poisson arrivals
        tasks.append(asyncio.ensure_future(one(request)))
    return list(await asyncio.gather(*tasks))


async def discover_model(client: HTTPClient) -> str:
    """The id of the first model of GET /v1/models."""
    response = await client.get("/v1/models")
    if response.status != 200:
        raise RuntimeError(f"GET /v1/models answered {response.status}; pass --model")
    models = msgspec.json.decode(response.body).get("data") or []
    if not models:
        raise RuntimeError("GET /v1/models lists no model; pass --model")
    return str(models[0]["id"])


def load_tokenizer(config: BenchConfig, model: str) -> Any:
    """`--tokenizer`, else MODEL when it names local files, else the default model's."""
    from shoal.model_source import resolve_model
    from shoal.processing.tokenizer import Tokenizer

    source = config.tokenizer
    if source is None:
        try:
            resolve_model(model)
            source = model
        except FileNotFoundError:
            source = None
    return Tokenizer.from_model(source)


async def benchmark(config: BenchConfig, hooks: Hooks | None = None) -> dict[str, Any]:
    """Run the benchmark; returns `summarize`'s figures plus the run's settings and the
    client's own CPU use over the measured window (`client_cpu_s`, `client_cpu_per_token_us`,
    `client_cpu_util`: CPU seconds per wall second)."""
    hooks = hooks or Hooks()
    await wait_for_health(config.base_url, config.ready_timeout_s)
    client = HTTPClient(config.base_url)
    try:
        model = config.model or await discover_model(client)
        tokenizer = await asyncio.to_thread(load_tokenizer, config, model)
        all_requests = random_requests(
            tokenizer,
            config.num_prompts + config.warmups,
            config.input_len,
            config.output_len,
            seed=config.seed,
            range_ratio=config.range_ratio,
            prompt_format=config.prompt_format,
        )
        warmups, measured = all_requests[: config.warmups], all_requests[config.warmups :]
        rng = random.Random(config.seed)
        if warmups:
            await _run_requests(client, config, model, warmups, WARMUP_MAX_TOKENS, rng)
        if hooks.on_measure_start:
            hooks.on_measure_start()
        cpu0, start = time.thread_time(), time.perf_counter()
        results = await _run_requests(client, config, model, measured, None, rng)
        duration, cpu = time.perf_counter() - start, time.thread_time() - cpu0
        if hooks.on_measure_end:
            hooks.on_measure_end()
    finally:
        client.close()
    summary = summarize(results, duration, list(config.percentiles))
    tokens = summary["total_output_tokens"]
    summary.update(
        model=model,
        endpoint=config.endpoint,
        base_url=config.base_url,
        max_concurrency=config.max_concurrency,
        request_rate=config.request_rate if math.isfinite(config.request_rate) else "inf",
        num_prompts=config.num_prompts,
        num_warmups=config.warmups,
        random_input_len=config.input_len,
        random_output_len=config.output_len,
        prompt_format=config.prompt_format,
        ignore_eos=config.ignore_eos,
        client_cpu_s=cpu,
        client_cpu_util=cpu / duration if duration > 0 else math.nan,
        client_cpu_per_token_us=cpu / tokens * 1e6 if tokens else math.nan,
    )
    return summary


def run_benchmark(config: BenchConfig, hooks: Hooks | None = None) -> dict[str, Any]:
    """`benchmark` on a fresh uvloop event loop (asyncio's own without uvloop)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(benchmark(config, hooks))
    return uvloop.run(benchmark(config, hooks))
