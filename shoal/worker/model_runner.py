"""`ModelRunner`: the model, its paged KV cache, persistent input buffers and sampling, and
the choice of each step's speed paths (the fused decode step, the greedy LM head)."""

from __future__ import annotations

import math
import os
import time

import torch

from shoal import native
from shoal.config import ParallelConfig, ShoalConfig
from shoal.core.scheduler_output import ModelRunnerOutput, NewRequestData, SchedulerOutput
from shoal.logger import init_logger
from shoal.model.arch import ArchConfig, arch_from_source
from shoal.model.attention import AttentionMetadata, build_attention_metadata
from shoal.model.fused_decode import FusedDecode
from shoal.model.greedy_head import GreedyHead
from shoal.model.loader import load_model, resolve_device, resolve_dtype
from shoal.model.mode import resolve_engine_mode
from shoal.model_source import resolve_model
from shoal.openmp_policy import FRONTEND_BUSY_TOKENS_PER_S
from shoal.worker import huge_pages
from shoal.worker.buffers import CpuGpuBuffer, copy_slice
from shoal.worker.input_batch import (
    RequestState,
    RequestTable,
    StepBatch,
    fill_token_inputs,
    order_batch,
)
from shoal.worker.penalties import build_controls
from shoal.worker.prompt_pass import PromptPass
from shoal.worker.sampler import SamplingBatch, TokenLogprobs, sample, skip_draws

logger = init_logger(__name__)


def kv_cache_torch_dtype(
    kv_cache_dtype: str, model_dtype: torch.dtype, quantization: str | None
) -> torch.dtype:
    """The KV cache's storage dtype for `--kv-cache-dtype`. "auto" is the model's dtype, as in
    vLLM, except for a float32 model with quantized weights: its keys and values come out of
    int8 or 4-bit projections whose error is far above float16's rounding, and decode
    attention, which reads the whole cache every step, runs 1.3-1.8x faster on half the bytes
    (docs/engine-runner.md, "KV cache dtype")."""
    if kv_cache_dtype == "float16":
        return torch.float16
    if kv_cache_dtype == "float32":
        return torch.float32
    if quantization is not None and model_dtype == torch.float32:
        return torch.float16
    return model_dtype


