"""A deterministic stand-in for the model runner that checks the scheduler<->runner contract.

It keeps per-request state the way the real runner must (token ids, block table, computed
count), and simulates the KV cache: the value written to a token's slot is a hash of the
whole token prefix up to it, so a block reused through the prefix cache under the wrong
prefix, or a slot overwritten while still in use, is caught on the next read. The sampled
token is a function of the prefix only, so outputs do not depend on batching, chunking,
prefix-cache hits or preemption. `FakeModelRunner` adds the rest of the runner interface
(`shoal.core.runner_protocol.Runner`), so an `EngineCore` can run on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.config import CacheConfig, SchedulerConfig, ShoalConfig
from shoal.core.iteration import compute_iteration_details
from shoal.core.request import Request
from shoal.core.scheduler import Scheduler
from shoal.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from shoal.protocol import EngineCoreOutput
from shoal.sampling_params import SamplingParams

# (request id, token ids so far) -> next token
SampleFn = Callable[[str, list[int]], int]


def prefix_sample(vocab_size: int) -> SampleFn:
    def sample(_req_id: str, tokens: list[int]) -> int:
        h = 0
        for t in tokens[-8:]:
            h = (h * 1_000_003 + t + 1) % 2_147_483_647
        return h % vocab_size

    return sample


@dataclass
class _RunnerRequest:
    tokens: list[int]
    num_outputs: int
    block_ids: list[int]
    num_computed: int
    prefix: list[int] = field(default_factory=list)  # prefix[p] = hash(tokens[: p + 1])

    def extend_prefix(self) -> None:
        while len(self.prefix) < len(self.tokens):
            p = len(self.prefix)
            parent = self.prefix[-1] if self.prefix else 0
            self.prefix.append(hash((parent, self.tokens[p])))


class FakeRunner:
    """`execute_model(SchedulerOutput) -> ModelRunnerOutput`, asserting the contract."""

    def __init__(self, block_size: int, sample: SampleFn | None = None) -> None:
        self.block_size = block_size
        self.sample = sample or prefix_sample(50)
        self.reqs: dict[str, _RunnerRequest] = {}
        self.kv: dict[int, int] = {}  # slot -> prefix hash of the token written there
        self.num_steps = 0

    def _slot(self, st: _RunnerRequest, pos: int) -> int:
        return st.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
        for rid in so.finished_req_ids | so.preempted_req_ids:
            assert rid not in so.num_scheduled_tokens or any(
                n.req_id == rid for n in so.scheduled_new_reqs
            ), f"{rid} dropped but scheduled as cached"
            self.reqs.pop(rid, None)
        if not so.total_num_scheduled_tokens:
            # Only the engine core's warm-up sends a step with nothing scheduled: to drop
            # the state of the requests it names finished.
            assert not so.scheduled_new_reqs and not so.scheduled_cached_reqs.req_ids
            return ModelRunnerOutput()
        self.num_steps += 1
        self._add_new(so)
        self._update_cached(so)
        scheduled = [(rid, self.reqs[rid], n) for rid, n in so.num_scheduled_tokens.items()]
        # Write every request's new KV first, then read: a layer-wise runner's order.
        for _rid, st, n in scheduled:
            assert st.num_computed + n <= len(st.tokens), "scheduled beyond known tokens"
            assert len(st.block_ids) * self.block_size >= st.num_computed + n, "too few blocks"
            for pos in range(st.num_computed, st.num_computed + n):
                self.kv[self._slot(st, pos)] = st.prefix[pos]
        out = ModelRunnerOutput()
        for rid, st, n in scheduled:
            end = st.num_computed + n
            for pos in range(end):
                assert self.kv.get(self._slot(st, pos)) == st.prefix[pos], (
                    f"{rid}: KV of position {pos} is not this request's prefix"
                )
            st.num_computed = end
            out.req_ids.append(rid)
            out.logprobs.append(None)
            if end == len(st.tokens):
                token = self.sample(rid, st.tokens)
                st.tokens.append(token)
                st.num_outputs += 1
                st.extend_prefix()
                out.sampled_token_ids.append([token])
            else:
                out.sampled_token_ids.append([])
        return out

    def _add_new(self, so: SchedulerOutput) -> None:
        for new in so.scheduled_new_reqs:
            assert new.req_id not in self.reqs, f"{new.req_id} added twice"
            st = _RunnerRequest(
                tokens=list(new.prompt_token_ids) + list(new.output_token_ids),
                num_outputs=len(new.output_token_ids),
                block_ids=list(new.block_ids),
                num_computed=new.num_computed_tokens,
            )
            assert st.num_computed % self.block_size == 0, "hits cover whole blocks"
            st.extend_prefix()
            self.reqs[new.req_id] = st

    def _update_cached(self, so: SchedulerOutput) -> None:
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self.reqs[rid]
            assert cached.num_computed_tokens[i] == st.num_computed, rid
            assert cached.num_output_tokens[i] == st.num_outputs, rid
            st.block_ids.extend(cached.new_block_ids[i])


class FakeModelRunner(FakeRunner):
    """A `FakeRunner` with the whole runner interface `EngineCore` uses: a model of
    `vocab_size` token ids and `max_model_len` positions (default `config`'s, else 2048),
    sized for `config`'s scheduler and cache."""

    # What `num_blocks_for_memory` charges per KV block (a made-up figure).
    BYTES_PER_BLOCK = 1 << 16

    def __init__(
        self, config: ShoalConfig, vocab_size: int = 1000, max_model_len: int | None = None
    ) -> None:
        super().__init__(config.cache.block_size, prefix_sample(vocab_size))
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len or config.model.max_model_len or 2048
        self.scheduler_config = config.scheduler.resolved("cpu", self.max_model_len)
        self.num_blocks = 0  # set by initialize_kv_cache

    def num_blocks_for_memory(self, memory_bytes: int) -> int:
        return memory_bytes // self.BYTES_PER_BLOCK

    def initialize_kv_cache(self, num_blocks: int) -> None:
        assert self.num_blocks == 0, "initialize_kv_cache called twice"
        self.num_blocks = num_blocks

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        assert self.num_blocks > 0, "initialize_kv_cache() must run first"
        for new in so.scheduled_new_reqs:
            assert all(0 <= t < self.vocab_size for t in new.prompt_token_ids), new.req_id
            assert max(new.block_ids, default=0) < self.num_blocks, new.req_id
        for block_ids in so.scheduled_cached_reqs.new_block_ids:
            assert max(block_ids, default=0) < self.num_blocks
        return super().execute_model(so)


def make_scheduler(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 16,
    chunked: bool = True,
    prefix_caching: bool = True,
    max_model_len: int = 128,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            enable_chunked_prefill=chunked,
        ),
        CacheConfig(block_size=block_size, enable_prefix_caching=prefix_caching),
        num_blocks,
        max_model_len,
    )


