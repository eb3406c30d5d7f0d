"""The scheduler: which requests compute how many tokens each step, and what they produced.

vLLM v1's model: every request's `num_computed_tokens` catches up with its `num_tokens`
(prompt + outputs). Prefill, a prefill chunk, a prefix-cache hit and a decode step are all
"give this request k new tokens" under a per-step token budget and a cap on running
sequences. Running requests go first (oldest first), then waiting ones (FCFS). Out of KV
blocks, the newest running request is preempted: its blocks are freed and it is requeued at
the front, keeping its output tokens, to be recomputed later. See docs/engine.md.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Protocol

from shoal.config import CacheConfig, SchedulerConfig
from shoal.core.iteration import IterationDetails
from shoal.core.kv_cache import KVCacheManager, cdiv
from shoal.core.prompt_only import add_prompt_logprobs, prompt_only_output, wire_logprobs
from shoal.core.request import FINISH_REASONS, Request, RequestStatus, check_stop
from shoal.core.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from shoal.logger import init_logger
from shoal.protocol import EngineCoreOutput, SchedulerStats, TokenLogprobs

logger = init_logger(__name__)

_RawLogprobs = list[tuple[int, float, int, list[int], list[float]]] | None


class _StepBatch:
    """The step being built: remaining token budget and what was scheduled so far."""

    __slots__ = (
        "budget",
        "new_reqs",
        "cached",
        "num_scheduled",
        "scheduled",
        "preempted",
        "ctx_reqs",
        "ctx_tokens",
    )

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.new_reqs: list[NewRequestData] = []
        self.cached = CachedRequestData()
        self.num_scheduled: dict[str, int] = {}
        self.scheduled: list[tuple[Request, int]] = []
        self.preempted: set[str] = set()
        # Context (prefill) requests and tokens so far, as compute_iteration_details counts
        # them: new requests and cached ones without output tokens; the rest is generation.
        self.ctx_reqs = 0
        self.ctx_tokens = 0

    def add_new(self, request: Request, block_ids: list[int], num_tokens: int) -> None:
        self.new_reqs.append(
            NewRequestData(
                req_id=request.request_id,
                prompt_token_ids=list(request.prompt_token_ids),
                output_token_ids=list(request.output_token_ids),
                sampling_params=request.sampling_params,
                block_ids=list(block_ids),
                num_computed_tokens=request.num_computed_tokens,
                eos_token_id=request.eos_token_id,
                prompt_embeds=request.prompt_embeds,
            )
        )
        self.ctx_reqs += 1
        self.ctx_tokens += num_tokens
        self._add(request, num_tokens)

    def add_cached(self, request: Request, new_block_ids: list[int], num_tokens: int) -> None:
        cached = self.cached
        request_id = request.request_id
        num_output_tokens = len(request.output_token_ids)
        cached.req_ids.append(request_id)
        cached.new_block_ids.append(new_block_ids)
        cached.num_computed_tokens.append(request.num_computed_tokens)
        cached.num_output_tokens.append(num_output_tokens)
        if num_output_tokens == 0:
            self.ctx_reqs += 1
            self.ctx_tokens += num_tokens
        self.num_scheduled[request_id] = num_tokens
        self.scheduled.append((request, num_tokens))
        self.budget -= num_tokens

    def _add(self, request: Request, num_tokens: int) -> None:
        self.num_scheduled[request.request_id] = num_tokens
        self.scheduled.append((request, num_tokens))
        self.budget -= num_tokens


class RequestGate(Protocol):
    """Whether a waiting request may start; asked only while `has_pending` is true."""

    @property
    def has_pending(self) -> bool: ...

    def is_ready(self, request: Request) -> bool: ...


class Scheduler:
    """Owns the waiting queue, the running list and the KV cache manager of one engine."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
    ) -> None:
        """`ValueError` when a request of `max_model_len` tokens could never be scheduled."""
        if num_blocks * cache_config.block_size < max_model_len:
            raise ValueError(
                f"num_blocks: {num_blocks} blocks of {cache_config.block_size} tokens cannot "
                f"hold one request of max_model_len={max_model_len} tokens"
            )
        budget = scheduler_config.token_budget("cpu", max_model_len)  # (None: the CPU's)
        if not scheduler_config.enable_chunked_prefill and budget < max_model_len:
            raise ValueError(
                "--max-num-batched-tokens: must be at least max_model_len "
                f"({max_model_len}) when chunked prefill is disabled"
            )
        self.max_num_batched_tokens = budget
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.enable_chunked_prefill = scheduler_config.enable_chunked_prefill
        self.max_model_len = max_model_len
        self.block_size = cache_config.block_size
        self.kv = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        # In admission order: the last one is the newest, preempted first.
        self.running: list[Request] = []
        # Ids the runner must drop, delivered with the next step that schedules tokens.
        self._finished_ids: set[str] = set()
        self._preempted_ids: set[str] = set()
        # Figures of the last step, for get_stats().
        self._num_step_preemptions = 0
        self._step_prefix_stats = (0, 0)
        self._last_details = IterationDetails(0, 0, 0, 0)
        # Holds back waiting requests that cannot start yet (the engine's structured-output
        # manager while a grammar compiles); None = every request can.
        self.gate: RequestGate | None = None

    # -- requests in and out ----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request. `ValueError` for a duplicate id or a prompt longer than
        max_model_len (the front end rejects those first)."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in the engine")
        if request.num_tokens > self.max_model_len:
            raise ValueError(
                f"prompt_token_ids: the prompt has {request.num_tokens} tokens, more than "
                f"max_model_len ({self.max_model_len})"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish requests wherever they are (waiting, running, mid-prefill, preempted),
        freeing their blocks. Unknown or already finished ids are ignored. Returns the
        requests finished by this call."""
        assert status.is_finished
        # dict.fromkeys: drop repeats, keep the caller's order (frees stay deterministic).
        ids = dict.fromkeys(request_ids)
        finished = [r for rid in ids if (r := self.requests.get(rid)) is not None]
        if not finished:
            return []
        running_gone = any(r.status == RequestStatus.RUNNING for r in finished)
        waiting_gone = any(r.status != RequestStatus.RUNNING for r in finished)
        for request in finished:
            was_running = request.status == RequestStatus.RUNNING
            request.set_status(status)
            self._release(request, was_running)
        # One rebuild per queue instead of an O(n) remove per request.
        if running_gone:
            self.running = [r for r in self.running if not r.is_finished]
        if waiting_gone:
            self.waiting = deque(r for r in self.waiting if not r.is_finished)
        return finished

    def _release(self, request: Request, runner_holds_it: bool) -> None:
        self.kv.free(request)
        del self.requests[request.request_id]
        if runner_holds_it:
            self._finished_ids.add(request.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- schedule -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work: running requests first, then (if nothing was preempted)
        waiting ones. Advances each scheduled request's `num_computed_tokens`."""
        self._num_step_preemptions = 0
        self.kv.begin_step()
        batch = _StepBatch(self.max_num_batched_tokens)
        self._schedule_running(batch)
        if not batch.preempted:
            held = self._hold_unready()
            self._schedule_waiting(batch)
            if held:
                self.waiting.extendleft(reversed(held))
        return self._finish_step(batch)

    def _hold_unready(self) -> list[Request]:
        """Waiting requests the gate holds back this step (their grammar still compiles),
        taken out of the queue so that the requests behind them are scheduled."""
        gate = self.gate
        if gate is None or not gate.has_pending:
            return []
        held = [r for r in self.waiting if not gate.is_ready(r)]
        if held:
            held_ids = {r.request_id for r in held}
            self.waiting = deque(r for r in self.waiting if r.request_id not in held_ids)
        return held

    def _schedule_running(self, batch: _StepBatch) -> None:
        i = 0
        running = self.running
        tables = self.kv.block_tables
        block_size = self.block_size
        while i < len(running) and batch.budget > 0:
            request = running[i]
            num_new = min(len(request.all_token_ids) - request.num_computed_tokens, batch.budget)
            if num_new <= 0:
                i += 1  # nothing to compute (the runner sampled nothing last step)
                continue
            table = tables.get(request.request_id)
            if (
                table is not None
                and request.num_computed_tokens + num_new <= len(table) * block_size
            ):
                # The common decode step: the last block has room (allocate_slots would
                # return [] without touching anything).
                batch.add_cached(request, [], num_new)
            else:
                new_blocks = self._allocate_or_preempt(request, num_new, batch)
                if new_blocks is None:
                    return  # the request preempted itself: nothing younger is left
                batch.add_cached(request, new_blocks, num_new)
            i += 1

    def _allocate_or_preempt(
        self, request: Request, num_new: int, batch: _StepBatch
    ) -> list[int] | None:
        """Allocate, preempting the newest running requests until it fits; None when the
        request itself had to go. Requests already in the batch are older: never victims."""
        while True:
            new_blocks = self.kv.allocate_slots(request, num_new)
            if new_blocks is not None:
                return new_blocks
            victim = self.running.pop()
            self._preempt(victim)
            batch.preempted.add(victim.request_id)
            if victim is request:
                return None

    def _preempt(self, request: Request) -> None:
        if request.prompt_logprobs and not request.has_sent_output:
            request.prompt_logprobs.clear()  # the runner computes them again from the start
        self.kv.free(request)
        request.set_status(RequestStatus.PREEMPTED)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._num_step_preemptions += 1
        self.waiting.appendleft(request)
        logger.debug("preempted %s", request)

    def _schedule_waiting(self, batch: _StepBatch) -> None:
        while self.waiting and batch.budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            hit_blocks, num_hit_tokens = self.kv.get_computed_blocks(request)
            if request.needs_whole_prompt and not request.output_token_ids:
                hit_blocks, num_hit_tokens = [], 0  # every prompt position must run
            elif self.kv.has_pending_prefix(request, num_hit_tokens):
                return  # its next blocks are being computed now: hit them next step
            num_new = request.num_tokens - num_hit_tokens
            if num_new > batch.budget:
                if not self.enable_chunked_prefill:
                    return  # FCFS: it must fit whole; nothing overtakes it
                num_new = batch.budget
            if self.kv.allocate_slots(request, num_new, hit_blocks) is None:
                return
            self.waiting.popleft()
            self.kv.record_prefix_lookup(request.num_tokens, num_hit_tokens)
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            request.set_status(RequestStatus.RUNNING)
            self.running.append(request)
            batch.add_new(request, self.kv.get_block_ids(request.request_id), num_new)

    def _finish_step(self, batch: _StepBatch) -> SchedulerOutput:
        output = SchedulerOutput(
            scheduled_new_reqs=batch.new_reqs,
            scheduled_cached_reqs=batch.cached,
            num_scheduled_tokens=batch.num_scheduled,
            total_num_scheduled_tokens=self.max_num_batched_tokens - batch.budget,
        )
        self._preempted_ids |= batch.preempted
        if output.total_num_scheduled_tokens > 0:
            output.finished_req_ids, self._finished_ids = self._finished_ids, set()
            output.preempted_req_ids, self._preempted_ids = self._preempted_ids, set()
        for request, num_tokens in batch.scheduled:
            request.num_computed_tokens += num_tokens
        # compute_iteration_details(output), counted while the batch was built.
        total = output.total_num_scheduled_tokens
        self._last_details = IterationDetails(
            batch.ctx_reqs,
            batch.ctx_tokens,
            len(batch.num_scheduled) - batch.ctx_reqs,
            total - batch.ctx_tokens,
        )
        self._step_prefix_stats = self.kv.take_prefix_cache_stats()
        return output

    # -- update -------------------------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Register newly computed full blocks, append sampled tokens, apply stop conditions
        and free finished requests. Returns one output per request that got tokens."""
        index = {rid: i for i, rid in enumerate(runner_output.req_ids)}
        sampled = runner_output.sampled_token_ids
        all_logprobs = runner_output.logprobs
        num_logprobs = len(all_logprobs)
        requests = self.requests
        kv = self.kv
        caching = kv.enable_caching
        block_size = self.block_size
        num_cached_blocks = kv.num_cached_blocks_of
        outputs = []
        any_finished = False
        if runner_output.prompt_logprobs:
            add_prompt_logprobs(requests, runner_output.prompt_logprobs)
        for req_id in scheduler_output.num_scheduled_tokens:
            request = requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            if caching and request.num_computed_tokens // block_size > num_cached_blocks(req_id):
                kv.cache_full_blocks(request)  # only when a block filled
            i = index.get(req_id)
            if i is None or not sampled[i]:
                # A prefill chunk short of the last token: nothing sampled. A prompt-only
                # request (max_tokens 0) ends with its last prompt token.
                if request.max_tokens == 0 and request.num_computed_tokens >= request.num_tokens:
                    request.set_status(RequestStatus.FINISHED_LENGTH_CAPPED)
                    self._release(request, runner_holds_it=True)
                    outputs.append(prompt_only_output(request, runner_output.pooled))
                    any_finished = True
                continue
            logprobs = all_logprobs[i] if i < num_logprobs else None
            output = self._append_tokens(request, sampled[i], logprobs)
            outputs.append(output)
            any_finished |= output.finish_reason is not None
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return outputs

    def _append_tokens(
        self, request: Request, token_ids: list[int], logprobs: _RawLogprobs
    ) -> EngineCoreOutput:
        new_token_ids = []
        for token_id in token_ids:
            request.output_token_ids.append(token_id)
            request.all_token_ids.append(token_id)
            new_token_ids.append(token_id)
            if check_stop(request, self.max_model_len):
                self._release(request, runner_holds_it=True)
                break
        output = EngineCoreOutput(
            request.request_id,
            new_token_ids,
            _to_wire_logprobs(logprobs, len(new_token_ids)) if logprobs is not None else None,
            FINISH_REASONS.get(request.status),
            request.stop_reason,
        )
        if not request.has_sent_output:
            request.has_sent_output = True
            output.num_cached_tokens = max(request.num_cached_tokens, 0)
            if request.prompt_logprobs is not None:
                output.prompt_logprobs = wire_logprobs(request.prompt_logprobs)
        return output

    # -- introspection ------------------------------------------------------------------------

    def get_stats(self) -> SchedulerStats:
        """Queue lengths and KV usage now; prefix-cache and preemption counts of the last
        step; the last step's iteration details."""
        queries, hits = self._step_prefix_stats
        details = self._last_details
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv.usage(),
            num_blocks_total=self.kv.num_blocks,
            num_blocks_free=self.kv.num_free_blocks,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
            num_preemptions=self._num_step_preemptions,
            num_ctx_requests=details.num_ctx_requests,
            num_ctx_tokens=details.num_ctx_tokens,
            num_generation_requests=details.num_generation_requests,
            num_generation_tokens=details.num_generation_tokens,
        )

    def check_integrity(self) -> None:
        """Assert the scheduler's and the KV cache's invariants (tests call it every step)."""
        self.kv.check_integrity(self.requests)
        assert len(self.running) + len(self.waiting) == len(self.requests)
        assert len(self.running) <= self.max_num_seqs
        for request in self.running:
            assert request.status == RequestStatus.RUNNING, request
            assert self.requests[request.request_id] is request
            held = len(self.kv.get_block_ids(request.request_id))
            assert held >= cdiv(request.num_computed_tokens, self.block_size), request
            assert request.num_computed_tokens <= request.num_tokens <= self.max_model_len
        for request in self.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), request
            assert self.requests[request.request_id] is request
            assert request.request_id not in self.kv.block_tables, f"{request} holds blocks"
            assert request.num_computed_tokens == 0


def _to_wire_logprobs(raw: _RawLogprobs, num_tokens: int) -> list[TokenLogprobs] | None:
    if raw is None:
        return None
    return [
        TokenLogprobs(token_id, logprob, rank, list(top_ids), list(top_logprobs))
        for token_id, logprob, rank, top_ids, top_logprobs in raw[:num_tokens]
    ]