class ModelRunner:
    """Runs one `SchedulerOutput` per step: one forward over every scheduled token, then one
    sampled token per request whose step reaches its last known token.

    Public after construction: `max_model_len`, `vocab_size`, `arch`, `device`, `dtype`.
    Call `initialize_kv_cache(num_blocks)` once before the first `execute_model`.
    """

    def __init__(self, config: ShoalConfig) -> None:
        """Load the model on `config.model.device` ("auto" = cuda if available, else cpu).
        `ValueError` if `--max-model-len` exceeds the model's context length."""
        self.config = config
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        # (threads for small steps, threads for large ones); see `cpu_threads`.
        self._threads = (cpu_threads(config.parallel), cpu_threads(config.parallel, large=True))
        self._large_step_tokens = 0  # set once the model's size is known
        # Output tokens per second streamed lately (see FRONTEND_BUSY_TOKENS_PER_S); the API
        # servers stream every data-parallel engine's tokens, so each engine's share counts.
        self._token_rate = TokenRate()
        self._frontend_busy_tokens_per_s = (
            FRONTEND_BUSY_TOKENS_PER_S / config.parallel.data_parallel_size
        )
        if self.device.type == "cpu":
            torch.set_num_threads(self._threads[0])
            # Loaded now, before the engine reports ready (an import: nothing is compiled).
            if native.load() is not None:
                logger.info("native kernels: %s", native.loaded_variant())
        source = resolve_model(config.model.model)
        # --quantization auto made concrete for this model and CPU, logged once.
        self.config = config = resolve_engine_mode(config, source, self.device, self.dtype)
        self.arch: ArchConfig = arch_from_source(source)
        self.max_model_len = _max_model_len(config.model.max_model_len, self.arch)
        self.vocab_size = self.arch.vocab_size
        self.block_size = config.cache.block_size
        self.kv_dtype = kv_cache_torch_dtype(
            config.cache.kv_cache_dtype, self.dtype, config.model.quantization
        )
        self.model = load_model(
            config.model, source, self.arch, self.max_model_len, self.dtype, self.device
        )
        if huge_pages.enabled(self.device):
            moved = huge_pages.move_module(self.model)
            if moved:
                logger.info("weights: %.1f MiB in 2 MB pages", moved / 2**20)
        # Built once the weights have settled (they hold them): the fused decode step where
        # the ops table has one for this model (`_forward`), and the greedy LM head.
        self.fused_decode = FusedDecode.for_model(self.model)
        self.greedy_head = GreedyHead(self.model)
        # Prompt logprobs and embeddings (prompt-only requests), off the sampling path.
        self.prompt_pass = PromptPass(self.model.compute_logits)
        # Weights, whatever their storage (int8 linears keep theirs in buffers).
        num_params = sum(t.numel() for t in (*self.model.parameters(), *self.model.buffers()))
        self._large_step_tokens = max(1, LARGE_STEP_FLOP // (2 * max(num_params, 1)))
        self.kv_caches: list[torch.Tensor] = []
        max_blocks_per_req = -(-self.max_model_len // self.block_size)
        self.requests = RequestTable(config.scheduler.max_num_seqs, max_blocks_per_req)
        # The step token budget made concrete for this device (the engine's scheduler uses
        # this one too).
        self.scheduler_config = config.scheduler.resolved(self.device.type, self.max_model_len)
        assert self.scheduler_config.max_num_batched_tokens is not None
        self._allocate_buffers(
            self.scheduler_config.max_num_batched_tokens, config.scheduler.max_num_seqs
        )
        self.generator = torch.Generator(self.device).manual_seed(config.model.seed)

    # -- KV cache ------------------------------------------------------------------------------

    def kv_cache_bytes_per_block(self) -> int:
        """Bytes of one block across all layers (keys and values)."""
        a = self.arch
        per_token = 2 * a.num_layers * a.num_kv_heads * a.head_dim * self.kv_dtype.itemsize
        return per_token * self.block_size

    def num_blocks_for_memory(self, memory_bytes: int) -> int:
        """How many KV blocks `memory_bytes` holds (0 if not even one)."""
        return memory_bytes // self.kv_cache_bytes_per_block()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the cache: per layer a view [2, num_blocks, block_size, num_kv_heads,
        head_dim] of one zeroed tensor (zeros: never-written slots must not hold NaN, since
        masked keys still meet the values in attention's matmul), on CPU in 2 MB pages
        (`huge_pages`), faulted in now: left to first touch, the first requests paid for
        zeroing the pages (~4% of a busy engine's CPU in a served c=64 run, ~1.2 s per GiB in
        all), as vLLM's engine pays at start-up for its zeroed cache. Here 1 GiB took 0.1-3 s
        at start-up, most when the VM's host had not backed the memory yet."""
        a = self.arch
        shape = (a.num_layers, 2, num_blocks, self.block_size, a.num_kv_heads, a.head_dim)
        kv = None
        if huge_pages.enabled(self.device):
            kv = huge_pages.zeros_shaped(shape, self.kv_dtype, populate=True)
        if kv is None:
            kv = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        self.kv_cache = kv
        self.kv_caches = list(self.kv_cache.unbind(0))
        logger.info(
            "KV cache: %d blocks of %d tokens, %.1f MiB (%s)",
            num_blocks, self.block_size, self.kv_cache.nbytes / 2**20,
            str(self.kv_dtype).removeprefix("torch."),
        )  # fmt: skip

    # -- one step ------------------------------------------------------------------------------

    def _step_threads(self, scheduler_output: SchedulerOutput) -> int:
        """Torch threads for this step while serving: every core for a large step (at least
        `_large_step_tokens`) and for decode steps while the API servers are quiet; the
        smaller count when they are busy streaming, and for a small step with prompt tokens
        (a short chat prompt): it runs the layer-by-layer path, ~10 parallel regions per
        layer with Python between them, where the second thread falls asleep in each gap and
        waking it cost more than it computed (docs/engine-runner.md, "CPU threads")."""
        tokens = scheduler_output.total_num_scheduled_tokens
        if tokens >= self._large_step_tokens:
            return self._threads[1]
        if tokens > len(scheduler_output.num_scheduled_tokens):  # some request has 2+ tokens
            return self._threads[0]
        quiet = self._token_rate.value < self._frontend_busy_tokens_per_s
        return self._threads[1] if quiet else self._threads[0]

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Compute the scheduled tokens and sample where a request reaches its last token.

        Returns requests in batch order (decodes first); `sampled_token_ids[i]` is `[token]`
        or `[]` (a prefill chunk short of the prompt's end); `logprobs[i]` is `[entry]` when
        the request asked for logprobs and was sampled, else None."""
        if not self.kv_caches:
            raise RuntimeError("initialize_kv_cache() must run before execute_model()")
        self._update_states(scheduler_output)
        output = ModelRunnerOutput()
        if not scheduler_output.num_scheduled_tokens:
            return output
        if self.device.type == "cpu" and self._threads[0] != self._threads[1]:
            threads = self._step_threads(scheduler_output)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        batch = order_batch(self.requests, scheduler_output.num_scheduled_tokens)
        has_prompt_work = self.prompt_pass.is_active
        if has_prompt_work:
            self.prompt_pass.skip_sampling(batch)
        input_ids, positions, meta, logits_indices = self._prepare_inputs(batch)
        embeds = _prompt_embeds_rows(batch)
        if embeds:
            hidden = self._forward_embeds(input_ids, positions, meta, embeds)
        else:
            hidden = self._forward(input_ids, positions, meta)
        if has_prompt_work:
            self.prompt_pass.run(batch, hidden, output)
        sampled = [
            s for s, is_sampled in zip(batch.states, batch.is_sampled, strict=True) if is_sampled
        ]
        token_ids: list[int] = []
        entries: list[TokenLogprobs | None] = []
        greedy = None
        has_grammar = scheduler_output.grammar_bitmask is not None
        if sampled and not has_grammar and all(_plain_greedy(s) for s in sampled):
            # Greedy, no logprobs, nothing banned: the argmax straight from the hidden states.
            greedy = self.greedy_head.token_ids(hidden[logits_indices])
        if greedy is not None:
            token_ids, entries = greedy, [None] * len(greedy)
        elif sampled:
            logits = self.model.compute_logits(hidden[logits_indices])
            # .tolist() inside waits for the device, so the host buffers are free again.
            sampling = _sampling_batch(sampled)
            if has_grammar:
                sampling.grammar = _grammar_rows(sampled, scheduler_output)
            token_ids, entries = sample(logits, sampling, self.generator)
        elif self.device.type == "cuda":
            # Nothing read back: wait here so the next step may overwrite the pinned
            # buffers this step's non-blocking copies read from.
            torch.cuda.current_stream().synchronize()
        self._token_rate.add(len(token_ids))
        results = dict(
            zip((s.req_id for s in sampled), zip(token_ids, entries, strict=True), strict=True)
        )
        for state, n in zip(batch.states, batch.query_lens, strict=True):
            state.num_computed_tokens += int(n)
            output.req_ids.append(state.req_id)
            token, entry = results.get(state.req_id, (None, None))
            if token is None:
                output.sampled_token_ids.append([])
                output.logprobs.append(None)
                continue
            state.token_ids.append(token)
            output.sampled_token_ids.append([token])
            output.logprobs.append(None if entry is None else [entry])
        return output

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The step's hidden states: the fused decode step for a decode-only step where there
        is one (the same bits as the model's forward, without its per-op Python), else the
        model's forward."""
        fused = self.fused_decode
        if fused is not None and fused.applies(meta, input_ids.shape[0]):
            return fused.forward(input_ids, positions, meta, self.kv_caches)
        return self.model(input_ids, positions, meta, self.kv_caches)

    def _forward_embeds(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        embeds: list[tuple[int, torch.Tensor]],
    ) -> torch.Tensor:
        """The model's forward with the step's token embeddings, where a request computes
        positions of a prompt given as embeddings, replaced by those rows."""
        x = self.model.embed(input_ids)  # [num_tokens, hidden]
        for start, rows in embeds:
            x[start : start + rows.shape[0]] = rows.to(device=x.device, dtype=x.dtype)
        return self.model(input_ids, positions, meta, self.kv_caches, inputs_embeds=x)

    def _update_states(self, so: SchedulerOutput) -> None:
        # Drop first: a preempted request can come back in this very step as a new one.
        for req_id in so.finished_req_ids | so.preempted_req_ids:
            self.requests.remove(req_id)
            self.prompt_pass.remove(req_id)
        for new in so.scheduled_new_reqs:
            self.requests.remove(new.req_id)
            state = self.requests.add(new, self._generator_for(new))
            self.prompt_pass.add(state, has_outputs=bool(new.output_token_ids))
        self.requests.update_cached(so)

    def _generator_for(self, new: NewRequestData) -> torch.Generator | None:
        """A seeded request's own generator, advanced past the draws of the outputs it
        already has (a resumed request continues its random stream where it stopped)."""
        params = new.sampling_params
        if params.seed is None or params.is_greedy:
            return None
        generator = torch.Generator(self.device).manual_seed(params.seed)
        skip_draws(generator, len(new.output_token_ids), self.device)
        return generator

    def _prepare_inputs(
        self, batch: StepBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        num_tokens, num_reqs = batch.num_tokens, len(batch.states)
        self._ensure_capacity(num_tokens, num_reqs)
        fill_token_inputs(
            batch, self.requests, self.block_size,
            self.input_ids.np, self.positions.np, self.slot_mapping.np,
        )  # fmt: skip
        seq_lens = batch.seq_lens
        self.seq_lens.np[:num_reqs] = seq_lens
        num_cols = -(-int(seq_lens.max()) // self.block_size)
        rows = [s.row for s in batch.states]
        self.block_tables.np[:num_reqs, :num_cols] = self.requests.block_table[rows, :num_cols]
        logits_indices = batch.query_start_loc[1:][batch.is_sampled] - 1
        self.logits_indices.np[: len(logits_indices)] = logits_indices
        block_tables = self.block_tables.gpu[:num_reqs, :num_cols]
        block_tables.copy_(self.block_tables.cpu[:num_reqs, :num_cols], non_blocking=True)
        meta = build_attention_metadata(
            self.slot_mapping.copy_to_gpu(num_tokens),
            batch.query_lens,
            batch.num_context,
            block_tables,
            self.seq_lens.copy_to_gpu(num_reqs),
            self.block_size,
            self.arch.sliding_window,
        )
        return (
            copy_slice(self.input_ids.cpu, self.input_ids.gpu, num_tokens),
            copy_slice(self.positions.cpu, self.positions.gpu, num_tokens),
            meta,
            self.logits_indices.copy_to_gpu(len(logits_indices)),
        )

    def _allocate_buffers(self, max_num_tokens: int, max_num_reqs: int) -> None:
        """Persistent host/device inputs, reused every step (no per-step allocation)."""
        self.max_num_tokens, self.max_num_reqs = max_num_tokens, max_num_reqs
        self.input_ids = self._int64_buffer(max_num_tokens)
        self.positions = self._int64_buffer(max_num_tokens)
        self.slot_mapping = self._int64_buffer(max_num_tokens)
        self.seq_lens = self._int64_buffer(max_num_reqs)
        self.logits_indices = self._int64_buffer(max_num_reqs)
        self.block_tables = self._int64_buffer(max_num_reqs, self.requests.block_table.shape[1])

    def _int64_buffer(self, *size: int) -> CpuGpuBuffer:
        return CpuGpuBuffer(*size, dtype=torch.int64, device=self.device)

    def _ensure_capacity(self, num_tokens: int, num_reqs: int) -> None:
        if num_tokens > self.max_num_tokens or num_reqs > self.max_num_reqs:
            logger.warning(
                "step of %d tokens / %d requests: growing input buffers", num_tokens, num_reqs
            )
            self._allocate_buffers(
                max(num_tokens, self.max_num_tokens), max(num_reqs, self.max_num_reqs)
            )


def _prompt_embeds_rows(batch: StepBatch) -> list[tuple[int, torch.Tensor]]:
    """(flat start, rows) for each request of the step that computes prompt positions given
    as embeddings: the rows [ctx, min(ctx + n, num_prompt_tokens)) of its tensor."""
    found = []
    for state, start, ctx, n in zip(
        batch.states, batch.query_start_loc[:-1], batch.num_context, batch.query_lens, strict=True
    ):
        if state.prompt_embeds is None or ctx >= state.num_prompt_tokens:
            continue
        end = min(int(ctx + n), state.num_prompt_tokens)
        found.append((int(start), state.prompt_embeds[int(ctx) : end]))
    return found


def _plain_greedy(state: RequestState) -> bool:
    """Sampled by a bare argmax of the logits (sampler.py's contract, rule 3)."""
    p = state.params
    return (
        p.is_greedy
        and p.logprobs is None
        and not state.has_controls
        and not state.banned_token_ids()
    )


def _sampling_batch(states: list[RequestState]) -> SamplingBatch:
    params = [s.params for s in states]
    banned = [(row, tok) for row, s in enumerate(states) for tok in s.banned_token_ids()]
    return SamplingBatch(
        temperature=[p.temperature for p in params],
        top_k=[p.top_k for p in params],
        top_p=[p.top_p for p in params],
        min_p=[p.min_p for p in params],
        generators=[s.generator for s in states],
        num_logprobs=[p.logprobs for p in params],
        banned=banned,
        controls=build_controls(states, [s.has_controls for s in states]),
    )


def _grammar_rows(
    sampled: list[RequestState], so: SchedulerOutput
) -> tuple[list[int], torch.Tensor] | None:
    """The sampled rows under a grammar and their bitmask rows, in the same order."""
    where = {req_id: i for i, req_id in enumerate(so.grammar_req_ids)}
    pairs = [(row, where[s.req_id]) for row, s in enumerate(sampled) if s.req_id in where]
    if not pairs:
        return None
    return [row for row, _ in pairs], so.grammar_bitmask[[i for _, i in pairs]]


def _max_model_len(requested: int | None, arch: ArchConfig) -> int:
    if requested is None:
        return arch.max_position_embeddings
    if requested > arch.max_position_embeddings:
        raise ValueError(
            f"--max-model-len: {requested} exceeds the model's context length "
            f"({arch.max_position_embeddings})"
        )
    return requested


# A step of at least this many FLOPs (2 x parameters x scheduled tokens; ~48 tokens of the
# default 135M model, ~1,000 of the tiny test model) runs on every core even when one is
# left to the API servers: a big step gains 1.3-1.6x from the second thread while a small
# one loses, and the API server is briefly starved only during such steps.
LARGE_STEP_FLOP = 13 * 10**9


# The core left to the API servers is only worth keeping while they are busy: each streamed
# token costs an API server ~50-150 us of CPU (docs/performance.md), so below ~2,000 tokens/s
# (the default model at any concurrency on 2 cores) they need under a quarter of a core and the
# engine takes every core for every step; above it (the tiny test model) small steps leave one.
# FRONTEND_BUSY_TOKENS_PER_S lives with the OpenMP wait policy, which draws the same line
# (shoal/openmp_policy.py).


class TokenRate:
    """Tokens per second over roughly the last `time_constant_s` seconds: an exponentially
    weighted average that decays with wall time, so an idle spell counts as zero."""

    def __init__(self, time_constant_s: float = 1.0, clock=time.monotonic) -> None:
        self.value = 0.0
        self._tau = time_constant_s
        self._clock = clock
        self._last = clock()

    def add(self, tokens: int) -> None:
        now = self._clock()
        dt = max(now - self._last, 1e-6)
        self._last = now
        weight = 1.0 - math.exp(-dt / self._tau)
        self.value += weight * (tokens / dt - self.value)


def cpu_threads(parallel: ParallelConfig, large: bool = False) -> int:
    """Torch threads for one engine: the cores this process may use, less one left to the API
    servers when `parallel.api_server_count > 0`, shared among the data-parallel engines; at
    least one. An explicit OMP_NUM_THREADS wins. `ModelRunner` uses the smaller count only
    for small steps while the engine streams at least `FRONTEND_BUSY_TOKENS_PER_S`.

    Offline (`LLM` sets api_server_count=0) every core computes: the step is matmul-bound, so
    on 2 cores two threads cut the offline benchmark's time (see docs/engine-runner.md,
    Performance). Serving keeps a core free for small steps (on 2 shared cores one engine
    thread beat two once the API server was busy); `large=True` is the count for steps of at
    least `LARGE_STEP_FLOP`, which use the reserved core too."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    reserved = 1 if parallel.api_server_count > 0 and not large else 0
    usable = max(1, (cores or 1) - reserved)
    return max(1, usable // parallel.data_parallel_size)
