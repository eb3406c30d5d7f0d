"""`EngineStatsTracker` through `EngineCore` on a fake runner: the totals each step's
`SchedulerStats` carries (prefix cache, preemptions, tokens per step) and the phase times of a
finished request. No model, no torch."""

from __future__ import annotations

import time

from core_fakes import FakeModelRunner

from shoal.config import CacheConfig, ModelConfig, SchedulerConfig, ShoalConfig
from shoal.engine.core import EngineCore
from shoal.engine.stats import ITERATION_TOKENS_BUCKETS
from shoal.protocol import EngineCoreOutput, EngineCoreRequest, SchedulerStats
from shoal.sampling_params import SamplingParams

BLOCK_SIZE = 4


def _core(num_blocks: int = 64, budget: int = 64) -> EngineCore:
    cfg = ShoalConfig(
        model=ModelConfig(max_model_len=128),
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=16),
    )
    return EngineCore(cfg, runner=FakeModelRunner(cfg))


def _request(request_id: str, prompt: list[int], max_tokens: int = 6) -> EngineCoreRequest:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return EngineCoreRequest(request_id, prompt, params, None, time.time())


def _run(core: EngineCore) -> tuple[list[EngineCoreOutput], list[SchedulerStats], int]:
    """Step until idle: (every output, every step's stats, tokens scheduled in all)."""
    outputs: list[EngineCoreOutput] = []
    stats: list[SchedulerStats] = []
    for _ in range(1000):
        if not core.has_unfinished_requests():
            break
        step = core.step()
        outputs += step.outputs
        assert step.scheduler_stats is not None
        stats.append(step.scheduler_stats)
    return outputs, stats, sum(s.num_ctx_tokens + s.num_generation_tokens for s in stats)


def test_totals_accumulate_over_steps_and_match_the_per_step_figures() -> None:
    core = _core()
    prompt = list(range(1, 13))  # three full blocks
    core.add_request(_request("a", prompt))
    _run(core)
    core.add_request(_request("b", prompt))  # the same prompt: its full blocks are cached
    _, stats, num_tokens = _run(core)
    last = stats[-1]
    assert last.prefix_cache_queries_total == 2 * len(prompt)
    # At least the first two full blocks hit (the last prompt token is always recomputed).
    assert last.prefix_cache_hits_total >= 2 * BLOCK_SIZE
    assert last.prefix_cache_hits_total < last.prefix_cache_queries_total
    assert last.num_preemptions_total == 0
    counts = last.iteration_tokens_counts
    assert len(counts) == len(ITERATION_TOKENS_BUCKETS) + 1
    # Every step that scheduled tokens is counted once, with its tokens.
    first_run_steps = sum(counts) - len(stats)
    assert first_run_steps > 0
    assert last.iteration_tokens_sum >= num_tokens
    # Cumulative: never decreasing from one step to the next.
    for before, after in zip(stats, stats[1:], strict=False):
        assert after.prefix_cache_queries_total >= before.prefix_cache_queries_total
        assert sum(after.iteration_tokens_counts) >= sum(before.iteration_tokens_counts)


def test_preemptions_are_counted_in_total() -> None:
    # Four blocks for two requests that each grow to three: one is preempted.
    core = _core(num_blocks=5, budget=64)
    core.add_request(_request("a", list(range(1, 8)), max_tokens=5))
    core.add_request(_request("b", list(range(20, 27)), max_tokens=5))
    outputs, stats, _ = _run(core)
    per_step = sum(s.num_preemptions for s in stats)
    assert per_step > 0
    assert stats[-1].num_preemptions_total == per_step
    finished = {o.request_id for o in outputs if o.finished}
    assert finished == {"a", "b"}


def test_a_finished_request_carries_its_phase_times() -> None:
    core = _core()
    core.add_request(_request("a", list(range(1, 9)), max_tokens=4))
    outputs, _, _ = _run(core)
    (final,) = [o for o in outputs if o.finished]
    times = final.phase_times
    assert times is not None
    assert times.queue_s >= 0 and times.prefill_s > 0 and times.decode_s > 0
    # Only the final output carries them.
    assert all(o.phase_times is None for o in outputs if not o.finished)


def test_an_aborted_request_that_never_ran_spent_its_time_queued() -> None:
    core = _core()
    core.add_request(_request("a", list(range(1, 9))))
    core.abort_requests(["a"])
    outputs, _, _ = _run(core)
    (final,) = outputs
    assert final.phase_times is not None
    assert final.phase_times.prefill_s == final.phase_times.decode_s == 0.0
    assert final.phase_times.queue_s >= 0
    # Nothing left behind for the finished request.
    assert core.stats._times == {}