def make_request(
    request_id: str,
    prompt: list[int],
    *,
    max_model_len: int = 128,
    eos_token_id: int | None = None,
    **params: object,
) -> Request:
    params.setdefault("max_tokens", 8)
    sampling_params = SamplingParams(**params)  # type: ignore[arg-type]
    return Request(request_id, prompt, sampling_params, eos_token_id, max_model_len)


def step(
    scheduler: Scheduler, runner: FakeRunner
) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    """One engine step with integrity checks before and after the update."""
    so = scheduler.schedule()
    assert so.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
    assert len(so.num_scheduled_tokens) <= scheduler.max_num_seqs
    assert all(n > 0 for n in so.num_scheduled_tokens.values())
    # The scheduler counts the step's context / generation split while it builds the step.
    details, stats = compute_iteration_details(so), scheduler.get_stats()
    assert (details.num_ctx_requests, details.num_ctx_tokens) == (
        stats.num_ctx_requests,
        stats.num_ctx_tokens,
    )
    assert (details.num_generation_requests, details.num_generation_tokens) == (
        stats.num_generation_requests,
        stats.num_generation_tokens,
    )
    scheduler.check_integrity()
    mro = runner.execute_model(so) if so.total_num_scheduled_tokens else ModelRunnerOutput()
    outputs = scheduler.update_from_output(so, mro)
    scheduler.check_integrity()
    return so, outputs


def run_all(
    scheduler: Scheduler, runner: FakeRunner, max_steps: int = 10_000
) -> dict[str, list[EngineCoreOutput]]:
    """Step until no request is unfinished; every output grouped by request id."""
    by_id: dict[str, list[EngineCoreOutput]] = {}
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return by_id
        _, outputs = step(scheduler, runner)
        for o in outputs:
            by_id.setdefault(o.request_id, []).append(o)
    raise AssertionError("requests did not finish")


def tokens_of(outputs: list[EngineCoreOutput]) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]
