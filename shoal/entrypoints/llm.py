"""`LLM`: offline batched generation driving one `EngineCore` in this process."""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tqdm import tqdm

from shoal.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig, ShoalConfig
from shoal.entrypoints.engine_args import config_default as _default
from shoal.logger import init_logger
from shoal.processing.output_processor import OutputProcessor
from shoal.processing.outputs import RequestOutput, RequestOutputKind
from shoal.processing.processor import InputProcessor, ProcessedRequest, PromptType
from shoal.processing.tokenizer import Tokenizer
from shoal.protocol import EngineCoreOutput, SchedulerStats
from shoal.sampling_params import SamplingParams

logger = init_logger(__name__)

_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
}


def build_config(**settings: Any) -> ShoalConfig:
    """A `ShoalConfig` from flat settings named like the config fields (`dtype`,
    `block_size`, `max_num_seqs`, ...). `ValueError` names an unknown setting or a bad value."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in settings.items():
        owner = next(
            (
                section
                for section, cls in _SECTIONS.items()
                if key in {f.name for f in dataclasses.fields(cls)}
            ),
            None,
        )
        if owner is None:
            raise ValueError(f"{key}: not a setting of LLM (see shoal.config for the settings)")
        sections[owner][key] = value
    return ShoalConfig(**{name: cls(**sections[name]) for name, cls in _SECTIONS.items()})


@dataclasses.dataclass
class EngineTotals:
    """Scheduler figures summed over every step of this `LLM` (tests and benchmarks)."""

    num_steps: int = 0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which were found cached
    num_ctx_tokens: int = 0  # prompt tokens computed (prefill chunks and recomputation)
    num_generation_tokens: int = 0  # decode tokens computed

    def add(self, stats: SchedulerStats) -> None:
        self.num_steps += 1
        self.num_preemptions += stats.num_preemptions
        self.prefix_cache_queries += stats.prefix_cache_queries
        self.prefix_cache_hits += stats.prefix_cache_hits
        self.num_ctx_tokens += stats.num_ctx_tokens
        self.num_generation_tokens += stats.num_generation_tokens


class InprocEngineClient:
    """The engine client of offline use: an `EngineCore` stepped in this process (the
    server's client talks to engine processes over ZMQ instead)."""

    def __init__(self, config: ShoalConfig) -> None:
        # Imported here: the torch-free front-end modules must not pull in the engine.
        from shoal.engine.core import EngineCore

        self.engine_core = EngineCore(config)
        self.totals = EngineTotals()

    @property
    def max_model_len(self) -> int:
        return self.engine_core.max_model_len

    def add_requests(self, request: ProcessedRequest) -> None:
        for engine_request in request.engine_requests:
            self.engine_core.add_request(engine_request)

    def abort_requests(self, engine_request_ids: list[str]) -> None:
        if engine_request_ids:
            self.engine_core.abort_requests(engine_request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        outputs = self.engine_core.step()
        if outputs.scheduler_stats is not None:
            self.totals.add(outputs.scheduler_stats)
        return outputs.outputs


class LLM:
    """Offline generation: load a model once, then `generate` or `chat` over batches.

    `model` is a Hugging Face directory or a .gguf file (None = the embedded default model);
    the other arguments are `shoal.config` settings, `**kwargs` any further ones by field
    name (`enable_chunked_prefill`, `served_model_name`, ...). `quantization="auto"` (the
    default, as `shoal serve`'s) runs a GGUF model of 4-bit linears in gguf mode (perplexity
    +0.44% vs float32 on the default model) and anything else unquantized;
    `quantization="none"` (or None) is the exact float32 path."""

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = _default(ModelConfig, "dtype"),
        tokenizer: str | None = None,
        load_format: str = _default(ModelConfig, "load_format"),
        max_model_len: int | None = None,
        max_num_seqs: int = _default(SchedulerConfig, "max_num_seqs"),
        max_num_batched_tokens: int | None = _default(SchedulerConfig, "max_num_batched_tokens"),
        block_size: int = _default(CacheConfig, "block_size"),
        num_blocks: int | None = None,
        kv_cache_memory_bytes: int = _default(CacheConfig, "kv_cache_memory_bytes"),
        enable_prefix_caching: bool = True,
        device: str = _default(ModelConfig, "device"),
        seed: int = _default(ModelConfig, "seed"),
        quantization: str | None = _default(ModelConfig, "quantization"),
        **kwargs: Any,
    ) -> None:
        # Offline there are no API-server processes to leave a CPU core for.
        kwargs.setdefault("api_server_count", 0)
        self.config = build_config(
            model=model,
            dtype=dtype,
            tokenizer=tokenizer,
            load_format=load_format,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            num_blocks=num_blocks,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enable_prefix_caching=enable_prefix_caching,
            device=device,
            seed=seed,
            quantization=quantization,
            **kwargs,
        )
        if self.config.parallel.data_parallel_size != 1:
            raise ValueError(
                "data_parallel_size: the offline LLM runs one engine; use "
                "`shoal serve --data-parallel-size` for more"
            )
        start = time.perf_counter()
        self.tokenizer = Tokenizer.from_model(tokenizer if tokenizer is not None else model)
        self.engine = InprocEngineClient(self.config)
        self.input_processor = InputProcessor(
            self.tokenizer,
            self.engine.max_model_len,
            self.engine.engine_core.model_runner.vocab_size,
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self._request_counter = itertools.count()
        logger.info(
            "LLM ready in %.1fs (max_model_len=%d)",
            time.perf_counter() - start,
            self.engine.max_model_len,
        )

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def stats(self) -> EngineTotals:
        """Scheduler figures summed over every step so far (preemptions, prefix-cache hits)."""
        return self.engine.totals

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one finished `RequestOutput` per prompt, in
        order. A prompt is a string, a list of token ids or {"prompt_token_ids": [...]};
        `sampling_params` is one for all or one per prompt. Every prompt is validated before
        any runs (`ValueError` naming the field)."""
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        requests = [
            self.input_processor.process(self._next_request_id(), p, sp)
            for p, sp in zip(prompt_list, params_list, strict=True)
        ]
        return self._run(requests, use_tqdm)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling: str = "mean",
        normalize: bool = True,
        use_tqdm: bool = True,
    ) -> list[list[float]]:
        """One embedding per prompt, in order: the prompt's final hidden states pooled
        (`pooling` "mean" or "last") and L2-normalized unless `normalize` is False; what
        `POST /v1/embeddings` returns."""
        params = SamplingParams(max_tokens=0, pooling=pooling, normalize=normalize)
        outputs = self.generate(prompts, params, use_tqdm=use_tqdm)
        return [output.embedding_values() for output in outputs]

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Generate a reply to one conversation (a list of {"role", "content"} messages) or to
        each of a list of conversations, through the model's chat template."""
        conversations = _as_conversations(messages)
        params_list = _as_params_list(sampling_params, len(conversations))
        requests = []
        for conversation, params in zip(conversations, params_list, strict=True):
            text = self.tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
            )
            requests.append(
                self.input_processor.process(
                    self._next_request_id(), text, params, add_special_tokens=False
                )
            )
        return self._run(requests, use_tqdm)

    def stream(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        *,
        add_special_tokens: bool = True,
    ) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding each step's new text and tokens (delta outputs);
        the last one has `finished=True`. Closing the iterator early aborts the request."""
        request = self.input_processor.process(
            self._next_request_id(), prompt, sampling_params, add_special_tokens=add_special_tokens
        )
        self.output_processor.add_request(request, RequestOutputKind.DELTA)
        try:
            self.engine.add_requests(request)
            while self.output_processor.has_unfinished_requests():
                yield from self._step()
        finally:
            self._abort_unfinished()

    # ----------------------------------------------------------------------------- loop

    def _next_request_id(self) -> str:
        return str(next(self._request_counter))

    def _run(self, requests: list[ProcessedRequest], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(
            total=len(requests),
            desc="Processed prompts",
            unit="req",
            file=sys.stderr,
            disable=not use_tqdm or len(requests) < 2,
            dynamic_ncols=True,
        )
        num_output_tokens, start = 0, time.perf_counter()
        try:
            for request in requests:
                self.output_processor.add_request(request, RequestOutputKind.FINAL_ONLY)
                self.engine.add_requests(request)
            while self.output_processor.has_unfinished_requests():
                for output in self._step():
                    finished[output.request_id] = output
                    num_output_tokens += sum(len(o.token_ids) for o in output.outputs)
                    bar.update(1)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(
                        f"output {num_output_tokens / elapsed:.0f} tok/s", refresh=False
                    )
        finally:
            bar.close()
            self._abort_unfinished()
        return [finished[r.request_id] for r in requests]

    def _step(self) -> list[RequestOutput]:
        """One engine step; returns the outputs it produced (finished ones only for
        FINAL_ONLY requests) and aborts what a stop string ended."""
        if not self.engine.has_unfinished_requests():
            raise RuntimeError(
                "the engine has no work left but requests are unfinished "
                f"({self.output_processor.get_num_unfinished_requests()})"
            )
        results, to_abort = self.output_processor.process_outputs(self.engine.step())
        self.engine.abort_requests(to_abort)
        return results

    def _abort_unfinished(self) -> None:
        """After an error or an abandoned stream: drop what is still in flight."""
        if self.output_processor.has_unfinished_requests():
            self.engine.abort_requests(self.output_processor.abort_all_requests())
            # Deliver the engine's abort outputs so its queues are empty again.
            while self.engine.has_unfinished_requests():
                self.engine.step()


def _is_token_ids(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and all(isinstance(t, int) for t in value)
    )


def _as_prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, Mapping)) or _is_token_ids(prompts):
        return [prompts]
    if isinstance(prompts, Sequence):
        return list(prompts)
    raise ValueError(
        f"prompts: must be a string, token ids, a mapping or a list of those, got "
        f"{type(prompts).__name__}"
    )


def _as_params_list(params: Any, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if isinstance(params, Sequence) and all(isinstance(p, SamplingParams) for p in params):
        if len(params) != count:
            raise ValueError(f"sampling_params: got {len(params)} for {count} prompts")
        return list(params)
    raise ValueError("sampling_params: must be a SamplingParams or a list of them")


def _as_conversations(messages: Any) -> list[Any]:
    if (
        isinstance(messages, Sequence)
        and not isinstance(messages, str)
        and messages
        and all(isinstance(m, Sequence) and not isinstance(m, str) for m in messages)
    ):
        return list(messages)
    return [messages]
